"""Faults: signals, NaN, full disk, hostile or broken checkpoints, in this process (SIGKILL and
runs started at once: tests/e2e/test_reliability.py)."""
import json
import os
import signal

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from helpers import RISING_T, run_in_process, run_status, saved_epoch
from multiexit.errors import CheckpointWriteError, NonFiniteLossError, SnapshotError
from multiexit.config import TrainConfig
from multiexit.train.api import train_alone
from multiexit.train.run import Run

# A tiny WideResNet whose dropout draws random numbers while training, so that a resume that
# lost the RNG states shows, with a temperature that moves.
TINY = ['smoke', 'n_epochs=3', 'seed=5', 'cf_net.call=WideResNet', 'cf_net.depth=10',
        'cf_net.widen_factor=1', 'cf_net.dropout=0.3', RISING_T]


def newest_run(snapshots):
    runs = [p for p in snapshots.iterdir() if p.name.isdigit()] if snapshots.is_dir() else []
    return max(runs, key=lambda p: int(p.name)) if runs else None




@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """The smoke data, and in reference/1 a run of TINY for one epoch."""
    work = tmp_path_factory.mktemp('work')
    run_in_process('train_cifar.py', 'with', *TINY, 'n_epochs=1', cwd=work)
    (work / 'snapshots').rename(work / 'reference')
    return work


def test_a_resumed_run_continues_as_the_uninterrupted_one(workdir, tmp_path):
    """TINY's dropout draws random numbers and its temperature moves: a resume that lost the
    RNG states or the temperature would train another epoch 2 (a resume after SIGKILL:
    tests/e2e/test_reliability.py)."""
    (tmp_path / 'data').symlink_to(workdir / 'data')
    run_in_process('train_cifar.py', 'with', *TINY, 'n_epochs=2', cwd=tmp_path)
    run_in_process('train_cifar.py', 'with', *TINY, 'n_epochs=2',
                   f'parent_snapshot={workdir / "reference" / "1"}', cwd=tmp_path)
    uninterrupted, resumed = (torch.load(tmp_path / 'snapshots' / run / 'last.pt',
                                         weights_only=True) for run in '12')
    assert uninterrupted['epoch'] == resumed['epoch'] == 2
    for k, v in uninterrupted['model'].items():
        assert torch.equal(v, resumed['model'][k]), k
    assert uninterrupted['loss']['temperature'] > 1
    assert torch.equal(resumed['loss']['temperature'], uninterrupted['loss']['temperature'])


@pytest.fixture
def signal_after_epoch_1(tmp_path):
    """``send(signum)``: this process gets the signal once, at the first training step after
    snapshots/1/last.pt (epoch 1) was saved in ``tmp_path``, from an optimizer step hook, as a
    terminal's Ctrl-C or a ``kill`` would reach a training script. Returns the list of the
    signals that reached no handler of the training."""
    unhandled, sent, handles = [], [], []
    # a terminal's handlers: SIGINT raises KeyboardInterrupt; SIGTERM, which the training
    # handles itself, is noted here (by default, it would end this process)
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda s, f: unhandled.append(s))}

    def send(signum):
        def hook(optimizer, args, kwargs):
            if not sent and (tmp_path / 'snapshots' / '1' / 'last.pt').is_file():
                sent.append(signum)
                os.kill(os.getpid(), signum)
        handles.append(register_optimizer_step_post_hook(hook))
        return unhandled
    try:
        yield send
    finally:
        for handle in handles:
            handle.remove()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_with_resume_instructions(workdir, tmp_path, signal_after_epoch_1,
                                                       sig):
    snaps = tmp_path / 'snapshots'
    (tmp_path / 'data').symlink_to(workdir / 'data')
    unhandled = signal_after_epoch_1(sig)
    proc = run_in_process('train_cifar.py', 'with', 'smoke', 'n_epochs=3', cwd=tmp_path,
                          check=False)
    run = newest_run(snaps)
    assert proc.returncode == 130 and not unhandled, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith('interrupted: ')]
    assert len(lines) == 1 and f'parent_snapshot=snapshots/{run.name}' in lines[0]
    assert 'Traceback' not in proc.stderr
    assert f'interrupted: {sig.name} during epoch 2' in lines[0]
    assert run_status(run) == 'INTERRUPTED'
    epoch = saved_epoch(run)
    assert epoch == 1
    command = lines[0].split('resume with: python3 train_cifar.py with ')[1].split()
    run_in_process('train_cifar.py', 'with', *command, f'n_epochs={epoch + 1}', cwd=tmp_path)
    assert saved_epoch(newest_run(snaps)) == epoch + 1


@pytest.fixture()
def small_run(workdir, tmp_path):
    """A Run on the generated smoke data, built through the library."""
    config = json.loads((workdir / 'reference' / '1' / 'config.json').read_text())

    def make(n_epochs, run_dir=tmp_path / 'run'):
        run_dir.mkdir(exist_ok=True)
        cfg = TrainConfig.of(dict(config, batch_size=64, val_batch_size=250, n_epochs=n_epochs,
                                  save_interval=0, data_dir=workdir / 'data' / 'smoke', gpu=-1,
                                  seed=0, parent_snapshot=None))
        return Run(cfg, run_dir, log=lambda *a: None)
    return make


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(small_run, monkeypatch):
    run = small_run(1)
    train_alone(run)
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
        train_alone(run)
    assert last.read_bytes() == before


def test_failed_checkpoint_write_keeps_the_previous_one(small_run, monkeypatch):
    run = small_run(1)
    train_alone(run)
    last = run.run_dir / 'last.pt'
    before = last.read_bytes()
    run.n_epochs = 2

    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(CheckpointWriteError, match=r'No space left on device.*holds epoch 1'):
        train_alone(run)
    assert last.read_bytes() == before
    assert sorted(p.name for p in run.run_dir.iterdir()) == sorted(['last.pt', 'ep1.pt'])


def test_resuming_a_different_architecture_is_refused(workdir, small_run, tmp_path):
    parent = workdir / 'reference' / '1'
    config = json.loads((parent / 'config.json').read_text())
    config['cf_net']['widen_factor'] = 2
    with pytest.raises(SnapshotError, match=r'was trained with another cf_net \(widen_factor 1 '
                                            rf'-> 2\); resume with its settings: .* with '
                                            rf'{parent}/config.json parent_snapshot={parent}$'):
        Run(TrainConfig.of(dict(config, batch_size=64, val_batch_size=250, n_epochs=5,
                                 save_interval=0, data_dir=workdir / 'data' / 'smoke', gpu=-1,
                                 seed=0, parent_snapshot=str(parent))), tmp_path)


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
        proc = run_in_process(script, 'with', *extra, arg, cwd=workdir, check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
        assert message in errors[0] and str(path) in errors[0] and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'pwned').exists()


def test_debug_switch_shows_the_traceback(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv('MULTIEXIT_DEBUG', '1')
    proc = run_in_process('eval.py', 'with', 'snapshot_name=missing', cwd=tmp_path, check=False)
    assert proc.returncode != 0 and 'Traceback' in proc.stderr
    assert "multiexit.runs.find.UnknownSnapshot: no snapshot 'missing'" in proc.stderr
