"""Per-exit report (accuracy, calibration, cost) and the accuracy-versus-compute figures."""
import pandas as pd
import pytest
import torch

from helpers import SMALL_NET, assert_png
from multiexit import models
from multiexit.early_exit.thresholds import budget_sweep
from multiexit.evaluate import anytime_poe, flops, plots
from multiexit.evaluate.report import (anytime_frame, exit_report, expected_calibration_error,
                                       per_exit_table)
from multiexit.metrics import metric_names


def random_logits(n_exits=3, n=500, n_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n_exits, n, n_classes, generator=g),
            torch.randint(n_classes, (n,), generator=g))


def ece_by_loop(logits, labels, n_bins=15):
    """Guo et al.'s definition, bin by bin."""
    conf, pred = torch.softmax(logits.double(), -1).max(-1)
    total = 0.0
    for b in range(n_bins):
        in_bin = (conf > b / n_bins) & (conf <= (b + 1) / n_bins)
        if in_bin.any():
            acc = (pred[in_bin] == labels[in_bin]).double().mean()
            total += in_bin.double().mean() * (acc - conf[in_bin].mean()).abs()
    return float(total)


def test_ece_is_the_binned_calibration_gap():
    logits, labels = random_logits()
    ece = expected_calibration_error(logits, labels)
    assert ece == pytest.approx([ece_by_loop(z, labels) for z in logits])
    certain = torch.full((1, 4, 10), -50.0)
    certain[0, torch.arange(4), torch.tensor([1, 2, 3, 4])] = 50.0  # confidence 1
    assert expected_calibration_error(certain, torch.tensor([1, 2, 3, 4])) == pytest.approx([0])
    assert expected_calibration_error(certain, torch.tensor([0, 0, 0, 0])) == pytest.approx([1])
    unlabelled = torch.tensor([1, 2, -100, -100])  # left out, as in the accuracies
    assert expected_calibration_error(certain, unlabelled) == pytest.approx([0])



def from_probabilities(rows, n_classes=10):
    """Logits whose softmax is ``rows`` (padded with zeros, i.e. -inf logits): ``m`` equal
    entries give the confidence 1/m exactly; argmax takes the first of tied classes."""
    p = torch.zeros(len(rows), n_classes, dtype=torch.float64)
    for i, row in enumerate(rows):
        p[i, :len(row)] = torch.tensor(row, dtype=torch.float64)
    return p.log()


def test_ece_bins_by_hand_at_the_bin_edges():
    """A confidence on an edge i/n belongs to the bin below it; neighbouring bins whose gaps
    (accuracy - confidence) have opposite signs show any shift or merge of the bins."""
    # 4 bins (0, 1/4], (1/4, 1/2], (1/2, 3/4], (3/4, 1]: confidence, right?, gap, bin
    logits = from_probabilities([[1 / 4] * 4,   # 1/4 wrong   -0.25  0
                                 [1 / 2] * 2,   # 1/2 right   +0.5   1
                                 [0.6, 0.4],    # 0.6 wrong   -0.6   2
                                 [0.8, 0.2],    # 0.8 right   +0.2   3
                                 [1.0]])        # 1   right    0     3
    labels = torch.tensor([9, 0, 1, 0, 0])
    expected = (0.25 + 0.5 + 0.6 + 0.2) / 5
    assert expected_calibration_error(logits[None], labels, n_bins=4) == pytest.approx([expected])
    # the 15 default bins: edges 3/15 = 1/5 and 5/15 = 1/3, and a confident error at 1, in
    # the first of two exits (the second is always right)
    logits = from_probabilities([[1 / 5] * 5,                     # right  +0.8   bin 2
                                 [0.21, 0.2, 0.2, 0.2, 0.19],     # wrong  -0.21  bin 3
                                 [1 / 3] * 3,                     # wrong  -1/3   bin 4
                                 [0.35, 0.3, 0.2, 0.15],          # right  +0.65  bin 5
                                 [0, 0, 0, 1.0]])                 # wrong  -1     bin 14
    labels = torch.tensor([0, 1, 5, 0, 4])
    certain = torch.full((5, 10), -50.0, dtype=torch.float64)
    certain[torch.arange(5), labels] = 50.0
    expected = (0.8 + 0.21 + 1 / 3 + 0.65 + 1) / 5
    assert expected_calibration_error(torch.stack([logits, certain]), labels) == \
        pytest.approx([expected, 0])

