"""Faults: kills, signals, NaN, full disk, hostile or broken checkpoints, concurrent runs."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from helpers import RISING_T, ROOT, pythonpath, run_script
from multiexit.errors import CheckpointWriteError, NonFiniteLossError, SnapshotError
from multiexit.train import checkpoint
from multiexit.train.training import Run

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


def newest_run(snapshots):
    runs = [p for p in snapshots.iterdir() if p.name.isdigit()] if snapshots.is_dir() else []
    return max(runs, key=lambda p: int(p.name)) if runs else None


def wait_for(predicate, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError('timed out')


def saved_epoch(run):
    try:
        return torch.load(run / 'last.pt', weights_only=True)['epoch']
    except Exception:
        return 0


def status(run):
    return json.loads((run / 'run.json').read_text())['status']


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
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
    final = torch.load(snaps / '4' / 'last.pt', weights_only=True)
    reference = torch.load(workdir / 'reference' / '1' / 'last.pt', weights_only=True)
    assert final['epoch'] == reference['epoch'] == 3
    for k, v in reference['model'].items():
        assert torch.equal(v, final['model'][k]), k
    assert torch.equal(final['loss']['temperature'], reference['loss']['temperature'])


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_with_resume_instructions(workdir, tmp_path, sig):
    snaps = tmp_path / 'snapshots'
    proc = start(['smoke', 'n_epochs=50'], workdir, snaps)
    wait_for(lambda: newest_run(snaps) is not None and saved_epoch(newest_run(snaps)) >= 1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    run = newest_run(snaps)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith('interrupted: ')]
    assert len(lines) == 1 and f'parent_snapshot={run}' in lines[0] and 'Traceback' not in err
    assert f'interrupted: {sig.name} during epoch' in lines[0]
    assert status(run) == 'INTERRUPTED'
    epoch = saved_epoch(run)
    assert epoch >= 1
    command = lines[0].split('resume with: python3 train_cifar.py with ')[1].split()
    run_script('train_cifar.py', 'with', *command, f'n_epochs={epoch + 1}', cwd=workdir,
               snapshots=snaps)
    assert saved_epoch(newest_run(snaps)) == epoch + 1


@pytest.fixture()
def small_run(workdir, tmp_path):
    """A Run on the generated smoke data, built through the library."""
    config = json.loads((workdir / 'reference' / '1' / 'config.json').read_text())

    def make(n_epochs, run_dir=tmp_path / 'run'):
        run_dir.mkdir(exist_ok=True)
        return Run(config['cf_net'], config['cf_loss'], config['cf_trn'], config['cf_val'],
                   config['cf_opt'], config['cf_scheduler'], 64, 250, n_epochs, 0,
                   workdir / 'data' / 'smoke', -1, 0, run_dir, log=lambda *a: None)
    return make


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(small_run, monkeypatch):
    run = small_run(1)
    run.fit()
    last = run.run_dir / 'last.pt'
    before = last.read_bytes()
    run.n_epochs = 3
    calls = {'n': 0}
    forward = run.loss_fn.forward

    def poisoned(logits, y):
        calls['n'] += 1
        loss = forward(logits, y)
        return loss * float('nan') if calls['n'] == 3 else loss

    monkeypatch.setattr(run.loss_fn, 'forward', poisoned)
    with pytest.raises(NonFiniteLossError, match=r'epoch 2, step 3;.*holds epoch 1'):
        run.fit()
    assert last.read_bytes() == before


def test_failed_checkpoint_write_keeps_the_previous_one(small_run, monkeypatch):
    run = small_run(1)
    run.fit()
    last = run.run_dir / 'last.pt'
    before = last.read_bytes()
    run.n_epochs = 2

    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(CheckpointWriteError, match=r'No space left on device.*holds epoch 1'):
        run.fit()
    assert last.read_bytes() == before
    assert sorted(p.name for p in run.run_dir.iterdir()) == sorted(['last.pt', 'ep1.pt'])


def test_resuming_a_different_architecture_is_refused(workdir, small_run, tmp_path):
    parent = workdir / 'reference' / '1'
    config = json.loads((parent / 'config.json').read_text())
    config['cf_net']['widen_factor'] = 2
    with pytest.raises(SnapshotError, match=r'was trained with another cf_net \(widen_factor 1 '
                                            rf'-> 2\); resume with its settings: .* with '
                                            rf'{parent}/config.json parent_snapshot={parent}$'):
        Run(config['cf_net'], config['cf_loss'], config['cf_trn'], config['cf_val'],
            config['cf_opt'], config['cf_scheduler'], 64, 250, 5, 0, workdir / 'data' / 'smoke',
            -1, 0, tmp_path, parent_snapshot=str(parent))


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f'touch {self.target}',))


def bad_files(tmp_path, workdir):
    good = next((workdir / 'reference' / '1').glob('ep*.pt'))
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(good.read_bytes()[:4000])
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(os.urandom(3000))
    evil = tmp_path / 'evil.pt'
    torch.save({'model': Payload(tmp_path / 'pwned')}, evil)
    wrong = tmp_path / 'other_architecture.pt'
    ckpt = torch.load(good, weights_only=True)
    torch.save(ckpt['model'], wrong)  # a bare state dict: eval assumes the paper's MsdNet
    return {'truncated': truncated, 'garbage': garbage, 'evil': evil, 'wrong': wrong}


@pytest.mark.parametrize('kind, message', [
    ('truncated', 'cannot read checkpoint'), ('garbage', 'cannot read checkpoint'),
    ('evil', 'refused to load'), ('wrong', 'does not fit cf_net')])
def test_broken_or_hostile_snapshots_are_one_line(workdir, tmp_path, kind, message):
    path = bad_files(tmp_path, workdir)[kind]
    for script, arg in (('eval.py', f'snapshot_name={path}'),
                        ('train_cifar.py', f'parent_snapshot={path}')):
        # the bare state dict is a WideResNet's: smoke's MsdNet is another architecture
        extra = ['smoke'] if script == 'train_cifar.py' else []
        proc = run_script(script, 'with', *extra, arg, cwd=workdir, snapshots=tmp_path / 's',
                          check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
        assert message in errors[0] and str(path) in errors[0] and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'pwned').exists()


def test_debug_switch_shows_the_traceback(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv('MULTIEXIT_DEBUG', '1')
    proc = run_script('eval.py', 'with', 'snapshot_name=missing', cwd=workdir,
                      snapshots=tmp_path, check=False)
    assert proc.returncode != 0 and 'Traceback' in proc.stderr
    assert "multiexit.runs.find.UnknownSnapshot: no snapshot 'missing'" in proc.stderr


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
        assert status(run) == 'COMPLETED' and saved_epoch(run) == 1
        seeds.add(json.loads((run / 'config.json').read_text())['seed'])
        assert 'val top-1 of exit' in (run / 'cout.txt').read_text()
    assert seeds == {0, 1, 2, 3}
