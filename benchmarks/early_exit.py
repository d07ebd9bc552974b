"""Wall-clock speed of early exit against the full forward pass, per batch size and budget.

    python3 benchmarks/early_exit.py                    # the paper's MsdNet, random weights, CPU
    python3 benchmarks/early_exit.py --device cuda      # batch sizes 1, 16, 256 and 1024
    python3 benchmarks/early_exit.py --snapshot 3       # a trained run: its validation/test images

For each budget q, per-exit thresholds are fitted (``early_exit.thresholds.fit_thresholds``) on
the model's confidences on calibration images so that the shares of samples leaving at the exits
are p_k ∝ q^k. For each batch size B, a stream of other images (--batches full batches, at least
--min-images) runs through the full forward pass (``model(x)`` on batches of B, replayed as a
CUDA graph on a GPU) and through every early-exit mode at B:
  streaming  ``streaming.StreamingExit``: a queue in front of every block, full batches only
  latency    ``latency.LatencyExit``: B images at a time (for B <= --latency-max-batch)
  shrinking  ``inference.early_exit_predict`` on batches of B, which shrink as images leave
Each row (mode, batch size, q) has ``macs_ratio`` (full MACs over the mean MACs per image),
``speedup`` (full forward time over early-exit time) and ``identical`` (predictions and exits
equal the budgeted decisions on the full pass at B), next to the measured ms per image and the
one predicted from the measured time per image of each exit (``exits``, next to its MACs).

On CUDA, convolutions and matrix products run in fp32 without TF32 (``tf32`` in the JSON): the
budgeted decisions are defined in fp32, and TF32 would round a partial batch at the end of a
stream (another batch size, other kernels) differently by about 1e-3.

With random weights the images are Gaussian noise and BatchNorm takes its statistics from the
calibration images (a random network with fresh statistics saturates its softmax, and ties
defeat the quantile thresholds); the weights then do not matter for speed, the exit shares do.
Per batch size, configurations are timed round-robin, so that a change in the load of a shared
machine hits them alike, and the best of the repeats is reported (the least disturbed one; every
time is in the JSON, with the load average).

Writes benchmarks/results/<date>-early_exit-<device>.json with the exact command line, after
every batch size (``complete`` is false until the last).
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multiexit.runs import find  # noqa: E402
from multiexit import data, models  # noqa: E402
from multiexit.evaluate import flops  # noqa: E402
from multiexit.early_exit.rule import confidences, exit_indices  # noqa: E402
from multiexit.early_exit.thresholds import (fit_thresholds, geometric_fractions,  # noqa: E402
                                             mean_cost)
from multiexit.evaluate.passes import GraphedForward, load_model  # noqa: E402
from multiexit.early_exit.shrinking import early_exit_predict  # noqa: E402
from multiexit.early_exit.latency import LatencyExit  # noqa: E402
from multiexit.early_exit.fixed_size import synchronize  # noqa: E402
from multiexit.early_exit.streaming import StreamingExit  # noqa: E402

MODES = ('streaming', 'latency', 'shrinking')
CUDA_BATCH_SIZES = (1, 16, 256, 1024)
CPU_BATCH_SIZES = (1, 64)
# The targets on one GPU, for the paper's MsdNet at q = 0.5.
TARGET_Q = 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument('--snapshot', help='a training run (id, snapshot_name or path) to time; '
                                      'default: the network of --cf-net with random weights')
    p.add_argument('--cf-net', default='{"call": "MsdNet"}',
                   help='architecture (JSON) for random weights; the default is the paper\'s')
    p.add_argument('--qs', type=float, nargs='+', default=[0.5, 1.0, 1.5],
                   help='budgets: exit shares p_k ∝ q^k')
    p.add_argument('--batch-sizes', type=int, nargs='+',
                   help=f'default: {" ".join(map(str, CUDA_BATCH_SIZES))} on CUDA, '
                        f'{" ".join(map(str, CPU_BATCH_SIZES))} on the CPU')
    p.add_argument('--batches', type=int, default=8, help='full batches per timed stream')
    p.add_argument('--min-images', type=int, default=64, help='images per timed stream, at least')
    p.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    p.add_argument('--latency-max-batch', type=int, default=16,
                   help='the latency mode runs at the batch sizes up to this')
    p.add_argument('--calibration', type=int, default=128, help='images to fit thresholds on')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--exit-repeats', type=int, default=5,
                   help='timed runs of every block for the time per image of each exit')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, help="CPU threads (default: torch's); on a shared "
                   'machine 1 avoids waiting at every parallel region for a preempted thread')
    p.add_argument('--out', help='output JSON (default: benchmarks/results/<date>-early_exit-'
                                 '<device type>.json)')
    return p.parse_args(argv)


def random_weight_model(cf_net, calibration, batch_size):
    """The network with random weights, BatchNorm statistics from ``calibration``, in eval mode."""
    model = models.build(cf_net).to(calibration.device)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in calibration.split(batch_size):
            model(x)
    return model.eval()


def snapshot_images(path, n_cal, n_timed, device):
    """(calibration, timed) normalised images: the run's validation and test splits."""
    run_dir = path if path.is_dir() else path.parent
    cf = json.loads((run_dir / 'config.json').read_text())
    val = data.build(cf['cf_val'], 'val').loader('val', cf['data_dir'], n_cal, device)
    test = data.build(cf['cf_trn']).loader('test', cf['data_dir'], n_timed, device)
    return next(iter(val))[0], next(iter(test))[0]


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path('/proc/cpuinfo').read_text().splitlines()
        return next(line.split(':', 1)[1].strip() for line in cpuinfo
                    if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def stream_length(args, batch_size):
    """Images of the timed stream at ``batch_size``: whole batches, at least --min-images."""
    return batch_size * max(args.batches, -(-args.min_images // batch_size))


def load_inputs(args, device, n_timed):
    """(model in eval mode, its cf_net, calibration images, timed images, what the model is)."""
    if args.snapshot:
        path = find.pick_checkpoint(find.resolve(
            args.snapshot, os.environ.get('MULTIEXIT_SNAPSHOTS', 'snapshots')))
        model, cf_net, _ = load_model(path, device, {'call': 'MsdNet'})  # bare: the paper's
        return (model, cf_net, *snapshot_images(path, args.calibration, n_timed, device),
                str(path))
    cf_net = json.loads(args.cf_net)
    size = cf_net.get('in_shape', 32)
    calibration = torch.randn(args.calibration, 3, size, size, device=device)
    timed = torch.randn(n_timed, 3, size, size, device=device)
    model = random_weight_model(cf_net, calibration, 64)
    return (model, cf_net, calibration, timed,
            'random weights, BatchNorm statistics of the calibration images')


@torch.inference_mode()
def fit_budgets(model, calibration, qs):
    """Per q: the thresholds fitted on the calibration images, and the shares they aim at."""
    cal_conf, _ = confidences(torch.cat([torch.stack(model(x)) for x in calibration.split(64)],
                                        dim=1))
    n_exits = len(model.exits)
    return [{'q': q, 'thresholds': fit_thresholds(cal_conf, geometric_fractions(n_exits, q)),
             'target_exit_shares': geometric_fractions(n_exits, q).tolist()} for q in qs]


@torch.inference_mode()
def time_runs(runs, repeats, device):
    """({name: seconds per repeat}, {name: what its first, warm-up call returned}), every
    function timed round-robin."""
    first = {name: fn() for name, fn in runs.items()}  # warm-up: allocator, kernels, captures
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times, first


def shrinking(model, batches, thresholds):
    pred, exits = map(torch.cat, zip(*(early_exit_predict(model, x, thresholds)
                                       for x in batches)))
    return pred, exits, None


def sweep_batch_size(model, x, batch_size, budgets, costs, args, device):
    """(full forward, per-exit costs and times, rows) at one batch size on the images ``x``."""
    batches = x.split(batch_size)
    full = GraphedForward(model) if device.type == 'cuda' else model
    modes = [m for m in args.modes if m != 'latency' or batch_size <= args.latency_max_batch]
    runners = {mode: cls(model, batch_size, tuple(x.shape[1:]))
               for mode, cls in (('streaming', StreamingExit), ('latency', LatencyExit))
               if mode in modes}
    runs = {'full': lambda: torch.cat([torch.stack(full(b)) for b in batches], dim=1)}
    for b in budgets:
        t = b['thresholds']
        for mode in modes:
            runs[(mode, b['q'])] = ((lambda t=t: shrinking(model, batches, t)) if mode == 'shrinking'
                                    else (lambda r=runners[mode], t=t: r.run(x, t)))
    times, outputs = time_runs(runs, args.repeats, device)
    conf, pred = confidences(outputs['full'])
    exits_info = {'macs_all_heads': costs}
    for mode in ('streaming', 'latency'):
        if mode in modes:
            exits_info[f'ms_{mode}'] = runners[mode].exit_ms(args.exit_repeats)
    full_s = min(times['full'])
    rows = []
    for b in budgets:
        expected = exit_indices(conf, b['thresholds'])
        expected_pred = pred.gather(0, expected[None])[0]
        for mode in modes:
            got_pred, got_exits, got_conf = outputs[(mode, b['q'])]
            seconds = min(times[(mode, b['q'])])
            row = {
                'mode': mode, 'batch_size': batch_size, 'q': b['q'], 'images': len(x),
                'macs_ratio': costs[-1] / mean_cost(expected, costs),
                'speedup': full_s / seconds,
                'identical': torch.equal(got_exits, expected) and torch.equal(got_pred,
                                                                              expected_pred),
                'differing': int(((got_exits != expected) | (got_pred != expected_pred)).sum()),
                'exit_shares': (torch.bincount(expected.cpu(), minlength=len(costs))
                                / len(x)).tolist(),
                'avg_macs': mean_cost(expected, costs),
                'images_per_s': len(x) / seconds, 'ms_per_image': 1e3 * seconds / len(x),
                'seconds': times[(mode, b['q'])]}
            if got_conf is not None:
                at_exit = conf.gather(0, expected[None])[0]
                row['max_confidence_difference'] = (got_conf - at_exit).abs().max().item()
                row['predicted_ms_per_image'] = mean_cost(expected, exits_info[f'ms_{mode}'])
            rows.append(row)
    full_forward = {'images': len(x), 'graph': isinstance(full, GraphedForward),
                    'images_per_s': len(x) / full_s, 'ms_per_image': 1e3 * full_s / len(x),
                    'seconds': times['full']}
    return full_forward, exits_info, rows


def targets(rows, device):
    """The issue's targets, each with what was measured: on a GPU, streaming at batch 256 at
    least half the MACs ratio and latency at batch 1 at least 2x, both at q = 0.5, identical
    predictions everywhere; on the CPU, streaming not slower than the shrinking early exit."""
    pick = lambda mode, b, q: next((r for r in rows if (r['mode'], r['batch_size'], r['q'])
                                    == (mode, b, q)), None)
    out = [{'what': 'identical predictions and exits in every row',
            'met': all(r['identical'] for r in rows)}]
    if device.type == 'cuda':
        for mode, b, needed in (('streaming', 256, None), ('latency', 1, 2.0)):
            r = pick(mode, b, TARGET_Q)
            if r:
                need = r['macs_ratio'] / 2 if needed is None else needed
                out.append({'what': f'{mode} at batch {b}, q={TARGET_Q}: speedup >= {need:.2f}'
                                    + (' (half the MACs ratio)' if needed is None else ''),
                            'speedup': r['speedup'], 'needed': need,
                            'met': r['speedup'] >= need})
        return out
    for r in rows:
        s = pick('shrinking', r['batch_size'], r['q'])
        if r['mode'] == 'streaming' and s:
            ratio = r['speedup'] / s['speedup']
            out.append({'what': f"streaming at batch {r['batch_size']}, q={r['q']}: not slower "
                                f'than the shrinking early exit',
                        'streaming_over_shrinking': ratio, 'met': ratio >= 1})
    return out


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = args.batch_sizes or (CUDA_BATCH_SIZES if device.type == 'cuda' else CPU_BATCH_SIZES)
    model, cf_net, calibration, timed, source = load_inputs(
        args, device, max(stream_length(args, b) for b in sizes))
    costs = [c['macs_all_heads'] for c in flops.exit_costs(model, tuple(timed.shape[1:]))]
    budgets = fit_budgets(model, calibration, args.qs)
    out = Path(args.out or ROOT / 'benchmarks' / 'results' /
               f'{datetime.date.today().isoformat()}-early_exit-{device.type}.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        'command': shlex.join(sys.orig_argv),
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'device': str(device), 'device_name': device_name(device),
        'torch': torch.__version__, 'threads': torch.get_num_threads(),
        'tf32': device.type == 'cuda' and torch.backends.cudnn.allow_tf32,
        'load_average_before_after': [os.getloadavg()],
        'model': source, 'cf_net': cf_net, 'macs_all_heads': costs,
        'calibration': len(calibration), 'repeats': args.repeats, 'batch_sizes': list(sizes),
        'budgets': [dict(b, thresholds=b['thresholds'].tolist()) for b in budgets],
        'full_forward': {}, 'exits': {}, 'complete': False,
    }
    key = 'gpu_speedup' if device.type == 'cuda' else 'cpu_speedup'
    result[key] = []
    print(f'full forward: {costs[-1] / 1e6:.1f} MMACs per image')
    for b in sizes:
        x = timed[:stream_length(args, b)]
        full, exits_info, rows = sweep_batch_size(model, x, b, budgets, costs, args, device)
        result['full_forward'][str(b)], result['exits'][str(b)] = full, exits_info
        result[key] += rows
        result['targets'] = targets(result[key], device)
        result['complete'] = b == sizes[-1]
        if result['complete']:
            result['load_average_before_after'].append(os.getloadavg())
        out.write_text(json.dumps(result, indent=2) + '\n')
        print(f"batch {b}: full forward {full['images_per_s']:.1f} images/s"
              + ('' if full['graph'] else ' (eager)'))
        for r in rows:
            print(f"  {r['mode']:<9} q={r['q']}: x{r['speedup']:.2f} measured, "
                  f"x{r['macs_ratio']:.2f} in MACs, {r['ms_per_image']:.3f} ms per image"
                  + ('' if r['identical'] else ', NOT IDENTICAL'))
    for t in result['targets']:
        print(f"{'met' if t['met'] else 'MISSED'}: {t['what']}"
              + ''.join(f', {k} {t[k]:.2f}' for k in ('speedup', 'streaming_over_shrinking')
                        if k in t))
    print(f'wrote {out}')
    return result


if __name__ == '__main__':
    main()
