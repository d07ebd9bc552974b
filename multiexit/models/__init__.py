"""Multi-exit models: a name registry, ``build(cf_net)`` and loading of the original snapshots.

Contract of a registered model: ``forward(x)`` returns a list of per-exit logits, and the model
has ``blocks`` and ``exits`` (``nn.ModuleList``) where exit ``k`` reads the output of
``blocks[k]`` (used for per-exit costs).
"""
from .. import registry
from .msdnet import MsdNet

REGISTRY = {'MsdNet': MsdNet}


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


__all__ = ['MsdNet', 'REGISTRY', 'build', 'load_original_state_dict']
