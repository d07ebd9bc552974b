"""Budgeted batch classification: threshold fitting, exit decisions, the budget sweep."""
import math

import pandas as pd
import pytest
import torch

from multiexit.early_exit.rule import confidences, exit_indices
from multiexit.early_exit.thresholds import (GEOMETRIC_QS, GLOBAL_LEVELS, budget_sweep,
                                             fit_thresholds, fit_to_budget, geometric_fractions,
                                             mean_cost, outcome)


def test_exit_is_the_first_confident_exit_and_costs_all_heads_so_far():
    conf = torch.tensor([[0.9, 0.2, 0.5, 0.1],   # exit 0
                         [0.1, 0.8, 0.6, 0.1],   # exit 1
                         [0.1, 0.1, 0.1, 0.1]])  # exit 2 (last: takes the rest)
    pred = torch.tensor([[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]])
    thresholds = [0.8, 0.7, -math.inf]
    assert exit_indices(conf, thresholds).tolist() == [0, 1, 2, 2]
    labels = torch.tensor([1, 0, 3, 3])
    acc, macs, shares = outcome(conf, pred, labels, thresholds, [10, 30, 70])
    assert acc == pytest.approx(3 / 4)
    assert macs == pytest.approx((10 + 30 + 70 + 70) / 4)
    assert shares == pytest.approx([1 / 4, 1 / 4, 2 / 4])


def test_a_confidence_equal_to_its_threshold_leaves():
    conf = torch.tensor([[0.5, 0.25, 0.75],
                         [0.5, 0.5, 0.5],
                         [0.1, 0.1, 0.1]])
    assert exit_indices(conf, [0.5, 0.5, -math.inf]).tolist() == [0, 1, 0]


