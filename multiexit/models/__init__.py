"""Multi-exit models: a name registry, ``build(cf_net)`` and loading of the original snapshots.

Contract of a registered model (used by per-exit costs and early-exit inference):
- ``forward(x)`` returns a list of per-exit logits;
- ``blocks`` and ``exits`` are ``nn.ModuleList``s of equal length; ``h = blocks[k](h)`` runs
  the backbone segment k on the previous segment's output (``x`` for k = 0);
- ``exits[k](model.exit_features(h))`` are exit k's logits;
- every constructor argument is an explicit keyword argument (``registry.build`` relies on it);
- its BatchNorms are ``batchnorm.BatchNorm2d``, whose step counters the training step advances
  once per epoch (``batchnorm.count_batches``).
"""
from .. import registry
from .imagenet_resnet import ImageNetResNet
from .msdnet import MsdNet
from .resnet import ResNet, WideResNet

REGISTRY = {'MsdNet': MsdNet, 'ResNet': ResNet, 'WideResNet': WideResNet,
            'ImageNetResNet': ImageNetResNet}


def build(cf_net):
    """Build a registered model from a config dict whose ``call`` names it."""
    return registry.build(REGISTRY, cf_net, 'net')


def load_original_state_dict(model, state_dict):
    """Load a state dict saved by the original code (possibly from ``nn.DataParallel``)."""
    prefix = 'module.'
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)
    return model


__all__ = ['MsdNet', 'ResNet', 'WideResNet', 'ImageNetResNet', 'REGISTRY', 'build',
           'load_original_state_dict']
