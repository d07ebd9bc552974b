"""A loader of image files: loader processes decode and transform each image, the device
normalises whole batches (``image_transforms``), in the same ``order.EpochOrder`` as CIFAR
(``order.EpochLoader``)."""
import weakref
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError
from .order import EpochLoader
from .image_transforms import BatchNormalize, TestTransform, TrainTransform, sample_seed


class FileImages(Dataset):
    """The images ``root / paths[i]`` with labels ``labels[i]``, transformed one by one.

    An item's key is (epoch, position): its random transform is drawn from a generator seeded
    with (seed, epoch, position) (``image_transforms.sample_seed``). ``paths`` is a numpy bytes
    array: loader processes forked from this one then share its pages, where a list of Python
    strings would be copied into each of them as they touch the reference counts.
    """

    def __init__(self, root, paths, labels, size, augment, seed):
        self.root, self.paths, self.labels = Path(root), paths, labels
        self.transform = TrainTransform(size) if augment else TestTransform(size)
        self.seed = seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        epoch, i = key
        path = self.root / self.paths[i].decode()
        try:
            with Image.open(path) as img:
                x, alpha = self.transform(img, sample_seed(self.seed, epoch, i))
        except (OSError, ValueError) as e:  # missing, truncated or not an image
            raise DataError(f'cannot read image {path} ({type(e).__name__}: {e})') from None
        return torch.from_numpy(x), alpha, int(self.labels[i])


class _RankBatches:
    """The DataLoader's batch sampler: this rank's part of every batch of the current epoch, as
    keys (epoch, position). Iterated in the main process at the start of each epoch, so the
    epoch reaches persistent loader processes with every key."""

    def __init__(self, loader):
        # a weak reference: a cycle loader -> DataLoader -> sampler -> loader would leave the
        # loader to the garbage collector, which closes the queues to the loader processes
        # before the DataLoader's __del__ can tell them to stop: each then waits out a 5 s
        # timeout
        self.loader = weakref.proxy(loader)

    def __iter__(self):
        epoch = self.loader.epoch
        for idx, lo, hi in self.loader.order.batches(epoch):
            if lo < hi:  # empty: a last evaluation batch smaller than the number of ranks
                yield [(epoch, int(i)) for i in idx[lo:hi]]

    def __len__(self):
        return len(self.loader)


class ImageLoader(EpochLoader):
    """Batches (x, y) on ``device`` of the images ``root / paths[i]`` with labels ``labels[i]``.

    A torch DataLoader with ``n_workers`` persistent processes (0: in this process) reads this
    rank's part of every batch of an ``EpochOrder``, transformed per image (augmented for
    training); batches are pinned on CUDA, copied without blocking, then normalised on the
    device, in channels-last memory if asked.
    """

    def __init__(self, root, paths, labels, batch_size, device, size, augment=False,
                 shuffle=False, drop_last=False, lab_unl_ratio=(0, 0), seed=0, n_workers=0,
                 channels_last=False, rank=0, world_size=1):
        if not isinstance(n_workers, int) or isinstance(n_workers, bool) or n_workers < 0:
            raise ConfigError(f'n_workers must be an integer >= 0, got {n_workers!r}')
        super().__init__(labels, batch_size, device, shuffle, drop_last, lab_unl_ratio, seed,
                         channels_last, rank, world_size)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.normalize = BatchNormalize(self.device, lighting=augment)
        images = FileImages(root, paths, labels, size, augment, seed)
        self._loader = DataLoader(images, batch_sampler=_RankBatches(self), num_workers=n_workers,
                                  pin_memory=self.device.type == 'cuda',
                                  persistent_workers=n_workers > 0)

    def __iter__(self):
        batches = iter(self._loader)
        while True:
            try:
                x, alpha, y = next(batches)
            except StopIteration:
                return
            except DataError as e:  # raised in a loader process: its message is the last line
                raise DataError(str(e).strip().splitlines()[-1].split('DataError: ', 1)[-1]) \
                    from None
            x = x.to(self.device, non_blocking=True)
            alpha = alpha.to(self.device, non_blocking=True)
            x = self.normalize(x, alpha).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)
