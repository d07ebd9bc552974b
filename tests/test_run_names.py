"""Which run a name means: the newest by the start time recorded in run.json, then by run id (in
numeric order), wherever a name is resolved (eval.py and a resume through find.resolve, --plot,
the runs table's parent chains). Nothing read or written in a run folder changes it."""
import json
import os

from multiexit.runs import find
from multiexit.runs.__main__ import main as runs_main
from multiexit.runs.table import load_runs


def start(minute):
    return f'2026-01-01T10:{minute:02d}:00.000000'


def make_run(snaps, run, name, minute, status='COMPLETED', parent=None, epochs=(1, 2)):
    """A training run folder as sacred and training leave it: config.json, run.json (started at
    10:<minute>), metrics.json of ``epochs`` and a last.pt."""
    folder = snaps / str(run)
    folder.mkdir(parents=True)
    config = {'snapshot_name': name, 'parent_snapshot': parent, 'n_epochs': 6,
              'cf_net': {'call': 'MsdNet'}, 'cf_loss': {'call': 'DistillationBasedLoss'}}
    info = {'experiment': {'name': 'train_cifar'}, 'status': status,
            'start_time': None if minute is None else start(minute), 'meta': {}}
    steps = list(epochs)
    metrics = {m: {'steps': steps, 'values': [0.1 * e for e in steps]}
               for m in ('val.acc1_avg', 'val.acc1_clf0', 'train.acc1_clf0', 'lr')}
    for file, content in (('config.json', config), ('run.json', info),
                          ('metrics.json', metrics)):
        (folder / file).write_text(json.dumps(content))
    (folder / 'last.pt').write_bytes(b'')
    return folder


def test_plotting_or_touching_the_older_run_leaves_the_name_to_the_newer(tmp_path, capsys):
    """The issue's case: --plot of the older run wrote curves.png into its folder, which made it
    the newest by modification time."""
    snaps = tmp_path / 'snapshots'
    older, newer = make_run(snaps, 9, 'demo', 1), make_run(snaps, 10, 'demo', 2)
    os.utime(older, (100, 100))
    os.utime(newer, (200, 200))
    runs_main([str(snaps), '--plot', '9'])
    assert (older / 'curves.png').is_file() and older.stat().st_mtime > 200
    said = []
    assert find.resolve('demo', snaps, say=said.append) == newer  # eval.py, a resume
    assert said == ["snapshot_name='demo': run 10 (COMPLETED, the newest of 2 runs with that "
                    "name)"]
    capsys.readouterr()
    runs_main([str(snaps), '--plot', 'demo'])
    assert ("snapshot_name='demo': run 10 (COMPLETED, the newest of 2 runs with that name)"
            in capsys.readouterr().out)
    (older / 'notes.txt').write_text('read me')  # anything else written there
    assert find.resolve('demo', snaps) == newer


def test_run_10_is_newer_than_run_9(tmp_path):
    """Runs that started at the same time (or have no start time): the higher id, in numeric
    order, whatever the folders' modification times."""
    snaps = tmp_path / 'snapshots'
    for minute in (5, None):
        runs = [make_run(snaps / str(minute), run, 'demo', minute) for run in (9, 10)]
        for folder in runs:
            os.utime(folder, (100, 100))
        assert find.resolve('demo', snaps / str(minute)) == runs[1]


def test_the_start_time_wins_over_the_run_id(tmp_path):
    """A run copied into the folder under a higher id, that started before: the one that started
    last is the newest; unfinished runs that started later are named as newer."""
    snaps = tmp_path / 'snapshots'
    late, early = make_run(snaps, 3, 'demo', 30), make_run(snaps, 4, 'demo', 10)
    make_run(snaps, 5, 'demo', 20, status='INTERRUPTED')
    make_run(snaps, 6, 'demo', 40, status='INTERRUPTED')
    said = []
    assert find.resolve('demo', snaps, say=said.append) == late != early
    assert said == ["snapshot_name='demo': run 3 (COMPLETED, the newest COMPLETED of 4 runs "
                    "with that name; newer but unfinished: run 6 (INTERRUPTED))"]


def test_a_parent_chain_stays_whole_after_a_folder_is_touched(tmp_path):
    """9 -> 10 -> 11, each resumed by name: touching run 9's folder does not make run 11 the
    child of run 9 (which dropped epochs 3 and 4 from its history and curves)."""
    snaps = tmp_path / 'snapshots'
    runs = [make_run(snaps, 9, 'long', 1, 'INTERRUPTED', epochs=(1, 2)),
            make_run(snaps, 10, 'long', 2, 'INTERRUPTED', parent='long', epochs=(3, 4)),
            make_run(snaps, 11, 'long', 3, parent='long', epochs=(5, 6))]
    for age, folder in enumerate(runs):
        os.utime(folder, (100 + age, 100 + age))
    os.utime(runs[0], None)  # touched: the newest folder now
    table = load_runs(snaps).set_index('run')
    assert (table.loc['11', 'parent_run'], table.loc['11', 'first_run']) == ('10', '9')
    assert table.loc['11', 'final_epoch'] == 6
    runs_main([str(snaps), '--plot', '11'])
    assert find.resolve('long', snaps) == runs[2]


def test_a_run_whose_config_is_unreadable_is_named_as_possibly_left_out(tmp_path, capsys):
    """Its name is unknown: the name resolves among the others, with one warning that names the
    unreadable file (not silently)."""
    snaps = tmp_path / 'snapshots'
    named = make_run(snaps, 1, 'demo', 1)
    (make_run(snaps, 2, 'demo', 2) / 'config.json').write_text('{not json')
    assert find.resolve('demo', snaps) == named
    err = capsys.readouterr().err.splitlines()
    assert err == [f'warning: {snaps}/2/config.json is unreadable, so run 2 may be a run named '
                   "'demo' that is left out; restore the file (python3 -m multiexit.runs shows "
                   'the runs)']
