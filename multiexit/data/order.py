"""The order in which an epoch visits a split's examples, cut into batches, each process's part
of a batch, and the loader base that every data set of ``multiexit.data`` builds on."""
import numpy as np
import torch

from ..errors import ConfigError
from ..losses import IGNORE


def check_divisible(batch_size, world_size):
    """Training batches are split into equal parts, one per process."""
    if batch_size % world_size:
        raise ConfigError(f'batch_size={batch_size} is not divisible by the {world_size} '
                          f'processes: each takes batch_size/{world_size} examples of every batch '
                          f'(the global batch stays batch_size)')


class EpochOrder:
    """Which examples an epoch visits, in which order, cut into batches, and each process's part.

    Each epoch is one permutation (from a generator seeded with (seed, epoch), so a run resumed
    at an epoch boundary sees the same data) cut into batches of ``batch_size``; with
    ``drop_last`` the incomplete last one is dropped. With unlabelled examples (label -100) and
    ``lab_unl_ratio=(r_lab, r_unl)``, epochs interleave r_lab labelled and r_unl unlabelled
    examples as the original did.

    Sharded (``world_size`` > 1, one order per rank): every rank computes the same batches and
    takes the ``rank``-th of ``world_size`` consecutive parts of each, so the ranks together see
    exactly the single-process batches, with the same number of steps. With ``drop_last``
    (training) the parts must have equal sizes; otherwise they differ by at most one and every
    example is seen once.
    """

    def __init__(self, labels, batch_size, shuffle=False, drop_last=False, lab_unl_ratio=(0, 0),
                 seed=0, rank=0, world_size=1):
        if drop_last:
            check_divisible(batch_size, world_size)
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        unl = (torch.as_tensor(labels) == IGNORE).numpy()
        self._lab_pos = np.where(~unl)[0]
        self._unl_pos = np.where(unl)[0]
        self.r_lab, self.r_unl = lab_unl_ratio
        if len(self._unl_pos) and not (self.r_lab or self.r_unl):
            raise ConfigError('unlabelled examples need lab_unl_ratio=(r_lab, r_unl), e.g. (1, 1)')

    def positions(self, epoch):
        """Order of the examples in ``epoch`` (CPU)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        lab, unl = torch.from_numpy(self._lab_pos), torch.from_numpy(self._unl_pos)
        perm = lambda idx: idx[torch.randperm(len(idx), generator=g)] if self.shuffle else idx
        if not len(unl) or self.r_unl == 0:
            return perm(lab)
        if self.r_lab == 0:
            return perm(unl)
        n_tup = min(len(lab) // self.r_lab, len(unl) // self.r_unl)
        rows = torch.cat([perm(lab)[:n_tup * self.r_lab].view(self.r_lab, n_tup),
                          perm(unl)[:n_tup * self.r_unl].view(self.r_unl, n_tup)])
        return rows.T.reshape(-1)

    def n_examples(self):
        """How many examples every epoch visits (``len(positions(epoch))``, without drawing)."""
        lab, unl = len(self._lab_pos), len(self._unl_pos)
        if not unl or self.r_unl == 0:
            return lab
        if self.r_lab == 0:
            return unl
        return min(lab // self.r_lab, unl // self.r_unl) * (self.r_lab + self.r_unl)

    def n_batches(self):
        n = self.n_examples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, epoch, device='cpu'):
        """(positions of the whole batch on ``device``, lo, hi) per batch: this rank's part is
        ``[lo:hi]``, which is empty for a last evaluation batch smaller than the number of
        ranks. The positions move to ``device`` once per epoch."""
        pos = self.positions(epoch).to(device)
        n = len(pos) - len(pos) % self.batch_size if self.drop_last else len(pos)
        for start in range(0, n, self.batch_size):
            idx = pos[start:start + self.batch_size]
            b = len(idx)
            yield idx, self.rank * b // self.world_size, (self.rank + 1) * b // self.world_size


class EpochLoader:
    """What the loaders of every data set (``multiexit.data``) share: their ``EpochOrder``,
    the epoch that ``set_epoch`` chose, ``len()`` (its batches), and the device and memory
    format of the batches."""

    def __init__(self, labels, batch_size, device, shuffle=False, drop_last=False,
                 lab_unl_ratio=(0, 0), seed=0, channels_last=False, rank=0, world_size=1):
        self.order = EpochOrder(labels, batch_size, shuffle, drop_last, lab_unl_ratio, seed,
                                rank, world_size)
        self.world_size = world_size
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.order.n_batches()
