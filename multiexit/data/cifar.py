"""CIFAR-10/100: the python-version pickles, and a loader that keeps the images on the training
device as uint8 and augments whole batches there, in an ``order.EpochOrder``; the splits are
drawn as the original drew them (``splits``).
"""
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .data_dir import check_data_dir
from .order import EpochLoader
from .splits import check_class_sizes, check_split_sizes, split_selection


@dataclass(frozen=True)
class CifarSpec:
    folder: str
    train_files: tuple
    test_files: tuple
    label_key: str
    names_file: str
    names_key: str
    n_classes: int
    mean: tuple  # the original's normalisation constants
    std: tuple
    torchvision_class: str


DATASETS = {
    'Cifar100': CifarSpec('cifar-100-python', ('train',), ('test',), 'fine_labels', 'meta',
                          'fine_label_names', 100, (0.507, 0.487, 0.441), (0.267, 0.256, 0.276),
                          'CIFAR100'),
    'Cifar10': CifarSpec('cifar-10-batches-py', tuple(f'data_batch_{i}' for i in range(1, 6)),
                         ('test_batch',), 'labels', 'batches.meta', 'label_names', 10,
                         (0.491, 0.482, 0.447), (0.247, 0.244, 0.262), 'CIFAR10'),
}


def dataset_spec(call):
    if call not in DATASETS:
        raise ConfigError(f"unknown data set call={call!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[call]


def _unpickle(path):
    with open(path, 'rb') as f:
        d = pickle.load(f, encoding='latin1')
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _download(spec, data_dir):
    """Fetch the archive through torchvision; any failure becomes one DataError line."""
    import torchvision  # only needed here

    try:
        getattr(torchvision.datasets, spec.torchvision_class)(str(data_dir), download=True)
    except Exception as e:
        raise DataError(
            f'no {spec.folder}/ in {data_dir} and the download failed ({type(e).__name__}: {e}); '
            f'download it where there is network with: python3 -c "import torchvision; '
            f"torchvision.datasets.{spec.torchvision_class}('{data_dir}', download=True)\"") from None


def load_cifar(call, data_dir, train, download=True):
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of a split of the original files.

    The pickles are read directly (no checksum), so any file in the right format loads.
    """
    spec = dataset_spec(call)
    check_data_dir(data_dir)  # else a download into it fails, blamed on the network
    folder = Path(data_dir) / spec.folder
    files = spec.train_files if train else spec.test_files
    if not all((folder / f).is_file() for f in files):
        if not download:
            raise DataError(f'missing {folder}/ ({", ".join(files)})')
        _download(spec, Path(data_dir))
    images, labels = [], []
    for f in files:
        try:
            d = _unpickle(folder / f)
            images.append(np.asarray(d['data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(d[spec.label_key], dtype=np.int64))
        except Exception as e:
            raise DataError(f'cannot read {folder / f} as a CIFAR pickle ({type(e).__name__}: {e}); '
                            f'delete {folder} and download it again') from None
    return np.concatenate(images), np.concatenate(labels)


class DeviceLoader(EpochLoader):
    """Batches from a uint8 copy of the split that lives on ``device``, in an ``EpochOrder``.

    Augmentation (horizontal flip, normalisation, shift by up to ``pad`` pixels filled with 0
    after normalisation, i.e. with the mean colour) runs on whole batches, drawn from a
    generator seeded with (seed, epoch). Sharded, every rank draws the augmentation of the whole
    batch and takes its part: an example is augmented as it would be by a single process.
    """

    def __init__(self, images, labels, batch_size, mean, std, device, augment=False,
                 shuffle=False, drop_last=False, lab_unl_ratio=(0, 0), pad=4, seed=0,
                 channels_last=False, rank=0, world_size=1):
        super().__init__(labels, batch_size, device, shuffle, drop_last, lab_unl_ratio, seed,
                         channels_last, rank, world_size)
        self.images = torch.as_tensor(images, dtype=torch.uint8).to(self.device)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.augment, self.pad, self.seed = augment, pad, seed
        self.generator = torch.Generator(device=self.device)

    def normalize(self, x):
        return (x.float().div_(255) - self.mean) / self.std

    def draw_augmentation(self, b):
        """(flip (b,), shift (2, b, 1)) for a batch of ``b``, drawn from ``self.generator``."""
        g, dev = self.generator, self.device
        flip = torch.rand(b, generator=g, device=dev) < 0.5
        return flip, torch.randint(-self.pad, self.pad + 1, (2, b, 1), generator=g, device=dev)

    def augment_batch(self, x, draws=None):
        """Flip, normalise and shift a uint8 batch with ``draws`` (default: new ones)."""
        b, _, h, w = x.shape
        dev = self.device
        flip, shift = draws if draws is not None else self.draw_augmentation(b)
        x = self.normalize(torch.where(flip[:, None, None, None], x.flip(3), x))
        x = F.pad(x, (self.pad,) * 4)  # zeros after normalisation: the mean colour
        rows = torch.arange(h, device=dev) + self.pad + shift[0]  # (b, h)
        cols = torch.arange(w, device=dev) + self.pad + shift[1]
        batch = torch.arange(b, device=dev)[:, None, None]
        # advanced indices around a slice: the result is (b, h, w, c), i.e. channels-last memory
        return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def __iter__(self):
        self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        for idx, lo, hi in self.order.batches(self.epoch, self.device):
            draws = self.draw_augmentation(len(idx)) if self.augment else None
            if lo == hi:  # a last evaluation batch smaller than the number of ranks
                continue
            x, y = self.images[idx[lo:hi]], self.labels[idx[lo:hi]]
            x = (self.augment_batch(x, (draws[0][lo:hi], draws[1][:, lo:hi])) if self.augment
                 else self.normalize(x))
            yield x.contiguous(memory_format=self.memory_format), y


def build_split(cf_data, split, data_dir, batch_size, device, seed=0, download=True,
                channels_last=False, rank=0, world_size=1):
    """DeviceLoader for 'train', 'val' or 'test' from a config dict such as ``cf_trn``.

    Keys: ``call`` ('Cifar100' | 'Cifar10'), ``n_per_class``, ``nval_per_class``, ``augment``,
    ``seed`` (the subset seed), ``n_unl_per_class``, ``lab_unl_ratio``. ``seed`` here is the
    run's seed for the epoch order and augmentation; ``rank`` and ``world_size`` shard the
    batches (see DeviceLoader). Returns (loader, n_classes).
    """
    cf = dict(cf_data)
    call = cf.pop('call', None)
    spec = dataset_spec(call)
    n_per_class = cf.pop('n_per_class', None)
    nval_per_class = cf.pop('nval_per_class', None)
    augment = bool(cf.pop('augment', False))
    subset_seed = cf.pop('seed', 0)
    n_unl = cf.pop('n_unl_per_class', 0) or 0
    lab_unl_ratio = tuple(cf.pop('lab_unl_ratio', (0, 0)))
    if cf:
        raise ConfigError(f'unknown data keys {sorted(cf)}; known: call, n_per_class, '
                          'nval_per_class, augment, seed, n_unl_per_class, lab_unl_ratio')
    check_split_sizes(split, n_per_class, nval_per_class)
    images, labels = load_cifar(call, data_dir, train=split != 'test', download=download)
    if labels.max() >= spec.n_classes:
        raise DataError(f'labels up to {labels.max()} in {data_dir}/{spec.folder} but '
                        f'{spec.n_classes} classes expected')
    if split != 'test':
        check_class_sizes(labels, n_per_class, nval_per_class, n_unl, range(spec.n_classes),
                          Path(data_dir) / spec.folder)
    idx, mapped = split_selection(labels, split, n_per_class, nval_per_class, subset_seed,
                                  n_unl, spec.n_classes)
    train = split == 'train'
    loader = DeviceLoader(images[idx], mapped, batch_size, spec.mean, spec.std, device,
                          augment=augment and train, shuffle=train, drop_last=train,
                          lab_unl_ratio=lab_unl_ratio, seed=seed, channels_last=channels_last,
                          rank=rank, world_size=world_size)
    return loader, spec.n_classes


def write_fake_cifar(data_dir, call='Cifar100', n_train_per_class=10, n_test_per_class=4, seed=0):
    """Write a small learnable data set in the exact format of the python-version pickles.

    Each class is a smooth random colour pattern plus noise, so a tiny network learns it. The
    folder appears atomically (written aside, then renamed), so concurrent runs that generate
    it at once never read a half-written file; an existing folder is left as it is.
    """
    spec = dataset_spec(call)
    check_data_dir(data_dir)
    folder = Path(data_dir) / spec.folder
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{spec.folder}.', dir=folder.parent))
    rs = np.random.RandomState(seed)
    protos = rs.uniform(40, 215, size=(spec.n_classes, 3, 4, 4))
    protos = protos.repeat(8, axis=2).repeat(8, axis=3)  # (classes, 3, 32, 32)

    def make(n_per_class):
        labels = np.repeat(np.arange(spec.n_classes), n_per_class)
        rs.shuffle(labels)
        noise = rs.normal(0, 25, size=(len(labels), 3, 32, 32))
        data = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8).reshape(len(labels), -1)
        return data, labels

    def dump(name, data, labels):
        d = {'data': data, spec.label_key: labels.tolist(),
             'filenames': [f'fake_{i}.png' for i in range(len(labels))]}
        if call == 'Cifar100':
            d['coarse_labels'] = (labels // 5).tolist()
        with open(tmp / name, 'wb') as f:
            pickle.dump(d, f, protocol=2)

    train_data, train_labels = make(n_train_per_class)
    chunks = np.array_split(np.arange(len(train_labels)), len(spec.train_files))
    for name, part in zip(spec.train_files, chunks):
        dump(name, train_data[part], train_labels[part])
    dump(spec.test_files[0], *make(n_test_per_class))
    with open(tmp / spec.names_file, 'wb') as f:
        pickle.dump({spec.names_key: [f'class{k}' for k in range(spec.n_classes)]}, f, protocol=2)
    try:
        tmp.rename(folder)
    except OSError:  # another process got there first: keep its copy
        shutil.rmtree(tmp)
    return folder


class Cifar100:
    """CIFAR-100 in ``data_dir/cifar-100-python/`` (downloaded there if missing), a data set of
    ``multiexit.data``; the keyword arguments are the keys of ``build_split``'s dict."""
    input_size = 32

    def __init__(self, n_per_class=None, nval_per_class=None, augment=False, seed=0,
                 n_unl_per_class=0, lab_unl_ratio=(0, 0)):
        self.cf = dict(call=type(self).__name__, n_per_class=n_per_class,
                       nval_per_class=nval_per_class, augment=augment, seed=seed,
                       n_unl_per_class=n_unl_per_class, lab_unl_ratio=lab_unl_ratio)

    def n_classes(self, data_dir):
        return dataset_spec(self.cf['call']).n_classes

    def loader(self, split, data_dir, batch_size, device, seed=0, channels_last=False, rank=0,
               world_size=1):
        return build_split(self.cf, split, data_dir, batch_size, device, seed=seed,
                           channels_last=channels_last, rank=rank, world_size=world_size)[0]

    def write_fake(self, data_dir):
        write_fake_cifar(data_dir, self.cf['call'], n_train_per_class=30, n_test_per_class=10)


class Cifar10(Cifar100):
    """CIFAR-10 in ``data_dir/cifar-10-batches-py/``."""
