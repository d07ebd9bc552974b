"""The runs table tells a run that is not running from one that is: a RUNNING run whose process
is gone is DEAD, one whose heartbeat stopped is STALE; a training run whose metrics.json is
missing is listed with a warning that says so, and --plot names the missing file."""
import datetime
import json
import os
import platform
import subprocess
import sys

import pytest

from multiexit.runs.__main__ import main as runs_main
from multiexit.runs.status import STALE_S
from multiexit.runs.summary import summary
from multiexit.runs.table import load_runs


def ago(seconds):
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    return (now - datetime.timedelta(seconds=seconds)).isoformat()


def write_run(snaps, run, status='RUNNING', host=None, beat_s=1, metrics=True, last=True):
    """A training run folder as sacred leaves it, its last heartbeat ``beat_s`` ago."""
    folder = snaps / str(run)
    folder.mkdir(parents=True)
    info = {'experiment': {'name': 'train_cifar'}, 'status': status, 'host': host or {},
            'start_time': ago(beat_s + 60), 'heartbeat': ago(beat_s), 'meta': {}}
    config = {'snapshot_name': f'run{run}', 'n_epochs': 3, 'cf_net': {'call': 'MsdNet'}}
    (folder / 'run.json').write_text(json.dumps(info))
    (folder / 'config.json').write_text(json.dumps(config))
    if metrics:
        steps = [1, 2]
        (folder / 'metrics.json').write_text(json.dumps({
            m: {'steps': steps, 'values': [0.1, 0.2]}
            for m in ('val.acc1_avg', 'val.acc1_clf0', 'train.acc1_clf0')}))
    if last:
        (folder / 'last.pt').write_bytes(b'')
    return folder


def gone_pid():
    """The pid of a process that ended (and was reaped)."""
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_a_run_whose_process_is_gone_or_silent_is_not_shown_as_running(tmp_path):
    snaps, here = tmp_path / 'snapshots', platform.node()
    write_run(snaps, 1, host={'hostname': here, 'pid': gone_pid()})  # kill -9
    write_run(snaps, 2, host={'hostname': here, 'pid': os.getpid()})
    write_run(snaps, 3, host={'hostname': 'elsewhere', 'pid': 1}, beat_s=STALE_S + 60)
    write_run(snaps, 4, host={'hostname': 'elsewhere', 'pid': 1})  # beats on another machine
    write_run(snaps, 5, host={'hostname': here, 'pid': os.getpid()},
              beat_s=STALE_S + 60)  # alive, but its heartbeat stopped: hung
    write_run(snaps, 6, status='INTERRUPTED', host={'hostname': here, 'pid': gone_pid()})
    write_run(snaps, 7, beat_s=STALE_S + 60)  # no host recorded: its heartbeat tells
    table = load_runs(snaps)
    assert list(table['status']) == ['DEAD', 'RUNNING', 'STALE', 'RUNNING', 'STALE',
                                     'INTERRUPTED', 'STALE']
    line = summary(table).splitlines()[1]
    assert line.split()[:2] == ['1', 'run1'] and ' DEAD ' in line and ' 2/3' in line


def test_a_missing_metrics_json_is_one_warning_and_plot_names_it(tmp_path, capsys):
    snaps = tmp_path / 'snapshots'
    lost = write_run(snaps, 1, status='COMPLETED', metrics=False)
    write_run(snaps, 2, status='INTERRUPTED', metrics=False, last=False)  # no epoch finished
    write_run(snaps, 3, status='COMPLETED')
    runs_main([str(snaps)])
    out, err = capsys.readouterr()
    assert err.splitlines() == [f'warning: {lost}: no metrics.json, so its epochs and accuracies '
                                'are missing from the table (the file was deleted or never '
                                'written)']
    assert len(out.splitlines()) == 5  # header, 3 runs, legend
    with pytest.raises(SystemExit) as e:
        runs_main([str(snaps), '--plot', '1'])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f'error: {lost / "metrics.json"} is missing (deleted, or never written): '
                       'no training curves to plot')


def test_plot_names_a_parent_whose_metrics_json_is_missing(tmp_path, capsys):
    snaps = tmp_path / 'snapshots'
    parent = write_run(snaps, 1, status='INTERRUPTED', metrics=False)
    child = write_run(snaps, 2, status='COMPLETED')
    config = json.loads((child / 'config.json').read_text())
    (child / 'config.json').write_text(json.dumps(dict(config, parent_snapshot='1')))
    runs_main([str(snaps), '--plot', '2'])
    out, err = capsys.readouterr()
    assert err.splitlines() == [f'warning: {parent}: no metrics.json, so its epochs and '
                                'accuracies are missing from the table (the file was deleted or '
                                'never written)',
                                f'warning: {parent / "metrics.json"} is missing: the curves lack '
                                'the epochs of run 1']
    assert f'wrote {child / "curves.png"}' in out and (child / 'curves.png').is_file()
