"""The per-exit report of a trained model (accuracy, calibration, cost) and its table."""
import pandas as pd
import torch

from ..early_exit.timing import TIME_COLUMNS
from ..losses import IGNORE
from ..metrics import MultiExitAccuracy
from .calibration import scaled

ECE_BINS = 15
# per-exit columns of temperature scaling (``calibration``), where a report has them
CALIBRATION_COLUMNS = ('ece_ts', 'temperature')


def expected_calibration_error(logits, labels, n_bins=ECE_BINS):
    """ECE per exit (Guo et al. 2017): the max-softmax confidences fall into ``n_bins``
    equal-width bins (i/n, (i+1)/n]; the sum over bins of |accuracy - mean confidence| weighted
    by the bin's share of the labelled samples. ``logits``: (exits, N, C); returns a list."""
    labelled = labels != IGNORE
    conf, pred = torch.softmax(logits[:, labelled].double(), dim=-1).max(dim=-1)
    gap = (pred == labels[labelled]).double() - conf  # (exits, N)
    n_exits, n = conf.shape
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    bins += n_bins * torch.arange(n_exits)[:, None]
    per_bin = torch.bincount(bins.flatten(), gap.flatten(), minlength=n_exits * n_bins)
    return (per_bin.view(n_exits, n_bins).abs().sum(dim=1) / max(n, 1)).tolist()


def exit_report(logits, labels, costs, acc_tops=(1, 5), exit_times=None, temperatures=None):
    """Flat dict: the accuracy metrics of ``metrics.metric_names`` and, per exit k,
    ``ece_clf{k}``, ``macs_clf{k}``, ``macs_all_heads_clf{k}`` and ``params_clf{k}``
    (``costs`` from ``flops.exit_costs``), ``ms_streaming_clf{k}`` and ``ms_latency_clf{k}``
    with ``exit_times`` (from ``early_exit.timing.exit_ms``), and ``temperature_clf{k}`` and
    ``ece_ts_clf{k}`` (the ECE of the logits divided by it) with ``temperatures``, one per exit
    (from ``calibration.fit_temperatures`` on another split); accuracy is theirs either way."""
    acc = MultiExitAccuracy(len(logits), acc_tops)
    acc.update(list(logits), labels)
    report = acc.compute()[0]
    ece = expected_calibration_error(logits, labels)
    per_exit = [('ece', ece)] + [(c, [row[c] for row in costs])
                                 for c in ('macs', 'macs_all_heads', 'params')]
    if temperatures is not None:
        per_exit += [('ece_ts', expected_calibration_error(scaled(logits, temperatures), labels)),
                     ('temperature', temperatures)]
    for key, values in per_exit + list((exit_times or {}).items()):
        report.update({f'{key}_clf{k}': v for k, v in enumerate(values)})
    return report


def anytime_frame(report, n_exits, acc_tops=(1, 5)):
    """One row per exit of an ``exit_report``: exit, acc{t}, acc{t}_ens (the mean softmax of
    exits 0..k; exit 0's own at k = 0), acc1_poe (``anytime_poe``), ece, the temperature-scaled
    ece_ts and temperature, macs, macs_all_heads, params, and the measured ms_streaming and
    ms_latency, each optional column where the report has it."""
    present = lambda columns: [c for c in columns if f'{c}_clf0' in report]
    costs = (['ece'] + present(CALIBRATION_COLUMNS) + ['macs', 'macs_all_heads', 'params']
             + present(TIME_COLUMNS))
    rows = []
    for k in range(n_exits):
        row = {'exit': k}
        row.update({f'acc{t}': report[f'acc{t}_clf{k}'] for t in acc_tops})
        row.update({f'acc{t}_ens': report[f'acc{t}_ens{k}' if k else f'acc{t}_clf0']
                    for t in acc_tops})
        if f'acc1_poe{k}' in report:
            row['acc1_poe'] = report[f'acc1_poe{k}']
        row.update({c: report[f'{c}_clf{k}'] for c in costs})
        rows.append(row)
    return pd.DataFrame(rows)


def per_exit_table(frame, acc_tops=(1, 5)):
    """Text table of an ``anytime_frame``: accuracies (Product Anytime's too where the frame has
    it) and ECE in %, costs in millions, and where the frame has them the temperature-scaled ECE
    in % (``ECE TS %``) with its temperature (``T``) and the measured times in ms per image."""
    times = [c for c in TIME_COLUMNS if c in frame]
    poe = ['acc1_poe'] if 'acc1_poe' in frame else []
    scaled_ece = 'ece_ts' in frame
    head = (['exit'] + [f'top-{t} %' for t in acc_tops] + [f'ensemble top-{t} %' for t in acc_tops]
            + ['PoE top-1 %'] * len(poe) + ['ECE %'] + (['ECE TS %', 'T'] if scaled_ece else [])
            + ['MMACs', 'MMACs all heads', 'Mparams']
            + [c.replace('_', ' ') for c in times])
    pct = [f'acc{t}' for t in acc_tops] + [f'acc{t}_ens' for t in acc_tops] + poe + ['ece']
    rows = [[str(r.exit)] + [f'{100 * getattr(r, c):.2f}' for c in pct]
            + ([f'{100 * r.ece_ts:.2f}', f'{r.temperature:.3f}'] if scaled_ece else [])
            + [f'{getattr(r, c) / 1e6:.2f}' for c in ('macs', 'macs_all_heads')]
            + [f'{r.params / 1e6:.3f}'] + [f'{getattr(r, c):.3f}' for c in times]
            for r in frame.itertuples()]
    rows.append(['avg'] + [f'{100 * frame[f"acc{t}"].mean():.2f}' for t in acc_tops]
                + [''] * (len(head) - 1 - len(acc_tops)))
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: '  '.join(c.rjust(w) for c, w in zip(r, widths))
    return '\n'.join([fmt(head)] + [fmt(r) for r in rows])