def test_ties_at_a_fitted_threshold_leave_together_and_stop_running():
    conf = torch.tensor([[0.9, 0.6, 0.6, 0.2, 0.1, 0.1],
                         [0.1, 0.95, 0.95, 0.7, 0.5, 0.3],
                         [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    # 2 of 6 should leave at exit 0: its threshold is the second confidence, 0.6, which sample 2
    # ties, so 3 leave; exit 1 then picks 2 of the 3 still running (0.7, 0.5, 0.3): 0.5. Had
    # the tied samples kept running, their 0.95 would have set exit 1's threshold.
    thresholds = fit_thresholds(conf, torch.tensor([1 / 3, 1 / 3, 1 / 3]))
    assert thresholds.tolist() == pytest.approx([0.6, 0.5, -math.inf])
    assert exit_indices(conf, thresholds).tolist() == [0, 0, 0, 1, 1, 2]


def test_geometric_fractions():
    p = geometric_fractions(4, 0.5)
    assert p.sum().item() == pytest.approx(1)
    assert (p[1:] / p[:-1]).tolist() == pytest.approx([0.5] * 3)


@pytest.mark.parametrize('q', [0.3, 1.0, 1.9])
def test_fitted_thresholds_give_the_target_shares_on_the_fitting_data(q):
    n_exits, n = 5, 1000
    conf = torch.rand(n_exits, n, generator=torch.Generator().manual_seed(0))
    target = geometric_fractions(n_exits, q)
    thresholds = fit_thresholds(conf, target)
    assert thresholds[-1].item() == -math.inf
    counts = torch.bincount(exit_indices(conf, thresholds), minlength=n_exits)
    assert counts.sum().item() == n
    for k in range(n_exits - 1):  # floor(N p_k) leave at k; the last takes the rest
        assert n * target[k].item() - 1 < counts[k].item() <= n * target[k].item()


def synthetic_logits(n, n_exits=4, n_classes=10, seed=0):
    """Logits whose exits grow more confident and more often right, like a trained network."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(n_classes, (n,), generator=g)
    logits = torch.randn(n_exits, n, n_classes, generator=g)
    for k in range(n_exits):
        logits[k, torch.arange(n), labels] += 0.8 * (k + 1) * torch.rand(n, generator=g)
    return logits, labels


def test_budget_sweep_spends_more_compute_for_larger_budgets():
    costs = [1e6, 2.5e6, 3e6, 5e6]
    val = synthetic_logits(2000, seed=1)
    test = synthetic_logits(2000, seed=2)
    sweep = budget_sweep(*val, *test, costs)
    geometric = sweep[sweep['method'] == 'geometric']
    glob = sweep[sweep['method'] == 'global']
    assert geometric['param'].tolist() == list(GEOMETRIC_QS)
    # On the split the thresholds are fitted on, the shares follow p_k ∝ q^k exactly, so the
    # mean cost grows with q; a single threshold makes every sample leave later as it rises.
    assert geometric['val_avg_macs'].is_monotonic_increasing
    assert geometric['val_avg_macs'].is_unique
    assert glob['param'].is_monotonic_increasing
    assert glob['avg_macs'].is_monotonic_increasing and glob['val_avg_macs'].is_monotonic_increasing
    # the global grid spans everything at the first exit to everything at the last
    assert glob['val_avg_macs'].iloc[0] == costs[0] and glob['avg_macs'].iloc[-1] == costs[-1]
    last_exit_acc = (test[0][-1].argmax(-1) == test[1]).double().mean().item()
    assert glob['acc1'].iloc[-1] == pytest.approx(last_exit_acc)
    shares = sweep[[f'exited{k}' for k in range(len(costs))]]
    assert shares.sum(axis=1).tolist() == pytest.approx([1.0] * len(sweep))
    assert (shares.to_numpy() @ costs).tolist() == pytest.approx(sweep['avg_macs'].tolist())


def test_thresholds_are_fitted_on_the_validation_split_alone():
    """Validation and test splits that differ (test: half as many samples, far more confident
    logits): every threshold is fitted on validation, the test split only gets them applied."""
    costs = [1e6, 2.5e6, 3e6, 5e6]
    val_logits, val_labels = synthetic_logits(1000, seed=1)
    test_logits, test_labels = synthetic_logits(500, seed=2)
    sweep = budget_sweep(val_logits, val_labels, 4 * test_logits, test_labels, costs)
    val_conf, _ = confidences(val_logits)
    test_conf, test_pred = confidences(4 * test_logits)
    columns = [f'threshold{k}' for k in range(len(costs))]
    geometric = sweep[sweep['method'] == 'geometric']
    for q, row in zip(GEOMETRIC_QS, geometric.itertuples()):
        thresholds = fit_thresholds(val_conf, geometric_fractions(4, q))
        assert [getattr(row, c) for c in columns] == thresholds.tolist()
        acc, macs, shares = outcome(test_conf, test_pred, test_labels, thresholds, costs)
        assert (row.acc1, row.avg_macs) == (acc, macs)
        assert [getattr(row, f'exited{k}') for k in range(4)] == shares
    levels = torch.linspace(0, 1, GLOBAL_LEVELS, dtype=torch.float64)
    grid = torch.quantile(val_conf[:-1].flatten().double(), levels).tolist() + [math.inf]
    assert sweep.loc[sweep['method'] == 'global', 'param'].tolist() == grid
    # the splits do differ: at q = 1 validation has a quarter per exit, test leaves earlier
    q1 = geometric[geometric['param'] == 1.0].iloc[0]
    assert q1['val_avg_macs'] == pytest.approx(sum(costs) / 4)
    assert q1['exited0'] > 0.5 and q1['avg_macs'] < q1['val_avg_macs']
    # another test split moves nothing fitted
    other = budget_sweep(val_logits, val_labels, test_logits, test_labels, costs)
    fitted = columns + ['param', 'val_acc1', 'val_avg_macs']
    pd.testing.assert_frame_equal(other[fitted], sweep[fitted])


def test_budget_sweep_reports_the_mean_time_per_image_of_each_mode():
    costs, ms = [1e6, 2.5e6, 3e6, 5e6], {'ms_streaming': [0.1, 0.3, 0.4, 0.9],
                                           'ms_latency': [2.0, 3.0, 5.0, 8.0]}
    sweep = budget_sweep(*synthetic_logits(500, seed=1), *synthetic_logits(500, seed=2),
                                  costs, ms)
    shares = sweep[[f'exited{k}' for k in range(len(costs))]].to_numpy()
    for name, per_exit in ms.items():
        assert (shares @ per_exit).tolist() == pytest.approx(sweep[f'avg_{name}'].tolist())


@pytest.mark.parametrize('budget', [0.15, 0.35, 0.6])
def test_thresholds_fitted_to_a_time_budget_spend_it(budget):
    """The mean time per image on the fitting data is within the budget, and no q of the sweep
    spends more of it without exceeding it."""
    ms = [0.1, 0.3, 0.4, 0.9]
    conf, _ = confidences(synthetic_logits(2000, seed=1)[0])
    q, thresholds, cost = fit_to_budget(conf, ms, budget)
    exits = exit_indices(conf, thresholds)
    assert cost == pytest.approx(mean_cost(exits, ms)) and cost <= budget
    grid = [mean_cost(exit_indices(conf, fit_thresholds(
        conf, geometric_fractions(4, g))), ms) for g in GEOMETRIC_QS]
    assert cost >= max(c for c in grid if c <= budget)
    assert budget - cost < 0.01  # the bisection gets close


def test_a_time_budget_outside_the_exits_costs():
    ms = [0.1, 0.3, 0.4, 0.9]
    conf, _ = confidences(synthetic_logits(100, seed=1)[0])
    q, thresholds, cost = fit_to_budget(conf, ms, 5.0)
    assert q == math.inf and cost == 0.9
    assert exit_indices(conf, thresholds).tolist() == [3] * 100
    with pytest.raises(ValueError, match='below the cost of the first exit, 0.1'):
        fit_to_budget(conf, ms, 0.05)
