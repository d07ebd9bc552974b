"""The three training losses of the original code, called as ``loss(logits_list, y)``.

Unlabelled examples carry the label -100: they add no cross-entropy, only distillation terms.
The exits' logits are stacked into one (exits, batch, classes) tensor, so that every op of a
loss runs once for all exits: a few kernels per training step instead of a few per exit.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, registry

IGNORE = -100


def cross_entropy(logits, y):
    """Sum over exits of the mean cross-entropy over the labelled examples, for ``logits`` of
    shape (exits, batch, classes); 0 (not NaN) when there are none."""
    n_exits = logits.shape[0]
    total = F.cross_entropy(logits.flatten(0, 1), y.repeat(n_exits), ignore_index=IGNORE,
                            reduction='sum')
    return total / (y != IGNORE).sum().clamp(min=1)


def soft_cross_entropy(teacher_prob, student_logits, T):
    """Sum over the students of H(p, q) = -mean_batch sum_k p_k log q_k, with
    q = softmax(student / T), for ``student_logits`` of shape (students, batch, classes)."""
    log_q = F.log_softmax(student_logits / T, dim=-1)
    return -(teacher_prob * log_q).sum(dim=-1).mean(dim=-1).sum()


def teacher_confidence(logits, T):
    """Mean max-probability of softmax(logits / T): the quantity DBT drives down to `maxprob`."""
    return F.softmax(logits.detach().float() / T, dim=1).amax(dim=1).mean()


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

    def distillation_loss(self, logits_list, y, T):
        """The loss at temperature ``T``, a float64 tensor: T^2 * C is computed in float64 and
        rounded once, as the original's Python floats were."""
        z = torch.stack(logits_list)  # (exits, batch, classes); the teacher last
        T32, weight = T.float(), (T ** 2 * self.C).float()
        labelled = z if self.C != 1.0 else z[-1:]  # with C == 1 the early exits see no labels
        total = (1.0 - self.C) * cross_entropy(labelled, y)
        prob_t = F.softmax(z[-1].detach() / T32, dim=1)
        total = total + weight * soft_cross_entropy(prob_t, z[:-1], T32)
        return total * self.global_scale

    def forward(self, logits_list, y):
        return self.distillation_loss(logits_list, y, self.temperature)


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
        loss = self.distillation_loss(logits_list, y, T)
        if self.training:
            confidence = teacher_confidence(logits_list[-1], T.float())
            hot = distributed.mean_over_ranks(confidence) > self.maxprob
            self.temperature.copy_(torch.where(hot, T * self.Tmult, T))
        return loss


REGISTRY = {cls.__name__: cls for cls in
            (ClassificationOnlyLoss, DistillationLossConstTemp, DistillationBasedLoss)}


def build(cf_loss):
    """Build a registered loss from a config dict whose ``call`` names it."""
    return registry.build(REGISTRY, cf_loss, 'loss')
