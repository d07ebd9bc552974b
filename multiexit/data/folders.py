"""Data sets stored as image files, in two layouts, as data sets of ``multiexit.data``.

- ``ImageFolder``: ``data_dir/train/<class>/...`` and ``data_dir/val/<class>/...``, read as
  torchvision's ImageFolder reads them: the classes are the sorted folder names of ``train/``
  (label = position), the image files of a class (at any depth, torchvision's extensions) are
  sorted by path.
- ``ImageNet``: the original code's ImageNet layout in ``data_dir``: ``classes.csv``
  (tab-separated, a header, columns ``synset`` and ``n``, the class's number of training images;
  label = row order), ``trn_images/<synset>/`` (its images, sorted by path here: the original
  indexed ``os.listdir``, whose order is the file system's), ``val_images/`` with
  ``ILSVRC2012_val_<i as 8 digits>.JPEG`` for i = 1, 2, ... and ``val_targets.csv`` (a header,
  column ``target``: on row i the label of image i + 1).

The validation split is held out of the training images per class with a seed and the labels
are permuted, exactly as for CIFAR (``splits.split_selection``); the test split is the validation
folder. Each file list is made once per process, sorted; paths are kept as one numpy bytes array.
"""
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import ConfigError, DataError
from .data_dir import check_data_dir
from .image_loader import ImageLoader
from .splits import check_class_sizes, check_split_sizes, split_selection

DOCS = 'docs/imagenet.md'


@dataclass(frozen=True)
class Files:
    """Image files: ``root / paths[i]`` (bytes) shows class ``labels[i]`` of ``classes``."""
    root: Path
    paths: np.ndarray
    labels: np.ndarray
    classes: tuple


@functools.lru_cache(maxsize=8)
def _scan(directory, classes, allow_empty):
    """Files of ``directory/<class>/`` for ``classes`` (label = position), as torchvision's
    ``make_dataset`` finds them; ``allow_empty``: classes without a folder or image pass."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset  # lazily: imagenet_resnet

    try:
        found = make_dataset(directory, {c: k for k, c in enumerate(classes)}, IMG_EXTENSIONS,
                             allow_empty=allow_empty)
    except FileNotFoundError as e:
        raise DataError(f'{directory}: {e}') from None
    start = len(directory) + 1  # make_dataset joins directory, class and file names
    paths = np.array([p[start:].encode() for p, _ in found], dtype=np.bytes_)
    labels = np.array([k for _, k in found], dtype=np.int64)
    return Files(Path(directory), paths, labels, classes)


def _need_dir(path, what):
    if not path.is_dir():
        raise DataError(f'no {path}/ ({what}); see {DOCS} for the layouts')


def folder_classes(data_dir):
    """The class names of ``data_dir/train/``, sorted."""
    check_data_dir(data_dir)
    train = Path(data_dir) / 'train'
    _need_dir(train, 'an image folder holds train/<class>/ and val/<class>/')
    from torchvision.datasets.folder import find_classes

    try:
        return tuple(find_classes(train)[0])
    except FileNotFoundError:
        raise DataError(f'{train}/ has no class folder; see {DOCS}') from None


def folder_files(data_dir, test):
    """The files of ``train/`` or, ``test``, of ``val/`` with ``train/``'s classes."""
    classes = folder_classes(data_dir)
    split = Path(data_dir) / ('val' if test else 'train')
    _need_dir(split, 'the test split of an image folder')
    if test:
        unknown = sorted({e.name for e in os.scandir(split) if e.is_dir()} - set(classes))
        if unknown:
            raise DataError(f'{split}/ has classes that train/ lacks: {", ".join(unknown[:5])}')
    return _scan(str(split), classes, allow_empty=test)


def _read_csv(path, columns, **kwargs):
    if not path.is_file():
        raise DataError(f'no {path} (the original ImageNet layout); see {DOCS}')
    try:
        table = pd.read_csv(path, **kwargs)
    except (OSError, ValueError) as e:
        raise DataError(f'cannot read {path} ({type(e).__name__}: {e})') from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f'{path} has no column {missing[0]!r} (its columns: '
                        f'{", ".join(map(str, table.columns))}); see {DOCS}')
    return table


def original_classes(data_dir):
    """(synsets in the order of classes.csv, their numbers of training images)."""
    check_data_dir(data_dir)
    table = _read_csv(Path(data_dir) / 'classes.csv', ('synset', 'n'), sep='\t')
    return tuple(table['synset'].astype(str)), table['n'].to_numpy(dtype=np.int64)


def original_files(data_dir, test):
    """The files of ``trn_images/``, or, ``test``, of ``val_images/``."""
    data_dir = Path(data_dir)
    classes, counts = original_classes(data_dir)
    if not test:
        _need_dir(data_dir / 'trn_images', 'the training images of the original layout')
        files = _scan(str(data_dir / 'trn_images'), classes, allow_empty=False)
        found = np.bincount(files.labels, minlength=len(classes))
        wrong = np.flatnonzero(found != counts)
        if len(wrong):
            k = wrong[0]
            raise DataError(f'classes.csv gives {classes[k]} {counts[k]} images but '
                            f'{files.root / classes[k]}/ holds {found[k]}')
        return files
    val = data_dir / 'val_images'
    _need_dir(val, 'the test images of the original layout')
    targets = _read_csv(data_dir / 'val_targets.csv', ('target',))['target'].to_numpy(np.int64)
    names = [f'ILSVRC2012_val_{i + 1:08d}.JPEG' for i in range(len(targets))]
    missing = sorted(set(names) - set(os.listdir(val)))
    if missing:
        raise DataError(f'val_targets.csv has {len(targets)} rows but {val}/ lacks {missing[0]} '
                        f'({len(missing)} missing)')
    if len(targets) and not 0 <= targets.min() <= targets.max() < len(classes):
        raise DataError(f'val_targets.csv has targets outside 0..{len(classes) - 1}')
    return Files(val, np.array([n.encode() for n in names], dtype=np.bytes_), targets, classes)


