"""Faults that need a real process: SIGKILL at observed points, and runs started at once."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import (RISING_T, ROOT, assert_resumed_exactly, pythonpath, run_script, run_status,
                     saved_epoch)
from multiexit.train import checkpoint

# A tiny WideResNet whose dropout draws random numbers while training, so that a resume that
# lost the RNG states shows, with a temperature that moves.
TINY = ['smoke', 'n_epochs=3', 'seed=5', 'cf_net.call=WideResNet', 'cf_net.depth=10',
        'cf_net.widen_factor=1', 'cf_net.dropout=0.3', RISING_T]


def start(args, cwd, snapshots):
    env = dict(os.environ, MULTIEXIT_SNAPSHOTS=str(snapshots), PYTHONPATH=pythonpath(),
               OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, str(ROOT / 'train_cifar.py'), 'with', *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(predicate, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError('timed out')




@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """The smoke data, and in reference/1 the uninterrupted run of TINY."""
    work = tmp_path_factory.mktemp('work')
    run_script('train_cifar.py', 'with', *TINY, cwd=work, snapshots=work / 'reference')
    return work


class Training:
    """train_cifar.py in a subprocess whose stderr, progress bars included, is collected as it
    comes, so that a test can kill it at a point it has seen."""

    def __init__(self, args, cwd, snapshots):
        self.proc = start(args, cwd, snapshots)
        self._err = b''
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self):
        while chunk := os.read(self.proc.stderr.fileno(), 1 << 16):
            self._err += chunk

    @property
    def stderr(self):
        return self._err.decode(errors='replace')

    def steps_done(self, epoch):
        """The most training steps of ``epoch`` that its progress bar has shown."""
        shown = re.findall(rf'epoch {epoch}/\d+:[^\r\n]*?\| (\d+)/\d+ \[', self.stderr)
        return max(map(int, shown), default=0)

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        assert self.proc.returncode == -signal.SIGKILL, self.stderr[-2000:]  # it was running


def test_sigkill_at_three_observed_points_then_resume_equals_an_uninterrupted_run(workdir):
    snaps = workdir / 'killed'  # sacred numbers the runs 1, 2, ... in the order they start
    # during start-up: the run has started, no epoch has finished
    first = Training(TINY, workdir, snaps)
    wait_for(lambda: 'Started run with ID "1"' in first.stderr)
    first.kill()
    assert not (snaps / '1' / 'last.pt').exists(), 'killed too late: an epoch had finished'
    # just after a checkpoint
    second = Training(TINY, workdir, snaps)
    wait_for(lambda: saved_epoch(snaps / '2') >= 1)
    second.kill()
    assert saved_epoch(snaps / '2') == 1, 'killed too late: epoch 2 had finished'
    # in the middle of an epoch, in a resumed run
    third = Training(TINY + [f'parent_snapshot={snaps / "2"}'], workdir, snaps)
    wait_for(lambda: third.steps_done(3) >= 1)
    third.kill()
    assert saved_epoch(snaps / '3') == 2, 'killed too late: epoch 3 had finished'
    parent = checkpoint.load(snaps / '3' / 'last.pt')  # never torn
    assert parent['loss']['temperature'] > 1  # the resume below has a temperature to restore
    run_script('train_cifar.py', 'with', *TINY, f'parent_snapshot={snaps / "3"}', cwd=workdir,
               snapshots=snaps)
    assert_resumed_exactly(snaps / '4' / 'last.pt', workdir / 'reference' / '1' / 'last.pt', 3)


def test_concurrent_runs_get_distinct_directories(tmp_path):
    snaps = tmp_path / 'snapshots'  # and no data yet: all four generate it at once
    procs = [start(['smoke', f'seed={i}'], tmp_path, snaps) for i in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    runs = sorted(p for p in snaps.iterdir() if p.name.isdigit())
    assert [p.name for p in runs] == ['1', '2', '3', '4']
    seeds = set()
    for run in runs:
        assert run_status(run) == 'COMPLETED' and saved_epoch(run) == 1
        seeds.add(json.loads((run / 'config.json').read_text())['seed'])
        assert 'val top-1 of exit' in (run / 'cout.txt').read_text()
    assert seeds == {0, 1, 2, 3}
