"""Wall-clock throughput of early-exit inference against the full forward pass.

    python3 benchmarks/early_exit.py                    # the paper's MsdNet, random weights, CPU
    python3 benchmarks/early_exit.py --device cuda
    python3 benchmarks/early_exit.py --snapshot 3       # a trained run: its validation/test images

For each budget q, per-exit thresholds are fitted (``budgeted.fit_thresholds``) on the model's
confidences on calibration images so that the shares of samples leaving at the exits are
p_k ∝ q^k; ``inference.early_exit_predict`` is then timed on other images of the same kind,
against ``model(x)`` (every block and every head). With random weights the images are Gaussian
noise and BatchNorm takes its statistics from the calibration images (a random network with
fresh statistics saturates its softmax, and ties defeat the quantile thresholds); the weights
then do not matter for speed, the exit shares do. Configurations are timed round-robin, so that
a change in the load of a shared machine hits them alike, and the best of the repeats is
reported (the least disturbed one; every time is in the JSON, with the load average).

Writes benchmarks/results/<date>-early_exit-<device>.json with the exact command line.
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

from multiexit import checkpoints, datasets, flops, models  # noqa: E402
from multiexit.budgeted import (confidences, exit_indices, fit_thresholds,  # noqa: E402
                                geometric_fractions)
from multiexit.evaluation import load_model  # noqa: E402
from multiexit.inference import early_exit_predict  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument('--snapshot', help='a training run (id, snapshot_name or path) to time; '
                                      'default: the network of --cf-net with random weights')
    p.add_argument('--cf-net', default='{"call": "MsdNet"}',
                   help='architecture (JSON) for random weights; the default is the paper\'s')
    p.add_argument('--qs', type=float, nargs='+', default=[0.5, 1.0, 1.5],
                   help='budgets: exit shares p_k ∝ q^k')
    p.add_argument('--images', type=int, default=128, help='timed images per repeat')
    p.add_argument('--calibration', type=int, default=128, help='images to fit thresholds on')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--repeats', type=int, default=3)
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
    val = datasets.build(cf['cf_val'], 'val').loader('val', cf['data_dir'], n_cal, device)
    test = datasets.build(cf['cf_trn']).loader('test', cf['data_dir'], n_timed, device)
    return next(iter(val))[0], next(iter(test))[0]


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path('/proc/cpuinfo').read_text().splitlines()
        return next(line.split(':', 1)[1].strip() for line in cpuinfo
                    if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_inputs(args, device):
    """(model in eval mode, its cf_net, calibration images, timed images, what the model is)."""
    if args.snapshot:
        path = checkpoints.pick_checkpoint(checkpoints.resolve(
            args.snapshot, os.environ.get('MULTIEXIT_SNAPSHOTS', 'snapshots')))
        model, cf_net, _ = load_model(path, device, {'call': 'MsdNet'})  # bare: the paper's
        return (model, cf_net, *snapshot_images(path, args.calibration, args.images, device),
                str(path))
    cf_net = json.loads(args.cf_net)
    size = cf_net.get('in_shape', 32)
    calibration = torch.randn(args.calibration, 3, size, size, device=device)
    timed = torch.randn(args.images, 3, size, size, device=device)
    model = random_weight_model(cf_net, calibration, args.batch_size)
    return (model, cf_net, calibration, timed,
            'random weights, BatchNorm statistics of the calibration images')


@torch.inference_mode()
def fit_budgets(model, calibration, batches, qs, costs, batch_size):
    """Per q: thresholds from the calibration images, the exit shares they give on the timed
    images, and whether early exit decides there as the budgeted evaluation of the full pass."""
    full = lambda images: torch.cat([torch.stack(model(x)) for x in images], dim=1)
    cal_conf, _ = confidences(full(calibration.split(batch_size)))
    conf, pred = confidences(full(batches))
    n_exits = len(costs)
    budgets = []
    for q in qs:
        thresholds = fit_thresholds(cal_conf, geometric_fractions(n_exits, q))
        early_pred, exits = map(torch.cat, zip(*(early_exit_predict(model, x, thresholds)
                                                 for x in batches)))
        expected = exit_indices(conf, thresholds)
        shares = (torch.bincount(exits.cpu(), minlength=n_exits) / len(exits)).tolist()
        avg_macs = sum(s * c for s, c in zip(shares, costs))
        budgets.append({
            'q': q, 'thresholds': thresholds.tolist(),
            'target_exit_shares': geometric_fractions(n_exits, q).tolist(),
            'exit_shares': shares, 'avg_macs': avg_macs, 'macs_speedup': costs[-1] / avg_macs,
            'same_decisions_as_budgeted': torch.equal(exits, expected) and torch.equal(
                early_pred, pred.gather(0, expected[None])[0])})
    return budgets


@torch.inference_mode()
def time_runs(runs, batches, repeats, device):
    """{name: seconds per repeat} of each function over all batches, timed round-robin."""
    for fn in runs.values():  # warm-up: allocator, kernels for these shapes
        fn(batches[0])
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            synchronize(device)
            start = time.perf_counter()
            for x in batches:
                fn(x)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, cf_net, calibration, timed, source = load_inputs(args, device)
    costs = [c['macs_all_heads'] for c in flops.exit_costs(model, tuple(timed.shape[1:]))]
    batches = timed.split(args.batch_size)
    budgets = fit_budgets(model, calibration, batches, args.qs, costs, args.batch_size)
    runs = {'full forward': model}
    for b in budgets:
        runs[f"q={b['q']}"] = lambda x, t=b['thresholds']: early_exit_predict(model, x, t)
    load_before = os.getloadavg()
    times = time_runs(runs, batches, args.repeats, device)
    full_ips = len(timed) / min(times['full forward'])
    for b in budgets:
        b['seconds'] = times[f"q={b['q']}"]
        b['images_per_s'] = len(timed) / min(b['seconds'])
        b['speedup'] = b['images_per_s'] / full_ips

    result = {
        'command': shlex.join(sys.orig_argv),
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'device': str(device), 'device_name': device_name(device),
        'torch': torch.__version__, 'threads': torch.get_num_threads(),
        'load_average_before_after': [load_before, os.getloadavg()],
        'model': source, 'cf_net': cf_net, 'macs_all_heads': costs,
        'images': len(timed), 'batch_size': args.batch_size, 'repeats': args.repeats,
        'full_forward': {'images_per_s': full_ips, 'macs': costs[-1],
                         'seconds': times['full forward']},
        'budgets': budgets,
    }
    out = Path(args.out or ROOT / 'benchmarks' / 'results' /
               f'{datetime.date.today().isoformat()}-early_exit-{device.type}.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + '\n')
    print(f'full forward: {full_ips:.1f} images/s ({costs[-1] / 1e6:.1f} MMACs)')
    for b in budgets:
        print(f"q={b['q']}: {b['images_per_s']:.1f} images/s, x{b['speedup']:.2f} measured, "
              f"x{b['macs_speedup']:.2f} in MACs ({b['avg_macs'] / 1e6:.1f} MMACs)")
    print(f'wrote {out}')
    return result


if __name__ == '__main__':
    main()
