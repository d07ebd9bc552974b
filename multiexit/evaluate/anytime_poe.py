"""Product Anytime (PA): the post-hoc product-of-experts of Jazbec et al., "Towards Anytime
Classification in Early-Exit Architectures by Enforcing Conditional Monotonicity" (NeurIPS 2023).

Source: ``metodj/AnytimeClassification``, commit e134ae7a3f77033a2a5d6116fd10567473c65a5d,
``anytime_predictors.py`` (``anytime_product``) as ``paper_plots.ipynb`` calls it for the
paper's figures (``weights=arange(1, L + 1) / L``), accuracy as ``utils.py`` computes it (top-1
of the argmax, per exit).

The prediction at exit k is the normalised product over exits j = 0..k of ReLU(logits_j) raised
to the power w_j = (j + 1) / L (L exits): a class that some exit gives a logit <= 0 has
probability 0 from then on, so the prediction can only narrow as exits are added. Where every
class has been zeroed, the distribution is the softmax of exit k's own logits (the authors'
``fall_back=True``); without it their code divides 0 by 0, and the NaN row's argmax is an
arbitrary class. Top-1 only, as the authors report: the zeroed classes tie, so a top-5 would rank
them arbitrarily.
"""
import torch

from ..losses import IGNORE


def poe_probs(logits):
    """PA's distributions (exits, N, C), float64, of per-exit logits (exits, N, C)."""
    logits = logits.double()
    n_exits = len(logits)
    weights = torch.arange(1, n_exits + 1, dtype=torch.float64) / n_exits
    # float64: a product of many exits' small factors underflows to 0 sooner in float32
    product = torch.cumprod(logits.clamp(min=0) ** weights.view(-1, 1, 1), dim=0)
    total = product.sum(dim=-1, keepdim=True)
    return torch.where(total == 0, torch.softmax(logits, dim=-1), product / total)


def poe_report(logits, labels):
    """``{acc1_poe{k}: top-1 accuracy of PA at exit k}`` over the labelled examples."""
    labelled = labels != IGNORE
    pred = poe_probs(logits[:, labelled]).argmax(dim=-1)
    correct = (pred == labels[labelled]).double()
    return {f'acc1_poe{k}': correct[k].mean().item() for k in range(len(logits))}
