"""Evaluation: metrics over a loader, loading a snapshot to evaluate, the per-exit report
(accuracy, calibration, cost) and its table."""
import sys

import pandas as pd
import torch

from .. import models
from ..accel import streams
from ..early_exit.timing import TIME_COLUMNS
from ..errors import SnapshotError
from ..losses import IGNORE
from ..metrics import MultiExitAccuracy
from ..train import checkpoint

ECE_BINS = 15


class GraphedForward:
    """``model(x)`` in eval mode, replayed as a CUDA graph for batches of the first full shape.

    The first batch runs eagerly (cuDNN autotuning), the next of the same shape is captured;
    later batches of that shape are copied into the static input and replayed, other shapes (a
    last, smaller batch) run eagerly. The returned logits are the graph's static outputs: use
    them before the next call. The graph reads the weights and BatchNorm statistics in place, so
    it stays valid while training updates them. A failed capture prints one warning line and
    leaves the forward pass eager. ``cuda_streams``: the model's independent branches on
    parallel streams (``multiexit.accel.streams``), in the warm-up as in the graph.
    """

    def __init__(self, model, amp=False, cuda_streams=False):
        self.model, self.amp, self.cuda_streams = model, amp, cuda_streams
        self.graph = self.shape = self.static_x = self.static_out = None
        self.warm = self.failed = False

    def _eager(self, x):
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.amp,
                            cache_enabled=False), streams.parallel(x.device, self.cuda_streams):
            return self.model(x)

    def __call__(self, x):
        if self.graph is not None and x.shape == self.shape:
            self.static_x.copy_(x)
            self.graph.replay()
            return self.static_out
        if self.failed or self.graph is not None or x.device.type != 'cuda':
            return self._eager(x)
        if not self.warm:
            self.warm = True
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                out = self._eager(x)
            torch.cuda.current_stream(x.device).wait_stream(side)
            return out
        graph, self.static_x = torch.cuda.CUDAGraph(), x.clone()
        try:
            with torch.cuda.graph(graph):  # host sync (once)
                self.static_out = self._eager(self.static_x)
        except Exception as e:  # noqa: BLE001 - the eager forward is still correct
            first = (str(e).strip().splitlines() or [''])[0]
            print(f'warning: CUDA graph capture of the evaluation forward failed '
                  f'({type(e).__name__}: {first}); evaluating eagerly', file=sys.stderr,
                  flush=True)
            self.failed, self.static_x, self.static_out = True, None, None
            torch.cuda.synchronize(x.device)
            return self._eager(x)
        self.graph, self.shape = graph, x.shape
        graph.replay()
        return self.static_out


@torch.inference_mode()
def evaluate(model, loader, n_exits, acc_tops=(1, 5), T=None, progress=None, amp=False,
             forward=None):
    """Metrics of ``model`` over ``loader``; ``T`` (a loss temperature) adds adj_maxprob;
    ``amp``: bf16 autocast; ``forward``: what computes the logits (default: ``model``; a
    ``GraphedForward`` of it on CUDA). A sharded ``loader`` gives every rank the metrics of the
    whole split (each example counted once). A fused ``model`` of K members with their
    ``loader`` (``pack.MemberBatches``) gives a list, each member's metrics."""
    model.eval()
    metrics = MultiExitAccuracy(n_exits, acc_tops, loader.device,
                                getattr(loader, 'members', None))
    batches = progress(loader) if progress else loader
    for x, y in batches:
        if forward is None:
            with torch.autocast(loader.device.type, torch.bfloat16, enabled=amp):
                logits = model(x)
        else:
            logits = forward(x)
        metrics.update(logits, y, T)
    if loader.world_size > 1:
        metrics.sum_over_ranks()
    return metrics.compute()  # host sync, once


@torch.inference_mode()
def exit_logits(model, loader, progress=None):
    """(logits (exits, N, classes) float32, labels (N,)) on the CPU, in ``loader``'s order."""
    model.eval()
    logits, labels = [], []
    for x, y in progress(loader) if progress else loader:
        logits.append(torch.stack(model(x)).float())
        labels.append(y)
    return torch.cat(logits, dim=1).cpu(), torch.cat(labels).cpu()  # host sync, once


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


