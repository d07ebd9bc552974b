"""SDN's weighted cross-entropy (Kaya et al., ICML 2019), whose early exits' weights grow over
the epochs of training."""
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .terms import IGNORE

# the authors' last early exit, at 90% of their networks' cost
LAST_EARLY_WEIGHT = 0.9
START = 0.01  # every early exit's weight at "epoch 0" of the ramp


def default_final_weights(n_exits):
    """The early exits' final weights rising in equal steps to 0.9: 0.9 i / (M - 1) for the
    i-th of M - 1; for their six ICs (M = 7), the authors' 0.15, 0.3, ..., 0.9 to the bit."""
    return tuple(LAST_EARLY_WEIGHT * i / (n_exits - 1) for i in range(1, n_exits))


def ramp(final_weights, epoch, length):
    """The early exits' weights while the epoch ``epoch`` (0-based) of a ramp of ``length``
    epochs trains: min(C_i, 0.01 + (epoch + 1) C_i / length), in float64 in the authors' order
    of operations (their epochs count from 1)."""
    return [min(c, START + (epoch + 1) * (c / length)) for c in final_weights]


def _is_weight(c):
    return isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c < float('inf')


def per_exit_cross_entropy(z, y):
    """Each exit's mean cross-entropy over the labelled examples, (exits,), for ``z`` of shape
    (exits, batch, classes); 0 where none is labelled."""
    n_exits = z.shape[0]
    total = F.cross_entropy(z.flatten(0, 1), y.repeat(n_exits), ignore_index=IGNORE,
                            reduction='none').view(n_exits, -1).sum(dim=1)
    return total / (y != IGNORE).sum().clamp(min=1)


class SdnWeightedLoss(nn.Module):
    """SDN's weighted cross-entropy: sum_{m<M} tau_m(epoch) CE(z_m, y) + CE(z_M, y), where each
    early exit's weight grows linearly over training from 0.01 to its final weight C_m, and
    the last exit's is 1.

    As in yigitcankaya/Shallow-Deep-Networks, model_funcs.py (``sdn_train``, whose
    ``cur_coeffs = min(max_coeffs, 0.01 + epoch * (max_coeffs / epochs))`` weigh the cross-
    entropies in ``sdn_training_step``) at commit a55644624c9dc064d1372f6a486055edd94c9def:
    their 1-based epoch is our ``epoch + 1``, so the weights reach C_m in the ramp's last
    epochs, and the ramp lasts their whole training (``epochs``: 100 in
    network_architectures.py ``get_lr_params``). Here it lasts the run's ``n_epochs`` unless
    ``ramp_epochs`` sets it. ``final_weights`` are the early exits' C_m; theirs
    (``max_coeffs``) are the ICs' positions, 15% to 90% of their networks' cost, and the
    default spreads 0.9 i / (M - 1) over M - 1 early exits (``default_final_weights``), which is
    theirs for six. Unlabelled examples (-100) add nothing.

    The weights are a float32 buffer ``weights`` (exits,) on the loss's device (their float64
    values rounded once, as their Python float times a float32 loss is), set in place by
    ``set_epoch`` before each epoch (a captured CUDA graph reads them where they are); they
    follow from the epoch, so they are not saved and a resumed run sets them again (a resume
    that changes n_epochs changes the ramp from then on; ``ramp_epochs`` keeps it). Before any
    ``set_epoch`` they are the final weights.
    """

    def __init__(self, n_exits, acc_tops=(1,), final_weights=None, ramp_epochs=None):
        super().__init__()
        self.n_exits = n_exits
        self.acc_tops = tuple(acc_tops)
        weights = default_final_weights(n_exits) if final_weights is None else final_weights
        if not (isinstance(weights, (list, tuple)) and len(weights) == n_exits - 1
                and all(map(_is_weight, weights))):
            shown = list(weights) if isinstance(weights, (list, tuple)) else weights
            raise ConfigError(f'final_weights={shown!r}: expected {n_exits - 1} numbers >= 0, '
                              'one per early exit, or None')
        self.final_weights = tuple(weights)
        self.ramp_epochs = ramp_epochs
        self.register_buffer('weights', torch.tensor([*self.final_weights, 1.0]),
                             persistent=False)

    def set_epoch(self, epoch, n_epochs):
        """The weights of the epoch ``epoch`` (0-based) of a run of ``n_epochs``."""
        weights = ramp(self.final_weights, epoch, self.ramp_epochs or n_epochs)
        self.weights[:-1].copy_(torch.tensor(weights))  # host sync: once per epoch

    def forward(self, logits_list, y):
        return (self.weights * per_exit_cross_entropy(torch.stack(logits_list), y)).sum()
