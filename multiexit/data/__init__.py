"""Data sets by name: ``cf_trn['call']`` picks one, as ``cf_net['call']`` picks a model.

A data set is a class whose keyword arguments are the other keys of ``cf_trn`` (which images
per class, augmentation, subset seed, ...), with:

- ``input_size``: the side of the square images that it feeds the network;
- ``n_classes(data_dir)``;
- ``loader(split, data_dir, batch_size, device, seed=0, channels_last=False, rank=0,
  world_size=1)``: batches ``(x, y)`` on ``device`` of 'train' (an order and augmentation
  seeded with (seed, epoch), the incomplete last batch dropped), 'val' (held out of the
  training images) or 'test', this rank's part of every batch (``order.EpochOrder``). The
  loader, an ``order.EpochLoader``, has ``set_epoch(epoch)``, ``len()`` (batches), ``labels``,
  ``device`` and ``world_size``;
- ``write_fake(data_dir)``: a small generated data set in its format (the ``smoke`` configs).

A new data set is one module with such a class, and one line in ``REGISTRY``.
"""
from .. import registry
from .cifar import Cifar10, Cifar100
from .folders import ImageFolder, ImageNet

REGISTRY = {'Cifar100': Cifar100, 'Cifar10': Cifar10, 'ImageFolder': ImageFolder,
            'ImageNet': ImageNet}


def build(cf_data, what='trn'):
    """The data set of a config dict such as ``cf_trn`` (``what``: 'trn', 'val' or 'test',
    for the error messages)."""
    return registry.build(REGISTRY, cf_data, what)
