"""Multi-exit models: a name registry, ``build(cf_net)`` and loading of the original snapshots.

Contract of a registered model (used by per-exit costs and early-exit inference):
- ``forward(x)`` returns a list of per-exit logits;
- ``blocks`` and ``exits`` are ``nn.ModuleList``s of equal length; ``h = blocks[k](h)`` runs
  the backbone segment k on the previous segment's output (``x`` for k = 0);
- ``exits[k](model.exit_features(h))`` are exit k's logits;
- every constructor argument is an explicit keyword argument (``registry.build`` relies on it);
- its BatchNorms are ``batchnorm.BatchNorm2d``, whose step counters the training step advances
  once per epoch (``batchnorm.count_batches``).

A model whose exits combine the earlier exits' logits (``boosted``: ``cf_net.boost_reweight``)
also has ``exit_step(k, state)``, which the early-exit runners use instead of block k and exit
head k alone (``early_exit.rule.exit_step``).
"""
from .. import registry
from . import boosted
from .imagenet_resnet import ImageNetResNet
from .msdnet import MsdNet
from .resnet import ResNet, WideResNet

REGISTRY = {'MsdNet': MsdNet, 'ResNet': ResNet, 'WideResNet': WideResNet,
            'ImageNetResNet': ImageNetResNet}
OPTIONS = ('boost_reweight',)  # cf_net settings of every registered model, beside its own


def build(cf_net):
    """Build a registered model from a config dict whose ``call`` names it; ``boost_reweight``
    (None: off) gives it boosted exits (``boosted``)."""
    cf_net = dict(cf_net)
    reweight = cf_net.pop('boost_reweight', None)
    if reweight is None:
        return registry.build(REGISTRY, cf_net, 'net')
    return boosted.build(REGISTRY, cf_net, reweight)


def load_original_state_dict(model, state_dict):
    """Load a state dict saved by the original code (possibly from ``nn.DataParallel``)."""
    prefix = 'module.'
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)
    return model


__all__ = ['MsdNet', 'ResNet', 'WideResNet', 'ImageNetResNet', 'REGISTRY', 'OPTIONS', 'build',
           'load_original_state_dict']
