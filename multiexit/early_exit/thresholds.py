"""Thresholds and budgets of the early-exit rule (``rule``), from per-exit softmax outputs
computed once: budgeted batch classification (MSDNet's ``dynamic_evaluate``, Huang et al. 2018).

A sample that leaves at exit k has run blocks 0..k and heads 0..k, so it costs
``macs_all_heads[k]`` (``flops.exit_costs``). Thresholds are fitted on the validation split and
applied to the test split.
"""
import math

import pandas as pd
import torch

from ..losses import IGNORE
from .rule import confidences, exit_indices

GEOMETRIC_QS = tuple(p / 20 for p in range(1, 40))  # MSDNet's sweep: q = 0.05, 0.10, ..., 1.95
GLOBAL_LEVELS = 41  # quantile levels 0, 1/40, ..., 1 of the validation confidences


def geometric_fractions(n_exits, q):
    """Target share of the samples leaving at each exit, p_k ∝ q^k (MSDNet's budgets)."""
    p = torch.tensor(float(q), dtype=torch.float64) ** torch.arange(n_exits, dtype=torch.float64)
    return p / p.sum()


def fit_thresholds(conf, fractions):
    """Per-exit thresholds under which floor(N * fractions[k]) of the N samples leave at exit k.

    ``conf``: max-softmax (exits, N). Exit by exit, among the samples still running, the
    threshold is the confidence of the n-th most confident one (+inf when n = 0: nobody leaves);
    the last exit's is -inf. Ties may let a few more leave, as in MSDNet.
    """
    n_exits, n = conf.shape
    thresholds = torch.full((n_exits,), math.inf, dtype=conf.dtype, device=conf.device)
    running = torch.ones(n, dtype=torch.bool, device=conf.device)
    for k in range(n_exits - 1):
        n_out = math.floor(n * float(fractions[k]))
        candidates = conf[k][running]
        if n_out and len(candidates):
            thresholds[k] = candidates.sort(descending=True).values[min(n_out, len(candidates)) - 1]
        running &= conf[k] < thresholds[k]
    thresholds[-1] = -math.inf
    return thresholds


def mean_cost(exits, exit_costs):
    """Mean over the samples of the cost of the exit each leaves at (``exit_costs[k]``)."""
    return torch.as_tensor(exit_costs, dtype=torch.float64)[exits.cpu()].mean().item()


def outcome(conf, pred, labels, thresholds, macs_all_heads):
    """(top-1 accuracy, mean MACs per image, share of the samples per exit) at ``thresholds``."""
    exits = exit_indices(conf, thresholds)
    chosen = pred.gather(0, exits[None])[0]
    labelled = labels != IGNORE
    acc = (chosen == labels)[labelled].double().mean().item()
    shares = torch.bincount(exits, minlength=len(thresholds)).double() / len(exits)
    return acc, mean_cost(exits, macs_all_heads), shares.tolist()


def fit_to_budget(conf, exit_costs, budget, iterations=40):
    """(q, thresholds, mean cost): the thresholds for exit shares p_k ∝ q^k on ``conf``
    (max-softmax (exits, N), e.g. of the validation split) whose mean cost per sample is the
    highest found that does not exceed ``budget``.

    ``exit_costs[k]``: what a sample leaving at exit k costs, in any unit: MACs, or the measured
    milliseconds per image of a mode (``StreamingExit.exit_ms``), to fit a time budget. The
    mean cost grows with q; q is bisected on a log scale, from everyone at the first exit
    (q = 0) to everyone at the last (q = inf).
    """
    n_exits = len(conf)
    costs = [float(c) for c in exit_costs]
    if len(costs) != n_exits:
        raise ValueError(f'{len(costs)} exit costs for {n_exits} exits')
    if budget < costs[0]:
        raise ValueError(f'budget {budget:g} is below the cost of the first exit, {costs[0]:g}')
    everyone_at = lambda k: torch.tensor([-math.inf if i == k else math.inf
                                          for i in range(n_exits - 1)] + [-math.inf])
    if budget >= max(costs):
        return math.inf, everyone_at(n_exits - 1), costs[-1]

    def setting(q):
        thresholds = fit_thresholds(conf, geometric_fractions(n_exits, q))
        return q, thresholds, mean_cost(exit_indices(conf, thresholds), costs)

    best = (0.0, everyone_at(0), costs[0])
    low, high = math.log(1e-4), math.log(1e4)
    for _ in range(iterations):
        mid = (low + high) / 2
        q, thresholds, cost = setting(math.exp(mid))
        if cost <= budget:
            low = mid
            if cost >= best[2]:
                best = (q, thresholds, cost)
        else:
            high = mid
    return best


def budget_sweep(val_logits, val_labels, test_logits, test_labels, macs_all_heads,
                 exit_times=None):
    """One row per budget, in increasing order of compute.

    method 'geometric': per-exit thresholds fitted on validation for the exit shares p_k ∝ q^k,
    q in ``GEOMETRIC_QS`` (``param`` = q). Method 'global': one threshold for all exits but the
    last (SDN/ZTW style), ``param`` = the threshold; the grid is the ``GLOBAL_LEVELS`` quantiles
    of the pooled validation confidences of the early exits plus +inf, so that it spans every
    exit whatever the confidence scale of the model (a fixed grid on [0, 1] misses it for
    poorly calibrated or barely trained models). Columns: acc1 and avg_macs on test,
    val_acc1 and val_avg_macs, threshold{k}, and exited{k} (share of the test samples leaving
    at exit k); with ``exit_times`` ({name: time per image of each exit}), avg_{name}, the mean
    time per test image.
    """
    val_conf, val_pred = confidences(val_logits)
    test_conf, test_pred = confidences(test_logits)
    n_exits = len(val_conf)
    settings = [('geometric', q, fit_thresholds(val_conf, geometric_fractions(n_exits, q)))
                for q in GEOMETRIC_QS]
    levels = torch.linspace(0, 1, GLOBAL_LEVELS, dtype=torch.float64)
    grid = torch.quantile(val_conf[:-1].flatten().double(), levels).tolist() + [math.inf]
    settings += [('global', t, torch.tensor([t] * (n_exits - 1) + [-math.inf])) for t in grid]
    rows = []
    for method, param, thresholds in settings:
        acc, macs, shares = outcome(test_conf, test_pred, test_labels, thresholds, macs_all_heads)
        val_acc, val_macs, _ = outcome(val_conf, val_pred, val_labels, thresholds, macs_all_heads)
        exits = exit_indices(test_conf, thresholds)
        rows.append({'method': method, 'param': param, 'acc1': acc, 'avg_macs': macs,
                     'val_acc1': val_acc, 'val_avg_macs': val_macs,
                     **{f'avg_{name}': mean_cost(exits, t) for name, t in
                        (exit_times or {}).items()},
                     **{f'threshold{k}': float(t) for k, t in enumerate(thresholds)},
                     **{f'exited{k}': s for k, s in enumerate(shares)}})
    return pd.DataFrame(rows)
