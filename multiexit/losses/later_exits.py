"""Two losses of the early-exit benchmark of Kubaty et al. (ICML 2025): distillation from all
later exits, and from the next exit."""
import torch
import torch.nn.functional as F
from torch import nn

from .terms import cross_entropy, soft_cross_entropy


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
