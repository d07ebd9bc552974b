"""The three training losses of the original code, called as ``loss(logits_list, y)``, and
``distillation_loss``, which a pack's ``train.pack.PackLoss`` computes for all its members;
and two from the early-exit benchmark of Kubaty et al. (distillation from all later exits, and
from the next exit), which train alone.

Unlabelled examples carry the label -100: they add no cross-entropy, only distillation terms.
The exits' logits are stacked into one (exits, batch, classes) tensor, so that every op of a
loss runs once for all exits: a few kernels per training step instead of a few per exit. For
the K members of a pack, every exit's logits are (K, batch, classes) and y (K, batch): the
stack is (exits, K, batch, classes), and every sum over examples is per member.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .accel import distributed

IGNORE = -100


def cross_entropy(logits, y):
    """Sum over exits of the mean cross-entropy over the labelled examples, for ``logits`` of
    shape (exits, batch, classes); 0 (not NaN) when there are none. Of each member for
    (exits, K, batch, classes) and y (K, batch)."""
    n_exits = logits.shape[0]
    if y.dim() == 1:
        total = F.cross_entropy(logits.flatten(0, 1), y.repeat(n_exits), ignore_index=IGNORE,
                                reduction='sum')
    else:  # per member
        total = F.cross_entropy(logits.flatten(0, 2), y.flatten().repeat(n_exits),
                                ignore_index=IGNORE, reduction='none').view(logits.shape[:3])
        total = total.sum(dim=(0, 2))
    return total / (y != IGNORE).sum(dim=-1).clamp(min=1)


def soft_cross_entropy(teacher_prob, student_logits, T):
    """Sum over the students of H(p, q) = -mean_batch sum_k p_k log q_k, with
    q = softmax(student / T), for ``student_logits`` of shape (students, [K,] batch, classes)."""
    log_q = F.log_softmax(student_logits / T, dim=-1)
    return -(teacher_prob * log_q).sum(dim=-1).mean(dim=-1).sum(dim=0)


def teacher_confidence(logits, T):
    """Mean max-probability of softmax(logits / T): the quantity DBT drives down to `maxprob`."""
    return F.softmax(logits.detach().float() / T, dim=-1).amax(dim=-1).mean(dim=-1)


def over_classes(t):
    """A per-member (K,) tensor shaped to divide (K, batch, classes) logits; a scalar as it is."""
    return t if t.dim() == 0 else t[:, None, None]


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


def later_exits_loss(logits_list, y, kd_weight, teachers):
    """The early-exit benchmark's joint loss with its distillation term:
    mean_m CE(z_m, y) + kd_weight * mean over (student i, teacher j) pairs of
    H(softmax(z_j), softmax(z_i)), at temperature 1, the teachers detached. ``teachers`` is
    'later' (every j > i) or 'next' (j = i + 1); the last exit has no teacher."""
    z = torch.stack(logits_list)  # (exits, batch, classes)
    n_exits = z.shape[0]
    prob = F.softmax(z[1:].detach(), dim=-1)  # index i: exit i + 1, exit i's next
    if teachers == 'later':
        # sum_{j>i} H(p_j, q_i) is H of the summed p_j: one soft cross-entropy per student
        prob = prob.flip(0).cumsum(0).flip(0)
        pairs = n_exits * (n_exits - 1) // 2
    else:
        pairs = n_exits - 1
    # one exit has no pairs: no distillation term (the authors' code would divide by zero)
    kd = soft_cross_entropy(prob, z[:-1], 1.0) / max(pairs, 1)
    return cross_entropy(z, y) / n_exits + kd_weight * kd


class DistillationFromLaterExits(nn.Module):
    """Each exit distilled from all later exits (``distill_later`` of Kubaty et al., ICML 2025):
    mean_m CE(z_m, y) + kd_weight * mean_{i<j} H(softmax(z_j), softmax(z_i)).

    As in kamadforge/early-exit-benchmark, methods/early_exit.py (``distill_later`` and the
    loss of ``training_loop``) at commit 52ff524c887fcfe7bdeeb5b4c658ba368eb5f689: the
    cross-entropies are averaged over the exits; every pair of an exit and a later one is one
    term, teacher detached, and the terms are averaged over the M(M-1)/2 pairs; temperature 1,
    no T^2 factor, no C or global_scale, no annealing (none of DBT's conventions); the last exit
    gets no distillation term. ``kd_weight`` is their ``auxiliary_loss_weight``, which has no
    default there (1.0 here). Unlabelled examples (-100) add only distillation terms, as in DBT.
    """
    teachers = 'later'

    def __init__(self, n_exits, acc_tops=(1,), kd_weight=1.0):
        super().__init__()
        self.n_exits = n_exits
        self.acc_tops = tuple(acc_tops)
        self.kd_weight = kd_weight

    def forward(self, logits_list, y):
        return later_exits_loss(logits_list, y, float(self.kd_weight), self.teachers)


class DistillationFromNextExit(DistillationFromLaterExits):
    """Each exit distilled from the next exit (``distill_next`` of Kubaty et al., ICML 2025):
    mean_m CE(z_m, y) + kd_weight * mean_{i<M} H(softmax(z_{i+1}), softmax(z_i)).

    As DistillationFromLaterExits (same file and commit, ``distill_next``), with one teacher per
    exit, its next one, and the terms averaged over the M-1 students."""
    teachers = 'next'


REGISTRY = {cls.__name__: cls for cls in
            (ClassificationOnlyLoss, DistillationLossConstTemp, DistillationBasedLoss,
             DistillationFromLaterExits, DistillationFromNextExit)}


def build(cf_loss):
    """Build a registered loss from a config dict whose ``call`` names it."""
    return registry.build(REGISTRY, cf_loss, 'loss')
