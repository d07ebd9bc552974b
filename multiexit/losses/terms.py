"""The terms every multi-exit loss is made of, over the exits' logits stacked into one
(exits, [K,] batch, classes) tensor, so that every op runs once for all exits (and for the K
members of a pack: every sum over examples is per member).

Unlabelled examples carry the label -100 (``IGNORE``): they add no cross-entropy, only
distillation terms.
"""
import torch.nn.functional as F

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


def over_classes(t):
    """A per-member (K,) tensor shaped to divide (K, batch, classes) logits; a scalar as it is."""
    return t if t.dim() == 0 else t[:, None, None]