def test_exit_report_is_flat_with_costs_and_a_row_per_exit():
    torch.manual_seed(0)
    costs = flops.exit_costs(models.build(SMALL_NET))
    logits, labels = random_logits()
    report = exit_report(logits, labels, costs)
    per_exit = {f'{m}_clf{k}' for m in ('ece', 'macs', 'macs_all_heads', 'params')
                for k in range(3)}
    assert set(report) == set(metric_names(3)) | per_exit
    frame = anytime_frame(report, 3)
    assert frame['macs'].tolist() == [c['macs'] for c in costs]
    assert frame['params'].tolist() == [c['params'] for c in costs]
    assert frame['acc1'].tolist() == pytest.approx(
        [(z.argmax(-1) == labels).double().mean().item() for z in logits])
    assert frame['acc1_ens'][0] == frame['acc1'][0]
    table = per_exit_table(frame).splitlines()
    assert len(table) == 1 + 3 + 1 and table[0].split('  ')[:4] == ['exit', 'top-1 %', 'top-5 %',
                                                                     'ensemble top-1 %']
    assert 'ECE %' in table[0] and 'MMACs' in table[0]  # percent, saying so; costs in millions
    assert table[1].split()[1] == f'{100 * frame["acc1"][0]:.2f}'


def test_figures_overlay_snapshots_named_by_their_labels(tmp_path, monkeypatch):
    figures, savefig = [], plots.Figure.savefig
    monkeypatch.setattr(plots.Figure, 'savefig',
                        lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    costs = [1e6, 2e6, 4e6]
    anytime, sweeps = [], []
    for seed, name in enumerate(['dbt', 'standard']):
        logits, labels = random_logits(seed=seed)
        report = exit_report(logits, labels, [{'macs': c, 'macs_all_heads': c, 'params': 1}
                                              for c in costs])
        anytime.append(anytime_frame(report, 3).assign(snapshot=name))
        val = random_logits(seed=10 + seed)
        sweeps.append(budget_sweep(*val, logits, labels, costs).assign(snapshot=name))
    anytime, sweeps = pd.concat(anytime), pd.concat(sweeps)
    labels = {'dbt': 'DBT: dbt:0 (run 2)', 'standard': 'standard: std:0 (run 6)'}
    plots.anytime_figure(anytime, tmp_path / 'anytime.png', labels)
    plots.budgeted_figure(sweeps, anytime, tmp_path / 'budgeted.png', labels)
    assert_png(tmp_path / 'anytime.png')
    assert_png(tmp_path / 'budgeted.png')
    legends = [[t.get_text() for t in fig.axes[0].get_legend().get_texts()] for fig in figures]
    assert legends[0] == list(labels.values())
    assert legends[1][:3] == [f'{labels["dbt"]}: {what}' for what in (
        r'exit shares $\propto q^k$', 'one threshold', 'single exits')]
    plots.anytime_figure(anytime, tmp_path / 'plain.png')  # without labels: the snapshots
    assert [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()] == ['dbt',
                                                                                  'standard']


def test_product_anytime_is_a_column_of_the_frame_and_table_and_a_dashed_curve(tmp_path,
                                                                            monkeypatch):
    figures, savefig = [], plots.Figure.savefig
    monkeypatch.setattr(plots.Figure, 'savefig',
                        lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    logits, labels = random_logits()
    report = exit_report(logits, labels, [{'macs': c, 'macs_all_heads': c, 'params': 1}
                                          for c in (1e6, 2e6, 4e6)])
    report.update(anytime_poe.poe_report(logits, labels))
    frame = anytime_frame(report, 3)
    assert frame['acc1_poe'].tolist() == [report[f'acc1_poe{k}'] for k in range(3)]
    table = per_exit_table(frame).splitlines()
    column = table[0].split('  ').index('PoE top-1 %')
    assert table[1].split()[column] == f'{100 * frame["acc1_poe"][0]:.2f}'
    plots.anytime_figure(frame.assign(snapshot='dbt'), tmp_path / 'anytime.png')
    assert_png(tmp_path / 'anytime.png')
    lines = figures[0].axes[0].get_lines()
    assert [line.get_label() for line in lines] == ['dbt', 'dbt: product anytime']
    assert lines[1].get_linestyle() == '--'
    assert lines[1].get_ydata().tolist() == pytest.approx((100 * frame['acc1_poe']).tolist())
