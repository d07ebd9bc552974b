"""Checkpoints: atomic writes, loading that never runs code, and finding snapshots.

A training run directory ``snapshots/<run id>/`` (written by sacred) holds:
- ``last.pt``: everything needed to continue exactly (rewritten after every epoch);
- ``ep<N>.pt``: model snapshots (the best one by validation ``acc1_avg`` when
  ``save_interval == 0``, else one every ``save_interval`` epochs), each with its ``cf_net``,
  epoch and validation metrics.
"""
import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import SnapshotError

LAST = 'last.pt'
EPOCH_FILE = re.compile(r'^ep(\d+)\.pt$')


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path, mmap=False):
    """``torch.load(weights_only=True)`` with one clear error line for every failure;
    ``mmap``: the tensors are read only where used (to look at a checkpoint's other values)."""
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f'no checkpoint file {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = [line for line in str(e).splitlines() if 'GLOBAL' in line]
        if reason:  # the file wants to import (and so possibly run) code
            raise SnapshotError(f'refused to load {path}: loading it would import code '
                                f'({reason[0].strip()}); only tensors and plain Python values '
                                f'are accepted') from None
        raise _unreadable(path, e) from None
    except Exception as e:  # zip, pickle, storage and I/O errors of a broken file
        raise _unreadable(path, e) from None


def _unreadable(path, e):
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = f'{type(e).__name__}: {lines[-1] if lines else ""}'
    return SnapshotError(f'cannot read checkpoint {path} ({detail[:200]}); it is truncated or '
                         f'not a checkpoint: use another epoch or retrain')


def is_run_dir(path):
    path = Path(path)
    return (path / LAST).is_file() or any(EPOCH_FILE.match(p.name) for p in path.glob('ep*.pt'))


def run_config(run_dir):
    """The config.json of a run folder as a dict, or None where there is none readable."""
    try:
        return json.loads((Path(run_dir) / 'config.json').read_text())
    except (OSError, ValueError):
        return None


def resolve(name, snapshot_dir='snapshots'):
    """Path of a checkpoint file or training run directory named by ``name``.

    ``name`` may be a path (file or run directory), a run id (a folder of ``snapshot_dir``) or
    the ``snapshot_name`` given at training (the most recent training run with that name).
    """
    name = str(name).strip()
    if not name:
        raise SnapshotError('no snapshot given: set snapshot_name=<run id, snapshot name or path>')
    snapshot_dir = Path(snapshot_dir)
    for path in (Path(name), snapshot_dir / name):
        if path.is_file() or (path.is_dir() and is_run_dir(path)):
            return path
        if path.is_dir():
            raise SnapshotError(f'{path} holds no checkpoint ({LAST} or ep<N>.pt): not a '
                                f'training run, or it stopped before its first epoch')
    runs = []
    if snapshot_dir.is_dir():
        for run in snapshot_dir.iterdir():
            cf = run_config(run) if run.is_dir() else None
            if cf and cf.get('snapshot_name') == name and is_run_dir(run):
                runs.append(run)
    if not runs:
        raise SnapshotError(f'no snapshot {name!r}: not a path, not a run id in {snapshot_dir}/ '
                            f'and no training run there has snapshot_name={name!r} '
                            f'(ls {snapshot_dir} lists the runs)')
    return max(runs, key=lambda r: (r.stat().st_mtime, r.name))


def recorded_seed(name, snapshot_dir='snapshots'):
    """The seed that the training state named by ``name`` (as ``resolve`` takes it) was trained
    with: what orders its data and draws its augmentation. None for a model snapshot."""
    path = resolve(name, snapshot_dir)
    ckpt = load(path / LAST if path.is_dir() else path, mmap=True)
    return ckpt.get('seed') if isinstance(ckpt, dict) and 'optimizer' in ckpt else None


def epoch_files(run_dir):
    """{epoch: path} of the ``ep<N>.pt`` model snapshots of a run."""
    out = {}
    for p in Path(run_dir).glob('ep*.pt'):
        m = EPOCH_FILE.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def pick_checkpoint(path, which='best'):
    """The checkpoint file to evaluate: ``path`` itself if a file, else from a run directory.

    ``which``: 'best' (highest validation acc1_avg among the ep<N>.pt files), 'last', or an
    epoch number.
    """
    path = Path(path)
    if path.is_file():
        return path
    if which == 'last':
        return path / LAST
    files = epoch_files(path)
    if which == 'best':
        if not files:
            raise SnapshotError(f'{path} has no ep<N>.pt snapshot; use checkpoint=last')
        score = lambda ep: load(files[ep]).get('val_metrics', {}).get('acc1_avg', float('-inf'))
        return files[max(files, key=score)]
    try:
        return files[int(which)]
    except (KeyError, ValueError):
        raise SnapshotError(f"no checkpoint {which!r} in {path}: use 'best', 'last' or one of the "
                            f'epochs {sorted(files)}') from None


def model_snapshot(model, cf_net, epoch, val_metrics):
    """Contents of an ``ep<N>.pt`` file: plain tensors and Python values only."""
    return {'format': 'multiexit-model-1', 'model': model.state_dict(), 'cf_net': cf_net,
            'epoch': epoch, 'val_metrics': val_metrics}


def unpack_model(ckpt, path, cf_net_default=None):
    """(state_dict, cf_net, extra) from any checkpoint we can evaluate.

    Our files carry ``model`` and ``cf_net``; a file of the original code is a bare state dict
    (tensors only), whose architecture must then come from ``cf_net_default``.
    """
    if isinstance(ckpt, dict) and 'model' in ckpt and 'cf_net' in ckpt:
        return ckpt['model'], ckpt['cf_net'], ckpt
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        if cf_net_default is None:
            raise SnapshotError(f'{path} is a bare state dict (original format): set cf_net to '
                                f'its architecture')
        return ckpt, cf_net_default, {}
    raise SnapshotError(f'{path} is not a multiexit checkpoint nor a state dict')
