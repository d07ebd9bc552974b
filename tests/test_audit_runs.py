"""The runs table over chains of three runs (written here as sacred writes them): every
link's row names the chain's first run as ``first_run`` and its parent as ``parent_run``, its
metrics are those of the whole history (the first run's epochs included, a parent's only up to
the epoch resumed from), and ``total_duration_s`` sums the durations of every link."""
import datetime
import json

import pytest

from multiexit.runs.curves import run_history
from multiexit.runs.table import load_runs

START = datetime.datetime(2026, 1, 1)


def write_run(snaps, run, parent, epochs, acc, seconds, start_s, status='COMPLETED'):
    """Run folder ``run``: a train_cifar run that trained ``epochs`` (validation top-1 ``acc``
    each) in ``seconds``, resumed from ``parent`` (None: fresh)."""
    folder = snaps / run
    folder.mkdir(parents=True)
    start = START + datetime.timedelta(seconds=start_s)
    stop = start + datetime.timedelta(seconds=seconds)
    (folder / 'run.json').write_text(json.dumps(dict(
        experiment=dict(name='train_cifar'), status=status, start_time=start.isoformat(),
        stop_time=stop.isoformat(), meta=dict(named_configs=[]))))
    (folder / 'config.json').write_text(json.dumps(dict(
        parent_snapshot=parent, snapshot_name='chain', seed=0, n_epochs=9,
        cf_loss=dict(call='DistillationBasedLoss'), cf_net=dict(call='MsdNet'))))
    steps = list(epochs)
    (folder / 'metrics.json').write_text(json.dumps({
        'val.acc1_avg': dict(steps=steps, values=acc),
        'train.loss': dict(steps=steps, values=[float(e) for e in epochs])} if epochs else {}))
    for name in ['last.pt'] * bool(epochs) + [f'ep{e}.pt' for e in epochs]:
        (folder / name).write_bytes(b'')
    return folder


@pytest.fixture
def snaps(tmp_path):
    """Chain 1 -> 2 -> 3 (the parent named by its folder, then by its run id) and chain
    4 -> 5 -> 6, where 5 resumed from 4's ep2.pt: 4's epoch 3 is not part of 5's or 6's
    history, though it has the best validation top-1; 7 resumed from 4's ep2.pt too and was
    interrupted before it finished an epoch: its history is 4's epochs 1 and 2."""
    snaps = tmp_path / 'snapshots'
    write_run(snaps, '1', None, [1, 2, 3], [0.5, 0.9, 0.6], 100, 0)
    write_run(snaps, '2', str(snaps / '1'), [4, 5], [0.7, 0.8], 200, 1000)
    write_run(snaps, '3', '2', [6, 7], [0.85, 0.88], 50, 2000)
    write_run(snaps, '4', None, [1, 2, 3], [0.3, 0.4, 0.99], 10, 3000)
    write_run(snaps, '5', str(snaps / '4' / 'ep2.pt'), [3, 4], [0.5, 0.45], 20, 4000)
    write_run(snaps, '6', '5', [5, 6], [0.55, 0.6], 30, 5000)
    write_run(snaps, '7', str(snaps / '4' / 'ep2.pt'), [], [], 5, 6000, 'INTERRUPTED')
    return snaps


def test_every_link_of_a_chain_of_three_names_its_root_and_sums_the_durations(snaps):
    table = load_runs(snaps, warn=pytest.fail).set_index('run')
    want = {  # run: first_run, parent_run, duration_s, total_duration_s
        '1': ('1', None, 100, 100), '2': ('1', '1', 200, 300), '3': ('1', '2', 50, 350),
        '4': ('4', None, 10, 10), '5': ('4', '4', 20, 30), '6': ('4', '5', 30, 60),
        '7': ('4', '4', 5, 15)}
    for run, (first, parent, seconds, total) in want.items():
        row = table.loc[run]
        got_parent = row['parent_run'] if isinstance(row['parent_run'], str) else None
        assert (row['first_run'], got_parent, row['duration_s'], row['total_duration_s']) == (
            first, parent, seconds, total), run


def test_every_link_of_a_chain_of_three_has_the_whole_history(snaps):
    table = load_runs(snaps, warn=pytest.fail).set_index('run')
    want = {  # run: final_epoch, final val top-1, best_epoch, best val top-1
        '1': (3, 0.6, 2, 0.9), '2': (5, 0.8, 2, 0.9), '3': (7, 0.88, 2, 0.9),
        '4': (3, 0.99, 3, 0.99), '5': (4, 0.45, 3, 0.5), '6': (6, 0.6, 6, 0.6),
        '7': (2, 0.4, 2, 0.4)}
    for run, (final, final_acc, best, best_acc) in want.items():
        row = table.loc[run]
        assert (row['final_epoch'], row['final.val.acc1_avg'], row['best_epoch'],
                row['best.val.acc1_avg']) == (final, final_acc, best, best_acc), run
        assert row['final.train.loss'] == final


@pytest.mark.parametrize('run, chain, epochs, acc', [
    ('3', ['1', '2', '3'], range(1, 8), [0.5, 0.9, 0.6, 0.7, 0.8, 0.85, 0.88]),
    ('6', ['4', '5', '6'], range(1, 7), [0.3, 0.4, 0.5, 0.45, 0.55, 0.6]),
    ('7', ['4', '7'], range(1, 3), [0.3, 0.4]),
])
def test_the_curves_of_a_chain_of_three_cover_every_link(snaps, run, chain, epochs, acc):
    frame, runs = run_history(snaps, run)
    assert runs == chain
    assert list(frame.index) == list(epochs)
    assert frame['val.acc1_avg'].tolist() == acc
