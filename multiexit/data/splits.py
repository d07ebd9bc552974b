"""Which examples a split holds, drawn exactly as the original drew them (its SubsetSampler and
dataset2semisup), and the checks that the images of every class allow the draw. Every data set
of ``multiexit.data`` selects its splits here."""
import numpy as np

from ..errors import ConfigError
from ..losses import IGNORE


def subset_indices(labels, split, n_per_class=None, nval_per_class=None, seed=0, n_classes=None):
    """Indices of a split and the label map, exactly as the original's SubsetSampler.

    ``rs = RandomState(seed)``; the classes are permuted (label k becomes its position in the
    permutation, ``label_map[k]``); per class in that order, ``n_per_class`` images are drawn
    (all if None), of which ``nval_per_class`` form the validation split and the rest the
    training split ('test' takes all of them). Labelled -100 images are never selected.
    Returns (sorted int64 indices, int64 label_map).
    """
    labels = np.asarray(labels)
    if split not in ('train', 'val', 'test'):
        raise ConfigError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if split != 'test' and not nval_per_class:
        raise ConfigError(f'the {split} split needs nval_per_class > 0')
    n_classes = n_classes or int(labels.max()) + 1
    rs = np.random.RandomState(seed)
    classes = rs.choice(n_classes, n_classes, replace=False)
    chosen = []
    for k in classes:
        ind = np.where(labels == k)[0]
        if n_per_class:
            ind = rs.choice(ind, n_per_class, replace=False)
        if split == 'test':
            chosen.append(ind)
            continue
        val = rs.choice(ind, int(nval_per_class), replace=False)
        chosen.append(val if split == 'val' else np.setdiff1d(ind, val))
    label_map = np.argsort(classes)
    return np.sort(np.concatenate(chosen)).astype(np.int64), label_map.astype(np.int64)


def unlabelled_indices(labels, n_unl_per_class, seed, n_classes):
    """Images the semi-supervised setting treats as unlabelled (the original's dataset2semisup)."""
    rs = np.random.RandomState(seed)
    labels = np.asarray(labels)
    out = [rs.choice(np.where(labels == k)[0], n_unl_per_class, replace=False)
           for k in range(n_classes)]
    return np.sort(np.concatenate(out)).astype(np.int64)


def split_selection(labels, split, n_per_class, nval_per_class, seed, n_unl_per_class,
                    n_classes):
    """(indices, their labels) of a split, as the original selected them: ``n_unl_per_class``
    images per class lose their label (``unlabelled_indices``; they join the training split
    with label -100), then ``subset_indices`` draws the split from the rest and maps the
    labels through its class permutation."""
    labels = np.array(labels, dtype=np.int64)
    unl = np.empty(0, dtype=np.int64)
    if n_unl_per_class and split != 'test':
        unl = unlabelled_indices(labels, n_unl_per_class, seed, n_classes)
        labels[unl] = IGNORE
    idx, label_map = subset_indices(labels, split, n_per_class if split != 'test' else None,
                                    nval_per_class, seed, n_classes)
    mapped = label_map[labels[idx]]
    if split == 'train' and len(unl):
        idx = np.concatenate([idx, unl])
        mapped = np.concatenate([mapped, np.full(len(unl), IGNORE)])
    return idx, mapped


def check_class_sizes(labels, n_per_class, nval_per_class, n_unl_per_class, class_names, where):
    """Every class of the training ``labels`` (of the data in ``where``) has the images that
    ``cf_trn`` draws from it: n_per_class (None: all, of which nval_per_class for validation
    and at least one for training), plus n_unl_per_class to leave unlabelled."""
    n_unl = n_unl_per_class or 0
    need = (n_per_class or nval_per_class + 1) + n_unl
    counts = np.bincount(np.asarray(labels), minlength=len(class_names))
    k = int(counts.argmin())
    if counts[k] < need:
        asked = (f'n_per_class={n_per_class}' if n_per_class else
                 f'n_per_class=None (all: nval_per_class={nval_per_class} and at least one for '
                 'training)') + (f' + n_unl_per_class={n_unl} = {need}' if n_unl else '')
        raise ConfigError(f'cf_trn asks for {asked} images per class, but class '
                          f'{class_names[k]} of {where} has {counts[k]}; lower '
                          + ('n_per_class or n_unl_per_class' if n_unl else 'n_per_class'))


def check_split_sizes(split, n_per_class, nval_per_class):
    """The validation split is carved from the training images of every class."""
    if split != 'test' and not nval_per_class:
        raise ConfigError('nval_per_class must be > 0 (the validation split is carved from train)')
    if n_per_class is not None and (n_per_class <= 0 or nval_per_class >= n_per_class):
        raise ConfigError(f'need 0 < nval_per_class < n_per_class, got nval_per_class='
                          f'{nval_per_class}, n_per_class={n_per_class}')
