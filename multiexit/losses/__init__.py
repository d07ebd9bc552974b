"""The training losses, each called as ``loss(logits_list, y)`` on the list of every exit's
logits, and their name registry (``cf_loss.call``): a module per method.

- ``distillation``: the original code's three (standard, distillation at a constant T, DBT);
- ``later_exits``: distillation from all later exits, and from the next exit (Kubaty et al.);
- ``imta``: IMTA's one-for-all distillation from the last exit (Li et al.).
- ``sdn``: SDN's weighted cross-entropy, its weights growing over the epochs (Kaya et al.).

``terms`` holds what they are made of.
"""
from .. import registry
from .distillation import (ClassificationOnlyLoss, DistillationBasedLoss,
                           DistillationLossConstTemp, distillation_loss, teacher_confidence)
from .imta import IMTADistillation, imta_loss
from .later_exits import DistillationFromLaterExits, DistillationFromNextExit
from .sdn import SdnWeightedLoss
from .terms import IGNORE, cross_entropy, over_classes, soft_cross_entropy

__all__ = ['IGNORE', 'cross_entropy', 'over_classes', 'soft_cross_entropy', 'distillation_loss',
           'teacher_confidence', 'ClassificationOnlyLoss', 'DistillationLossConstTemp',
           'DistillationBasedLoss', 'DistillationFromLaterExits', 'DistillationFromNextExit',
           'IMTADistillation', 'imta_loss', 'SdnWeightedLoss', 'REGISTRY', 'build']

REGISTRY = {cls.__name__: cls for cls in
            (ClassificationOnlyLoss, DistillationLossConstTemp, DistillationBasedLoss,
             DistillationFromLaterExits, DistillationFromNextExit, IMTADistillation,
             SdnWeightedLoss)}


def build(cf_loss):
    """Build a registered loss from a config dict whose ``call`` names it."""
    return registry.build(REGISTRY, cf_loss, 'loss')
