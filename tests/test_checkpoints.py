import json
import os
import pickle
from contextlib import nullcontext

import pytest
import torch

from helpers import SMALL_NET
from multiexit.errors import SnapshotError
from multiexit.runs import find
from multiexit.config import TrainConfig
from multiexit.train import checkpoint, solo
from multiexit.train.api import train_alone
from multiexit.train.run import Run


def test_atomic_save_roundtrip_leaves_no_temporary(tmp_path):
    path = tmp_path / 'a.pt'
    checkpoint.save_atomic({'w': torch.arange(3)}, path)
    checkpoint.save_atomic({'w': torch.arange(4)}, path)
    assert checkpoint.load(path)['w'].tolist() == [0, 1, 2, 3]
    assert os.listdir(tmp_path) == ['a.pt']


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'last.pt'
    checkpoint.save_atomic({'epoch': 1}, path)

    def disk_full(obj, f, *args, **kwargs):  # the disk fills up half-way through the file
        with open(f, 'wb') if isinstance(f, (str, os.PathLike)) else nullcontext(f) as out:
            out.write(b'half a checkpoint')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(OSError, match='No space'):
        checkpoint.save_atomic({'epoch': 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path) == {'epoch': 1} and os.listdir(tmp_path) == ['last.pt']


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, 'w'))


def test_code_in_a_checkpoint_is_never_run(tmp_path):
    target = tmp_path / 'pwned'
    path = tmp_path / 'evil.pt'
    torch.save({'model': Payload(str(target))}, path)
    with pytest.raises(SnapshotError, match='refused to load'):
        checkpoint.load(path)
    assert not target.exists()
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump(Payload(str(target)), f)
    with pytest.raises(SnapshotError):
        checkpoint.load(tmp_path / 'evil.pkl')
    assert not target.exists()


