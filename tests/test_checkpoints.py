import json
import os
import pickle

import pytest
import torch

from multiexit import checkpoints
from multiexit.errors import SnapshotError


def test_atomic_save_roundtrip_leaves_no_temporary(tmp_path):
    path = tmp_path / 'a.pt'
    checkpoints.save_atomic({'w': torch.arange(3)}, path)
    checkpoints.save_atomic({'w': torch.arange(4)}, path)
    assert checkpoints.load(path)['w'].tolist() == [0, 1, 2, 3]
    assert os.listdir(tmp_path) == ['a.pt']


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'last.pt'
    checkpoints.save_atomic({'epoch': 1}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(OSError, match='No space'):
        checkpoints.save_atomic({'epoch': 2}, path)
    monkeypatch.undo()
    assert checkpoints.load(path) == {'epoch': 1} and os.listdir(tmp_path) == ['last.pt']


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
        checkpoints.load(path)
    assert not target.exists()
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump(Payload(str(target)), f)
    with pytest.raises(SnapshotError):
        checkpoints.load(tmp_path / 'evil.pkl')
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
        checkpoints.load(path)
    assert str(path) in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_checkpoints_follow_the_umask_like_the_other_run_files(tmp_path, umask, mode):
    """Colleagues on a shared file system read the weights as they read config.json."""
    previous = os.umask(umask)
    try:
        checkpoints.save_atomic({'w': torch.arange(3)}, tmp_path / 'last.pt')
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
        checkpoints.save_atomic({'epoch': 1}, run / f)
    return run


def test_resolve_by_id_name_path_and_unknown(tmp_path):
    snaps = tmp_path / 'snapshots'
    r1 = make_run(snaps, 1, 'dbt:0')
    r2 = make_run(snaps, 2, 'dbt:0', files=('ep3.pt',))
    eval_run = make_run(snaps, 3, 'dbt:0', files=())  # an eval run: no checkpoints
    os.utime(r1, (1, 1))
    assert checkpoints.resolve('1', snaps) == r1
    assert checkpoints.resolve('dbt:0', snaps) == r2  # the most recent training run of that name
    assert checkpoints.resolve(str(r2 / 'ep3.pt'), snaps) == r2 / 'ep3.pt'
    with pytest.raises(SnapshotError, match="no snapshot 'nope'"):
        checkpoints.resolve('nope', snaps)
    with pytest.raises(SnapshotError, match='holds no checkpoint'):
        checkpoints.resolve(str(eval_run), snaps)


def test_a_name_takes_the_newest_completed_run_and_says_which(tmp_path):
    snaps = tmp_path / 'snapshots'
    old = make_run(snaps, 1, 'dbt:0', status='COMPLETED')
    done = make_run(snaps, 2, 'dbt:0', status='COMPLETED')
    make_run(snaps, 3, 'dbt:0', status='INTERRUPTED')  # the newest, unfinished
    make_run(snaps, 4, 'dbt:0', files=(), status='COMPLETED', experiment='eval')
    for age, run in enumerate([old, done]):
        os.utime(run, (age, age))
    said = []
    assert checkpoints.resolve('dbt:0', snaps, say=said.append) == done
    assert said == ["snapshot_name='dbt:0': run 2 (COMPLETED, the newest COMPLETED of 3 runs "
                    "with that name; newer but unfinished: run 3 (INTERRUPTED))"]
    said.clear()
    assert checkpoints.resolve('2', snaps, say=said.append) == done and said == []
    lone = make_run(snaps, 5, 'lone', status='INTERRUPTED')
    assert checkpoints.resolve('lone', snaps, say=said.append) == lone
    assert said == ["snapshot_name='lone': run 5 (INTERRUPTED)"]


def test_a_named_run_without_checkpoint_is_named_as_such(tmp_path):
    """Not 'no run has that name': the run exists, it has no checkpoint, and which one it is."""
    snaps = tmp_path / 'snapshots'
    make_run(snaps, 1, 'test:0', files=(), status='FAILED')
    make_run(snaps, 2, 'test:0', files=(), status='COMPLETED', experiment='eval')
    with pytest.raises(SnapshotError) as e:
        checkpoints.resolve('test:0', snaps)
    assert not isinstance(e.value, checkpoints.UnknownSnapshot)
    assert str(e.value).startswith(
        "snapshot_name='test:0' is the name of training run 1 (FAILED) in "
        f"{snaps}/, but no epoch of it finished, so there is no checkpoint")
    with pytest.raises(checkpoints.UnknownSnapshot, match="no snapshot 'nope'"):
        checkpoints.resolve('nope', snaps)


def test_pick_checkpoint_best_last_epoch(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    for ep, acc in [(5, 0.3), (10, 0.5), (15, 0.4)]:
        checkpoints.save_atomic({'epoch': ep, 'val_metrics': {'acc1_avg': acc}}, run / f'ep{ep}.pt')
    assert checkpoints.pick_checkpoint(run, 'best').name == 'ep10.pt'
    assert checkpoints.pick_checkpoint(run, 15).name == 'ep15.pt'
    assert checkpoints.pick_checkpoint(run, 'last').name == 'last.pt'
    with pytest.raises(SnapshotError, match=r'\[5, 10, 15\]'):
        checkpoints.pick_checkpoint(run, 7)
