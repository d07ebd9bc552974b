"""The three training losses of the original code, called as ``loss(logits_list, y)``, and
``distillation_loss``, which a pack's ``train.pack.PackLoss`` computes for all its members."""
import torch
import torch.nn.functional as F
from torch import nn

from ..accel import distributed
from .terms import cross_entropy, over_classes, soft_cross_entropy


def teacher_confidence(logits, T):
    """Mean max-probability of softmax(logits / T): the quantity DBT drives down to `maxprob`."""
    return F.softmax(logits.detach().float() / T, dim=-1).amax(dim=-1).mean(dim=-1)


def distillation_loss(logits_list, y, T, C, global_scale):
    """global_scale * [(1-C) sum_m CE(z_m, y) + C T^2 sum_{m<M} H(softmax(z_M/T), softmax(z_m/T))]
    at the float64 temperature ``T``: T^2 * C is computed in float64 and rounded once, as the
    original's Python floats were. ``C`` and ``global_scale`` are floats, or for a pack float64
    tensors (K,) like ``T``, which give every member its own loss (K,)."""
    z = torch.stack(logits_list)  # (exits, [K,] batch, classes); the teacher last
    T32, weight = over_classes(T.float()), (T ** 2 * C).float()
    solo = isinstance(C, float)
    labelled = z if not solo or C != 1.0 else z[-1:]  # with C == 1 the early exits see no labels
    total = (1.0 - C if solo else (1.0 - C).float()) * cross_entropy(labelled, y)
    prob_t = F.softmax(z[-1].detach() / T32, dim=-1)
    total = total + weight * soft_cross_entropy(prob_t, z[:-1], T32)
    return total * (global_scale if solo else global_scale.float())


class ClassificationOnlyLoss(nn.Module):
    """Sum of the exits' cross-entropies (standard multi-exit training)."""

    def __init__(self, n_exits, acc_tops=(1,)):
        super().__init__()
        self.n_exits = n_exits
        self.acc_tops = tuple(acc_tops)

    def forward(self, logits_list, y):
        return cross_entropy(torch.stack(logits_list), y)


class DistillationLossConstTemp(nn.Module):
    """global_scale * [(1-C) sum_m CE(z_m, y) + C T^2 sum_{m<M} H(softmax(z_M/T), softmax(z_m/T))]."""

    def __init__(self, C, T, n_exits, acc_tops=(1,), global_scale=1.0):
        super().__init__()
        self.n_exits = n_exits
        self.acc_tops = tuple(acc_tops)
        self.C = C
        self.global_scale = global_scale
        self.register_buffer('temperature', torch.tensor(float(T), dtype=torch.float64))

    @property
    def T(self):
        return float(self.temperature)  # host sync: for logs and tests, not the training step

    def forward(self, logits_list, y):
        return distillation_loss(logits_list, y, self.temperature, float(self.C),
                                 float(self.global_scale))


class DistillationBasedLoss(DistillationLossConstTemp):
    """DBT: as DistillationLossConstTemp, with T annealed upwards during training.

    After each training call, if the teacher's mean max-probability at the current T exceeds
    `maxprob`, T is multiplied by `Tmult`. T is a float64 buffer on the loss's device, updated
    without a host sync, and part of ``state_dict()`` so that a resumed run keeps it. Under
    torch.distributed, the mean max-probability is averaged over the ranks (whose batches have
    the same size) before the comparison, so every rank keeps the same T.
    """

    def __init__(self, C, maxprob, n_exits, acc_tops=(1,), Tmult=1.05, global_scale=1.0):
        super().__init__(C, 1.0, n_exits, acc_tops, global_scale)
        self.maxprob = maxprob
        self.Tmult = Tmult

    def forward(self, logits_list, y):
        T = self.temperature  # float64, so that 1.05**n follows the original's Python float
        loss = distillation_loss(logits_list, y, T, float(self.C), float(self.global_scale))
        if self.training:
            confidence = teacher_confidence(logits_list[-1], T.float())
            hot = distributed.mean_over_ranks(confidence) > self.maxprob
            self.temperature.copy_(torch.where(hot, T * self.Tmult, T))
        return loss
