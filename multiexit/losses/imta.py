"""The one-for-all knowledge distillation of IMTA (Li et al., ICCV 2019, "Improved Techniques
for Training Adaptive Deep Networks")."""
import torch
import torch.nn.functional as F
from torch import nn

from .terms import cross_entropy


def imta_loss(logits, y, teacher, gamma, T):
    """CE(z_M, y) + sum_{i<M} [(1 - gamma) CE(z_i, y)
    + gamma T^2 KL(softmax(teacher / T) || softmax(z_i / T))], the teacher detached, for
    ``logits`` (exits, [K,] batch, classes) and ``teacher`` ([K,] batch, classes); each member's
    loss (K,) for K members. Every cross-entropy is the mean over the labelled examples; every
    KL the mean over examples AND classes (nn.KLDivLoss()'s default, as the authors use it)."""
    p = F.softmax(teacher.detach() / T, dim=-1)
    log_q = F.log_softmax(logits[:-1] / T, dim=-1)
    kl = F.kl_div(log_q, p.expand_as(log_q), reduction='none').mean(dim=(-2, -1)).sum(dim=0)
    return (cross_entropy(logits[-1:], y) + (1.0 - gamma) * cross_entropy(logits[:-1], y)
            + gamma * T * T * kl)


class IMTADistillation(nn.Module):
    """IMTA's one-for-all knowledge distillation, the last exit the teacher of every other:
    CE(z_M, y) + sum_{i<M} [(1 - gamma) CE(z_i, y) + gamma T^2 KL(p_M || q_i)], with
    p_M = softmax(z_M / T) detached and q_i = softmax(z_i / T).

    As ``KDLoss.loss_fn_kd`` of kalviny/IMTA, utils.py, at commit
    a9378373241c3247db01f826e3cd8025702fa54b: cross-entropies are means over the batch, and the
    KL is ``nn.KLDivLoss()`` with its default reduction, the mean over the batch's examples and
    the classes (not 'batchmean'): for C classes, 1/C times the per-example KL. ``gamma`` and
    ``T`` default to run_IMTA.sh's (0.1, 1.0). The authors' teacher is the last classifier of
    the GE network they start from, frozen with it; here it is the last exit of the network
    being trained (their classifiers on that network are not ours: see docs/faithfulness.md).
    Unlabelled examples (-100) add only the distillation terms, as in DBT.
    """

    def __init__(self, n_exits, acc_tops=(1,), gamma=0.1, T=1.0):
        super().__init__()
        self.n_exits = n_exits
        self.acc_tops = tuple(acc_tops)
        self.gamma, self.T = gamma, T

    def forward(self, logits_list, y):
        z = torch.stack(logits_list)
        return imta_loss(z, y, z[-1], float(self.gamma), float(self.T))