@pytest.mark.parametrize('content', [b'', b'garbage' * 10, 'truncated'])
def test_corrupt_checkpoints_are_one_line_errors(tmp_path, content):
    path = tmp_path / 'bad.pt'
    if content == 'truncated':
        torch.save({'w': torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        path.write_bytes(content)
    with pytest.raises(SnapshotError) as e:
        checkpoint.load(path)
    assert str(path) in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoints_follow_the_umask_like_the_other_run_files(tmp_path, umask, mode):
    """Colleagues on a shared file system read the weights as they read config.json."""
    previous = os.umask(umask)
    try:
        checkpoint.save_atomic({'w': torch.arange(3)}, tmp_path / 'last.pt')
        (tmp_path / 'config.json').write_text('{}')
    finally:
        os.umask(previous)
    assert (tmp_path / 'last.pt').stat().st_mode & 0o777 == mode
    assert (tmp_path / 'config.json').stat().st_mode & 0o777 == mode


def make_run(root, run_id, name, files=('last.pt',), status=None, experiment='train_cifar'):
    run = root / str(run_id)
    run.mkdir(parents=True)
    (run / 'config.json').write_text(json.dumps({'snapshot_name': name}))
    if status is not None:
        (run / 'run.json').write_text(json.dumps({'status': status,
                                                  'experiment': {'name': experiment}}))
    for f in files:
        checkpoint.save_atomic({'epoch': 1}, run / f)
    return run


def test_resolve_by_id_name_path_and_unknown(tmp_path):
    snaps = tmp_path / 'snapshots'
    r1 = make_run(snaps, 1, 'dbt:0')
    r2 = make_run(snaps, 2, 'dbt:0', files=('ep3.pt',))
    eval_run = make_run(snaps, 3, 'dbt:0', files=())  # an eval run: no checkpoints
    os.utime(r1, (1, 1))
    assert find.resolve('1', snaps) == r1
    assert find.resolve('dbt:0', snaps) == r2  # the most recent training run of that name
    assert find.resolve(str(r2 / 'ep3.pt'), snaps) == r2 / 'ep3.pt'
    with pytest.raises(SnapshotError, match="no snapshot 'nope'"):
        find.resolve('nope', snaps)
    with pytest.raises(SnapshotError, match='holds no checkpoint'):
        find.resolve(str(eval_run), snaps)


def test_a_name_takes_the_newest_completed_run_and_says_which(tmp_path):
    snaps = tmp_path / 'snapshots'
    old = make_run(snaps, 1, 'dbt:0', status='COMPLETED')
    done = make_run(snaps, 2, 'dbt:0', status='COMPLETED')
    make_run(snaps, 3, 'dbt:0', status='INTERRUPTED')  # the newest, unfinished
    make_run(snaps, 4, 'dbt:0', files=(), status='COMPLETED', experiment='eval')
    for age, run in enumerate([old, done]):
        os.utime(run, (age, age))
    said = []
    assert find.resolve('dbt:0', snaps, say=said.append) == done
    assert said == ["snapshot_name='dbt:0': run 2 (COMPLETED, the newest COMPLETED of 3 runs "
                    "with that name; newer but unfinished: run 3 (INTERRUPTED))"]
    said.clear()
    assert find.resolve('2', snaps, say=said.append) == done and said == []
    lone = make_run(snaps, 5, 'lone', status='INTERRUPTED')
    assert find.resolve('lone', snaps, say=said.append) == lone
    assert said == ["snapshot_name='lone': run 5 (INTERRUPTED)"]


def test_a_named_run_without_checkpoint_is_named_as_such(tmp_path):
    """Not 'no run has that name': the run exists, it has no checkpoint, and which one it is."""
    snaps = tmp_path / 'snapshots'
    make_run(snaps, 1, 'test:0', files=(), status='FAILED')
    make_run(snaps, 2, 'test:0', files=(), status='COMPLETED', experiment='eval')
    with pytest.raises(SnapshotError) as e:
        find.resolve('test:0', snaps)
    assert not isinstance(e.value, find.UnknownSnapshot)
    assert str(e.value).startswith(
        "snapshot_name='test:0' is the name of training run 1 (FAILED) in "
        f"{snaps}/, but no epoch of it finished, so there is no checkpoint")
    with pytest.raises(find.UnknownSnapshot, match="no snapshot 'nope'"):
        find.resolve('nope', snaps)


def test_pick_checkpoint_best_last_epoch(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    for ep, acc in [(5, 0.3), (10, 0.5), (15, 0.4)]:
        checkpoint.save_atomic({'epoch': ep, 'val_metrics': {'acc1_avg': acc}}, run / f'ep{ep}.pt')
    assert find.pick_checkpoint(run, 'best').name == 'ep10.pt'
    assert find.pick_checkpoint(run, 15).name == 'ep15.pt'
    assert find.pick_checkpoint(run, 'last').name == 'last.pt'
    with pytest.raises(SnapshotError, match=r'\[5, 10, 15\]'):
        find.pick_checkpoint(run, 7)


# The smoke MsdNet on the generated CIFAR-10 (100 training images: 2 steps of 50 per epoch).
TINY_NET = dict(SMALL_NET, out_dim=None)
TINY_DATA = dict(call='Cifar10', n_per_class=15, nval_per_class=5, augment=True)
# torch 0.4's stepping (after each epoch): epochs 1-2 at lr 0.1, epoch 3 on at 0.01
MILESTONE = dict(call='MultiStepLR', milestones=[2], gamma=0.1)


def tiny_run(data_dir, run_dir, n_epochs, save_interval=0, parent_snapshot=None, logged=None):
    """A Run built through the library; ``logged`` collects {name: {epoch: value}}."""
    run_dir.mkdir(exist_ok=True)
    log_scalar = (lambda name, value, ep: logged.setdefault(name, {}).update({ep: value})
                  ) if logged is not None else None
    loss = dict(call='DistillationBasedLoss', acc_tops=[1], C=0.5, maxprob=0.5)
    cfg = TrainConfig(cf_net=TINY_NET, cf_loss=loss, cf_trn=TINY_DATA,
                      cf_val=dict(TINY_DATA, augment=False), cf_opt=dict(call='SGD', lr=0.1,
                                                                         momentum=0.9),
                      cf_scheduler=MILESTONE, batch_size=50, val_batch_size=50,
                      n_epochs=n_epochs, save_interval=save_interval, data_dir=data_dir, gpu=-1,
                      seed=0, parent_snapshot=parent_snapshot)
    return Run(cfg, run_dir, log=lambda *a: None, log_scalar=log_scalar)


@pytest.fixture(scope='module')
def two_epochs(fake_data, tmp_path_factory):
    """A run of 2 epochs that kept a model snapshot after each (ep1.pt, ep2.pt)."""
    run = tiny_run(fake_data, tmp_path_factory.mktemp('parent'), 2, save_interval=1)
    train_alone(run)
    return run.run_dir


@pytest.mark.parametrize('parent_epoch, expected_lr', [(1, {2: 0.1, 3: 0.01}), (2, {3: 0.01})])
def test_resume_from_a_model_snapshot_continues_the_lr_schedule(fake_data, two_epochs, tmp_path,
                                                                 parent_epoch, expected_lr):
    """ep<N>.pt holds weights only (the original's way to resume): the schedule is replayed to
    epoch N, so a resumed run crosses the milestone at the same epoch as an uninterrupted one."""
    path = two_epochs / f'ep{parent_epoch}.pt'
    snapshot = checkpoint.load(path)
    assert 'optimizer' not in snapshot and 'scheduler' not in snapshot
    logged = {}
    run = tiny_run(fake_data, tmp_path, 3, parent_snapshot=str(path), logged=logged)
    assert run.epoch == parent_epoch and run.parent_path == path
    for k, v in snapshot['model'].items():
        assert torch.equal(run.model.state_dict()[k], v), k
    train_alone(run)
    assert logged['lr'] == pytest.approx(expected_lr)
    assert checkpoint.load(tmp_path / 'last.pt')['epoch'] == 3


def forced_validation(monkeypatch, scores):
    """Validation gives the acc1_avg ``scores[epoch - 1]``; returns {epoch: the model's weights
    then, and the ep<N>.pt files of every folder involved just before its checkpoints}."""
    real, seen = solo.evaluate, {}

    def forced(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        epoch = min(set(scores) - set(seen))
        seen[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return [dict(out[0], acc1_avg=scores[epoch])]  # a run alone: one member

    monkeypatch.setattr(solo, 'evaluate', forced)
    return seen


def ep_files(run_dir):
    return sorted(p.name for p in run_dir.glob('ep*.pt'))


def test_best_snapshot_is_the_best_validation_epoch_not_the_last(fake_data, tmp_path,
                                                                 monkeypatch):
    """save_interval=0 keeps one ep<N>.pt: the epoch of the highest validation acc1_avg, here
    epoch 2 of 3 (the validation score is forced; the weights are those each epoch trained)."""
    weights = forced_validation(monkeypatch, {1: 0.2, 2: 0.5, 3: 0.3})
    run = tiny_run(fake_data, tmp_path, 3)
    train_alone(run)
    assert ep_files(tmp_path) == ['ep2.pt']
    assert (run.checkpointer.best_epoch, run.checkpointer.best_val) == (2, 0.5)
    best = checkpoint.load(tmp_path / 'ep2.pt')
    assert best['epoch'] == 2 and best['val_metrics']['acc1_avg'] == 0.5
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    for k, v in best['model'].items():
        assert torch.equal(v, weights[2][k]), k
    last = checkpoint.load(tmp_path / 'last.pt')
    assert (last['epoch'], last['best_epoch'], last['best_val']) == (3, 2, 0.5)
    assert find.pick_checkpoint(tmp_path) == tmp_path / 'ep2.pt'


def test_a_resumed_run_carries_the_best_snapshot_along(fake_data, tmp_path, monkeypatch):
    """Resumed from last.pt, a run starts its folder with a copy of the parent's best snapshot
    and replaces it only with a better epoch; the parent's folder is left as it was."""
    forced_validation(monkeypatch, {1: 0.5, 2: 0.2, 3: 0.3, 4: 0.6})
    parent = tiny_run(fake_data, tmp_path / 'parent', 2)
    train_alone(parent)
    best = (tmp_path / 'parent' / 'ep1.pt').read_bytes()
    resumed = tiny_run(fake_data, tmp_path / 'resumed', 3,
                       parent_snapshot=str(tmp_path / 'parent'))
    assert ep_files(resumed.run_dir) == ['ep1.pt']
    assert (resumed.run_dir / 'ep1.pt').read_bytes() == best
    train_alone(resumed)  # epoch 3: 0.3, not better than epoch 1's 0.5
    assert ep_files(resumed.run_dir) == ['ep1.pt'] and resumed.checkpointer.best_epoch == 1
    resumed.n_epochs = 4
    train_alone(resumed)  # epoch 4: 0.6, the new best
    best_now = resumed.checkpointer
    assert ep_files(resumed.run_dir) == ['ep4.pt'] and (best_now.best_epoch,
                                                        best_now.best_val) == (4, 0.6)
    assert ep_files(tmp_path / 'parent') == ['ep1.pt']
    assert (tmp_path / 'parent' / 'ep1.pt').read_bytes() == best
