"""Checkpoint files: atomic writes, and loading that never runs code.

A training run folder ``snapshots/<run id>/`` holds ``last.pt`` (everything needed to continue
exactly, rewritten after every epoch) and ``ep<N>.pt`` model snapshots (the best one by
validation ``acc1_avg`` when ``save_interval == 0``, else one every ``save_interval`` epochs),
each with its ``cf_net``, epoch and validation metrics.

torch is imported by the functions that read or write checkpoints only: finding runs by name
(``multiexit.runs``, the grid) needs no torch, whose import takes seconds.
"""
import math
import os
import pickle
import secrets
import shutil
from pathlib import Path

from ..errors import CheckpointWriteError, Resume, SnapshotError

LAST = 'last.pt'


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk leaves either the old file or the new one, never a torn one.
    """
    import torch
    path = Path(path)
    fd, tmp = _new_temporary(path)
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


def _new_temporary(path):
    """(descriptor, path) of a new file beside ``path``, created as open() creates files: mode
    0666 less the umask, as sacred's other run files (tempfile.mkstemp's 0600 would hide the
    weights from colleagues on a shared file system)."""
    while True:
        tmp = path.parent / f'.{path.name}.{secrets.token_hex(4)}.tmp'
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def load(path, mmap=False):
    """``torch.load(weights_only=True)`` with one clear error line for every failure;
    ``mmap``: the tensors are read only where used (to look at a checkpoint's other values)."""
    import torch
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


def model_snapshot(model, cf_net, epoch, val_metrics):
    """Contents of an ``ep<N>.pt`` file: plain tensors and Python values only."""
    return {'format': 'multiexit-model-1', 'model': model.state_dict(), 'cf_net': cf_net,
            'epoch': epoch, 'val_metrics': val_metrics}


def unpack_model(ckpt, path, cf_net_default=None):
    """(state_dict, cf_net, extra) from any checkpoint we can evaluate.

    Our files carry ``model`` and ``cf_net``; a file of the original code is a bare state dict
    (tensors only), whose architecture must then come from ``cf_net_default``.
    """
    import torch
    if isinstance(ckpt, dict) and 'model' in ckpt and 'cf_net' in ckpt:
        return ckpt['model'], ckpt['cf_net'], ckpt
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        if cf_net_default is None:
            raise SnapshotError(f'{path} is a bare state dict (original format): set cf_net to '
                                f'its architecture')
        return ckpt, cf_net_default, {}
    raise SnapshotError(f'{path} is not a multiexit checkpoint nor a state dict')



class Checkpointer:
    """Writes one run's checkpoints into ``run_dir`` and keeps their account, as timm's
    CheckpointSaver does: after every epoch ``last.pt``, the training state that continues the
    run exactly; and a model snapshot ``ep<N>.pt`` of the best epoch so far by validation
    acc1_avg (``save_interval`` 0: the previous best goes once last.pt names the new one) or of
    every ``save_interval``-th epoch. Only the main process ``writes``; every process keeps the
    same account. ``last_good``: (path, epoch) of the newest complete training state, or None.
    """

    def __init__(self, run_dir, save_interval, writes=True):
        self.run_dir, self.save_interval, self.writes = Path(run_dir), save_interval, writes
        self.best_val, self.best_epoch = -math.inf, None
        self.last_good = None

    def continue_from(self, path, epoch, best_val, best_epoch):
        """Take over the account of the run whose training state ``path`` holds ``epoch``;
        its best snapshot so far moves along into this run."""
        self.best_val, self.best_epoch = best_val, best_epoch
        self.last_good = (Path(path), epoch)
        best = Path(path).parent / f'ep{best_epoch}.pt'
        if self.writes and best_epoch is not None and best.is_file() and not self.save_interval:
            shutil.copy2(best, self.run_dir / best.name)

    def save(self, epoch, val_metrics, training_state, model_snapshot):
        """The checkpoints of ``epoch``, validated with ``val_metrics``: ``training_state()`` and
        ``model_snapshot()`` give the contents (after the account is updated, which the training
        state holds). CheckpointWriteError if a file cannot be written (the previous training
        state is intact)."""
        new_best = not self.save_interval and val_metrics['acc1_avg'] > self.best_val
        old_best = self.best_epoch
        if new_best:
            self.best_epoch = epoch
        self.best_val = max(self.best_val, val_metrics['acc1_avg'])
        if self.writes:
            try:
                if new_best or (self.save_interval and epoch % self.save_interval == 0):
                    save_atomic(model_snapshot(), self.run_dir / f'ep{epoch}.pt')
                save_atomic(training_state(), self.run_dir / LAST)
            except OSError as e:
                raise CheckpointWriteError(
                    f'could not write a checkpoint to {self.run_dir} ({e.strerror or e}); ',
                    *self.resume_parts(), ' once the problem (disk space?) is fixed') from None
            if new_best and old_best is not None:  # only once last.pt names the new best
                (self.run_dir / f'ep{old_best}.pt').unlink(missing_ok=True)
        self.last_good = (self.run_dir / LAST, epoch)

    def resume_parts(self):
        """The parts of a message that say where the last complete state is and how to continue
        from it."""
        if self.last_good is None:
            return ('no epoch had finished, so there is nothing to resume: start the run again',)
        path, epoch = self.last_good
        return f'{path} holds epoch {epoch}; resume with: ', Resume(path.parent)