class ImageFolder:
    """Images in ``data_dir/train/<class>/`` and ``data_dir/val/<class>/`` (module docstring).

    ``n_per_class`` images are drawn per class from train/ (None: all), of which
    ``nval_per_class`` are held out for validation; ``seed`` draws them and the class
    permutation; ``n_unl_per_class`` and ``lab_unl_ratio`` are the semi-supervised setting (as
    for CIFAR). ``augment``: the original's ImageNet augmentation for training
    (``image_transforms``); ``image_size``: the side of the crops; ``n_workers``: loader
    processes per training process (0: none; None: 8, or as many as this process has cores
    if fewer).
    """

    def __init__(self, n_per_class=None, nval_per_class=None, augment=False, seed=0,
                 image_size=224, n_workers=None, n_unl_per_class=0, lab_unl_ratio=(0, 0)):
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ConfigError(f'image_size must be an integer > 0, got {image_size!r}')
        self.n_per_class, self.nval_per_class = n_per_class, nval_per_class
        self.augment, self.seed = augment, seed
        self.image_size = image_size
        self.n_workers = min(8, len(os.sched_getaffinity(0))) if n_workers is None else n_workers
        self.n_unl_per_class, self.lab_unl_ratio = n_unl_per_class or 0, tuple(lab_unl_ratio)

    @property
    def input_size(self):
        return self.image_size

    def classes(self, data_dir):
        return folder_classes(data_dir)

    def files(self, data_dir, test):
        return folder_files(data_dir, test)

    def n_classes(self, data_dir):
        return len(self.classes(data_dir))

    def loader(self, split, data_dir, batch_size, device, seed=0, channels_last=False, rank=0,
               world_size=1):
        """An ``image_loader.ImageLoader`` of 'train', 'val' or 'test' (see datasets)."""
        check_split_sizes(split, self.n_per_class, self.nval_per_class)
        test, train = split == 'test', split == 'train'
        files = self.files(data_dir, test)
        if not test:
            check_class_sizes(files.labels, self.n_per_class, self.nval_per_class,
                              self.n_unl_per_class, files.classes, files.root)
        idx, labels = split_selection(files.labels, split, self.n_per_class, self.nval_per_class,
                                      self.seed, self.n_unl_per_class, len(files.classes))
        return ImageLoader(files.root, files.paths[idx], labels, batch_size, device,
                           self.image_size, augment=self.augment and train, shuffle=train,
                           drop_last=train, lab_unl_ratio=self.lab_unl_ratio, seed=seed,
                           n_workers=self.n_workers, channels_last=channels_last, rank=rank,
                           world_size=world_size)

    def write_fake(self, data_dir):
        write_fake_image_folders(data_dir)


class ImageNet(ImageFolder):
    """Images in the original code's ImageNet layout (module docstring); the arguments are
    ImageFolder's."""

    def classes(self, data_dir):
        return original_classes(data_dir)[0]

    def files(self, data_dir, test):
        return original_files(data_dir, test)


def write_fake_image_folders(data_dir, n_classes=5, n_train_per_class=10, n_val_per_class=4,
                             seed=0):
    """A small learnable data set of JPEG files in both layouts (the same files in each).

    Each class is a 3x3 pattern of colours, stretched to a random size between 48 and 96 pixels
    a side, plus noise; every fifth image is greyscale, as some of ImageNet's are. The test
    images are numbered in a shuffled class order. The folder appears atomically (written aside,
    then renamed); an existing one is left as it is.
    """
    check_data_dir(data_dir)
    data_dir = Path(data_dir)
    if data_dir.is_dir():
        return data_dir
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{data_dir.name}.', dir=data_dir.parent))
    rs = np.random.RandomState(seed)
    patterns = rs.uniform(30, 225, size=(n_classes, 3, 3, 3)).astype(np.uint8)
    synsets = [f'n{k:08d}' for k in range(n_classes)]
    count = 0

    def save(k, path, copy):
        nonlocal count
        count += 1
        h, w = rs.randint(48, 97, size=2)
        img = np.asarray(Image.fromarray(patterns[k]).resize((int(w), int(h)), Image.BILINEAR))
        img = np.clip(img + rs.normal(0, 20, size=img.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(img)
        if count % 5 == 0:
            img = img.convert('L')
        for folder in (path.parent, copy.parent):
            folder.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        shutil.copyfile(path, copy)

    for k, synset in enumerate(synsets):
        for i in range(n_train_per_class):
            name = f'{synset}_{i}.JPEG'
            save(k, tmp / 'train' / synset / name, tmp / 'trn_images' / synset / name)
    targets = rs.permutation(np.repeat(np.arange(n_classes), n_val_per_class))
    for i, k in enumerate(targets):
        name = f'ILSVRC2012_val_{i + 1:08d}.JPEG'
        save(k, tmp / 'val' / synsets[k] / name, tmp / 'val_images' / name)
    pd.DataFrame({'synset': synsets, 'n': n_train_per_class}).to_csv(
        tmp / 'classes.csv', sep='\t', index=False)
    pd.DataFrame({'target': targets}).to_csv(tmp / 'val_targets.csv', index=False)
    try:
        tmp.rename(data_dir)
    except OSError:  # another process got there first: keep its copy
        shutil.rmtree(tmp)
    return data_dir