def exit_report(logits, labels, costs, acc_tops=(1, 5), exit_times=None):
    """Flat dict: the accuracy metrics of ``metrics.metric_names`` and, per exit k,
    ``ece_clf{k}``, ``macs_clf{k}``, ``macs_all_heads_clf{k}`` and ``params_clf{k}``
    (``costs`` from ``flops.exit_costs``), and ``ms_streaming_clf{k}`` and ``ms_latency_clf{k}``
    with ``exit_times`` (from ``exit_timing.exit_ms``)."""
    acc = MultiExitAccuracy(len(logits), acc_tops)
    acc.update(list(logits), labels)
    report = acc.compute()
    ece = expected_calibration_error(logits, labels)
    per_exit = [('ece', ece)] + [(c, [row[c] for row in costs])
                                 for c in ('macs', 'macs_all_heads', 'params')]
    for key, values in per_exit + list((exit_times or {}).items()):
        report.update({f'{key}_clf{k}': v for k, v in enumerate(values)})
    return report


def anytime_frame(report, n_exits, acc_tops=(1, 5)):
    """One row per exit of an ``exit_report``: exit, acc{t}, acc{t}_ens (the mean softmax of
    exits 0..k; exit 0's own at k = 0), ece, macs, macs_all_heads, params, and the measured
    ms_streaming and ms_latency where the report has them."""
    costs = ['ece', 'macs', 'macs_all_heads', 'params'] + [c for c in TIME_COLUMNS
                                                           if f'{c}_clf0' in report]
    rows = []
    for k in range(n_exits):
        row = {'exit': k}
        row.update({f'acc{t}': report[f'acc{t}_clf{k}'] for t in acc_tops})
        row.update({f'acc{t}_ens': report[f'acc{t}_ens{k}' if k else f'acc{t}_clf0']
                    for t in acc_tops})
        row.update({c: report[f'{c}_clf{k}'] for c in costs})
        rows.append(row)
    return pd.DataFrame(rows)


def load_model(path, device, cf_net_default=None):
    """(model in eval mode, cf_net, checkpoint dict) from a checkpoint file."""
    ckpt = checkpoint.load(path)
    state, cf_net, extra = checkpoint.unpack_model(ckpt, path, cf_net_default)
    model = models.build(cf_net)
    try:
        models.load_original_state_dict(model, state)
    except RuntimeError as e:
        raise SnapshotError(f'{path} does not fit cf_net={dict(cf_net)} (a different '
                            f'architecture?): {str(e).splitlines()[0]}') from None
    return model.to(device).eval(), cf_net, extra


def per_exit_table(frame, acc_tops=(1, 5)):
    """Text table of an ``anytime_frame``: accuracies and ECE in %, costs in millions, measured
    times (where the frame has them) in ms per image."""
    times = [c for c in TIME_COLUMNS if c in frame]
    head = (['exit'] + [f'top-{t} %' for t in acc_tops] + [f'ensemble top-{t} %' for t in acc_tops]
            + ['ECE %', 'MMACs', 'MMACs all heads', 'Mparams']
            + [c.replace('_', ' ') for c in times])
    pct = [f'acc{t}' for t in acc_tops] + [f'acc{t}_ens' for t in acc_tops] + ['ece']
    rows = [[str(r.exit)] + [f'{100 * getattr(r, c):.2f}' for c in pct]
            + [f'{getattr(r, c) / 1e6:.2f}' for c in ('macs', 'macs_all_heads')]
            + [f'{r.params / 1e6:.3f}'] + [f'{getattr(r, c):.3f}' for c in times]
            for r in frame.itertuples()]
    rows.append(['avg'] + [f'{100 * frame[f"acc{t}"].mean():.2f}' for t in acc_tops]
                + [''] * (len(head) - 1 - len(acc_tops)))
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: '  '.join(c.rjust(w) for c, w in zip(r, widths))
    return '\n'.join([fmt(head)] + [fmt(r) for r in rows])
