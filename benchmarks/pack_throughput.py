"""Throughput of packs (K runs of one network trained as one fused network) against one run
alone, in one process on one device; what it projects for the paper's 45-cell grid.

    python3 benchmarks/pack_throughput.py                  # CUDA: the paper's MsdNet
    python3 benchmarks/pack_throughput.py --device cpu --net smoke --ks 1,2 --steps 3 \\
        --micro-ks 1,2 --micro-dtypes fp32 --count-ops   # the CPU's figures, in minutes

Parts, in this order (each is recorded as it ends, so a time limit keeps what was measured;
``--deadline-s`` skips the parts that would start after it):
  op counts   (``--count-ops``, on the CPU whatever --device): the kernel-launching ops
              (tools.kernel_count) of one forward and backward of K paper MsdNets with the
              cross-entropy at batch 2, for one model alone, for ``torch.func.vmap`` over
              their stacked parameters (functional_call) and for the explicit fused network
              (multiexit.models.fused), K = 1, 3, 9; and of a whole training step alone and packed
  solo        a run alone, as train_cifar.py trains it (train.solo.Solo, the default
              switches: on CUDA bf16, channels_last, fused SGD, the whole step as a CUDA graph,
              parallel streams); training and validation images/s
  packs       a pack of K (``--ks``, default 1, 3, 9, 15) with the same switches: the grid's
              methods in turn (standard, DBT, distillation at T=4), seeds 0, 1, ...; aggregate
              training and validation images/s, peak memory, warm-up (eager steps, capture)
  micro       the fused network's convolutions alone: every convolution of the network at
              batch 64 with groups K (``--micro-ks``, default 1, 3, 9, 15, 45), forward and both
              backward passes, in bf16 and fp32, channels_last and NCHW; on CUDA each shape is
              replayed as a CUDA graph (GPU time, not launches). ``fusion_efficiency``: K x the
              time of K = 1 over the time of K (K when fusing costs nothing more than one
              model, 1 when it saves nothing); ``slower_than_separate``: the shapes whose fused
              convolution is slower than K separate ones (cuDNN's grouped-convolution paths)
Data: CIFAR-100 in the format of the python pickles, generated (150 images per class, the
paper's 100 + 50 split), each member with its own subset seed. Projections: the 45-cell grid
(sizes 25, 50, 100, 250, 450, 9 cells each, 300 epochs, 5,000 validation images per epoch) with
every cell alone (``projected_grid_solo_s``) and in packs of the best measured K that divides
9 (``projected_grid_s``; a pack never spans sizes). Writes
benchmarks/results/<date>-pack-<device>.json (or --json) with the exact command.
"""
import argparse
import copy
import datetime
import itertools
import json
import math
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multiexit import losses, models  # noqa: E402
from multiexit.models.fused import fuse  # noqa: E402
from multiexit.train.step import build_step  # noqa: E402
from multiexit.data.cifar import write_fake_cifar  # noqa: E402
from multiexit.evaluate.passes import evaluate  # noqa: E402
from tools.kernel_count import count_ops  # noqa: E402
from multiexit.config import TrainConfig  # noqa: E402
from multiexit.train.loop import train_epoch  # noqa: E402
from multiexit.train.pack import PackedRuns, PackLoss  # noqa: E402
from multiexit.train.run import Run, build_optimizer  # noqa: E402
from multiexit.train.solo import Solo  # noqa: E402

NETS = {'paper': dict(call='MsdNet'),  # its defaults are the paper's configuration
        'smoke': dict(call='MsdNet', n_exits=3, nlayers_to_exit=2, nlayers_between_exits=1,
                      nplanes_mulv=[2, 4, 8], exit_width=16, btneck_widths=[2, 2, 2])}
GS = 2.0 * 5 / 11
METHODS = [dict(call='ClassificationOnlyLoss'),  # the grid's, in turn
           dict(call='DistillationBasedLoss', C=0.5, maxprob=0.5, global_scale=GS),
           dict(call='DistillationLossConstTemp', C=0.5, T=4.0, global_scale=GS)]
OPT = dict(call='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
SCHEDULE = dict(call='MultiStepLR', milestones=[150, 225], gamma=0.1)
BATCH, EVAL_BATCH, TRAIN, VAL = 64, 250, 100, 50  # images per class
GRID = dict(sizes=(25, 50, 100, 250, 450), cells_per_size=9, epochs=300, val_images=5000,
            classes=100)
DTYPES = {'bf16': torch.bfloat16, 'fp32': torch.float32}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class First:
    """The first ``n`` batches of an epoch of ``loader`` (train_epoch and evaluate take it)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n
        self.world_size, self.device = 1, loader.device

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)


def member_runs(k, net, data_dir, run_root, gpu):
    """k runs of the grid's cells of one size: the methods in turn, seeds 0, 1, ..."""
    runs = []
    for i in range(k):
        seed = i // len(METHODS)
        cf_trn = dict(call='Cifar100', n_per_class=TRAIN + VAL, nval_per_class=VAL, augment=True,
                      seed=seed)
        cf_loss = dict(METHODS[i % len(METHODS)], acc_tops=[1, 5])
        run_dir = Path(run_root) / f'{k}-{i}'
        run_dir.mkdir(parents=True)
        cfg = TrainConfig(cf_net=dict(net, out_dim=100), cf_loss=cf_loss, cf_trn=cf_trn,
                          cf_val=dict(cf_trn, augment=False), cf_opt=OPT, cf_scheduler=SCHEDULE,
                          batch_size=BATCH, val_batch_size=EVAL_BATCH, n_epochs=300,
                          data_dir=data_dir, gpu=gpu, seed=seed)
        runs.append(Run(cfg, run_dir, log=lambda *a: None))
    return runs


def time_pack(runs, device, warmup, steps, val_batches, fused):
    """Aggregate training and validation images/s of ``runs`` (as a ``PackedRuns``, or ``Solo``
    for a run alone that is not ``fused``), its warm-up seconds (the
    eager steps and the capture of the graph) and its peak memory."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    trainer = PackedRuns(runs) if fused or len(runs) > 1 else Solo(runs[0])
    k, lead = len(runs), runs[0]
    trainer.train_loader.set_epoch(0)
    start = time.perf_counter()
    train_epoch(trainer.step, First(trainer.train_loader, warmup))
    sync(device)
    out = dict(warmup_s=time.perf_counter() - start)
    start = time.perf_counter()
    train_epoch(trainer.step, First(trainer.train_loader, steps))  # syncs once
    sync(device)
    out['train_images_per_s'] = steps * BATCH * k / (time.perf_counter() - start)
    if getattr(trainer.step, 'eager_only', False):
        raise RuntimeError('the CUDA graph capture failed: the step ran eagerly')
    val = First(trainer.val_loader, val_batches)
    for timed in (False, False, True):  # warm-up (cuDNN), capture, then timed
        start = time.perf_counter()
        evaluate(trainer.model, val, lead.n_exits, lead.acc_tops, trainer.T, amp=lead.amp,
                 forward=trainer.eval_forward, members=len(trainer.runs))
        sync(device)
    out['val_images_per_s'] = val_batches * EVAL_BATCH * k / (time.perf_counter() - start)
    if device.type == 'cuda':
        out['peak_memory_bytes'] = torch.cuda.max_memory_allocated(device)
    return out


def projected_grid_s(train_ips, val_ips, k):
    """Seconds of the 45-cell grid in packs of ``k`` cells (of one size) at these aggregate
    images/s; every size's 9 cells in ceil(9 / k) packs."""
    g, total = GRID, 0.0
    for size in g['sizes']:
        steps = size * g['classes'] // BATCH
        packs = math.ceil(g['cells_per_size'] / k)
        total += packs * g['epochs'] * k * (steps * BATCH / train_ips
                                            + g['val_images'] / val_ips)
    return total


# --- op counts -------------------------------------------------------------------------------

def _models(k, net):
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(models.build(net))
    return out


def _ce(logits, y):
    return losses.cross_entropy(torch.stack(logits), y)


def ops_alone(net, batch=2):
    model, = _models(1, net)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    return count_ops(lambda: _ce(model(x), y).backward())[0]


def ops_vmap(net, k, batch=2):
    """torch.func.vmap over the members' stacked parameters and buffers (functional_call)."""
    members = _models(k, net)
    params, buffers = torch.func.stack_module_state(members)
    base = copy.deepcopy(members[0]).to('meta')

    def one(p, b, x, y):
        return _ce(torch.func.functional_call(base, (p, b), (x,)), y)
    x, y = torch.randn(k, batch, 3, 32, 32), torch.randint(0, 100, (k, batch))
    step = lambda: torch.func.vmap(one, randomness='different')(params, buffers, x, y).sum(
        ).backward()
    return count_ops(step)[0]


def ops_fused(net, k, batch=2):
    fused = fuse(_models(k, net), always=True)
    x, y = torch.randn(batch, 3 * k, 32, 32), torch.randint(0, 100, (k, batch))
    return count_ops(lambda: _ce(fused(x), y).sum().backward())[0]


def ops_train_step(net, k, batch=2):
    """A whole training step (forward, the grid's losses, metrics, backward, SGD with one op
    per list of tensors as on CUDA), alone (k None) or as a fused pack of k."""
    members = _models(k or 1, net)
    model = fuse(members, always=True) if k else members[0]
    loss_fn = (PackLoss([losses.build(dict(METHODS[i % 3], n_exits=len(model.exits)))
                                for i in range(k)]) if k else
               losses.build(dict(METHODS[1], n_exits=len(model.exits))))
    opt = build_optimizer(dict(OPT, foreach=True), model.parameters(), torch.device('cpu'))
    step = build_step(model, loss_fn, opt, len(model.exits), (1, 5), 'cpu',
                            T=loss_fn.temperature, members=k or 1)
    x = torch.randn(batch, 3 * (k or 1), 32, 32)
    y = torch.randint(0, 100, (k, batch) if k else (batch,))
    step(x, y)  # the optimizer's state is created at the first step
    return count_ops(lambda: step(x, y))[0]


def op_counts(net):
    ks = (1, 3, 9)
    return {'what': 'kernel-launching ops (tools.kernel_count) dispatched on the CPU, batch 2',
            'forward_backward_ce': {
                'alone': ops_alone(net),
                'vmap': {str(k): ops_vmap(net, k) for k in ks},
                'fused': {str(k): ops_fused(net, k) for k in ks}},
            'train_step': {'alone': ops_train_step(net, None),
                           'fused': {str(k): ops_train_step(net, k) for k in ks}}}


# --- the convolutions alone ------------------------------------------------------------------

def conv_shapes(net):
    """{(in, out, kernel, stride, padding, bias, H, W): count} of the network's convolutions."""
    model, = _models(1, net)
    shapes = Counter()

    def record(conv, args):
        _, c, h, w = args[0].shape
        shapes[(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                conv.padding[0], conv.bias is not None, h, w)] += 1
    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return shapes


def time_conv(shape, k, dtype, channels_last, device, reps):
    """ms of one forward and both backward passes (input and weight) of the shape's convolution
    with groups k at batch 64: GPU time of a replayed CUDA graph on CUDA, wall time on the CPU."""
    c_in, c_out, size, stride, padding, bias, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    kw = dict(device=device, dtype=dtype)
    x = torch.randn(BATCH, k * c_in, h, w, **kw).contiguous(memory_format=fmt).requires_grad_()
    weight = torch.randn(k * c_out, c_in, size, size, **kw).contiguous(memory_format=fmt)
    weight.requires_grad_()
    b = torch.randn(k * c_out, **kw) if bias else None

    def step():
        y = F.conv2d(x, weight, b, stride, padding, groups=k)
        return torch.autograd.grad(y, (x, weight), torch.ones_like(y))
    for _ in range(2):
        step()
    sync(device)
    if device.type != 'cuda':
        start = time.perf_counter()
        for _ in range(reps):
            step()
        return (time.perf_counter() - start) * 1000 / reps
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            step()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    graph.replay()
    end.record()
    sync(device)
    return begin.elapsed_time(end) / reps


def micro(net, ks, dtypes, device, reps, deadline, save, out):
    """The convolutions alone, for every K, dtype and memory format (``time_conv``)."""
    shapes, alone = conv_shapes(net), {}
    out.update(shapes=len(shapes), convolutions=sum(shapes.values()), configs={})
    for dtype, channels_last, k in itertools.product(dtypes, (True, False), ks):
        name = f'{dtype} {"channels_last" if channels_last else "NCHW"}'
        if time.perf_counter() > deadline:
            out.setdefault('skipped', []).append(f'{name} K={k}')
            continue
        per_shape = {s: time_conv(s, k, DTYPES[dtype], channels_last, device, reps)
                     for s in shapes}
        config = out['configs'].setdefault(name, {'ms': {}, 'fusion_efficiency': {},
                                                  'slower_than_separate': {}})
        config['ms'][str(k)] = sum(n * per_shape[s] for s, n in shapes.items())
        one = alone.setdefault(name, per_shape) if k == 1 else alone.get(name)
        if one:
            config['fusion_efficiency'][str(k)] = k * config['ms']['1'] / config['ms'][str(k)]
            config['slower_than_separate'][str(k)] = [
                dict(zip(('in', 'out', 'kernel', 'stride', 'padding', 'bias', 'h', 'w'), s),
                     count=shapes[s], ms=per_shape[s], ms_separate=k * one[s])
                for s in shapes if per_shape[s] > k * one[s]]
        save()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--net', choices=sorted(NETS), default='paper')
    parser.add_argument('--ks', default='1,3,9,15', help='pack sizes, comma-separated')
    parser.add_argument('--steps', type=int, default=None, help='timed training steps per pack')
    parser.add_argument('--warmup', type=int, default=None,
                        help='untimed steps (the CUDA graph is captured at the 4th)')
    parser.add_argument('--val-batches', type=int, default=None,
                        help='validation batches of 250 per member, timed')
    parser.add_argument('--micro-ks', default='1,3,9,15,45')
    parser.add_argument('--micro-dtypes', default='bf16,fp32')
    parser.add_argument('--micro-reps', type=int, default=None)
    parser.add_argument('--count-ops', action='store_true',
                        help='the op counts (on the CPU, a minute or so)')
    parser.add_argument('--deadline-s', type=float, default=None,
                        help='parts that would start after this many seconds are skipped')
    parser.add_argument('--json', default=None, help='output file (default: '
                        'benchmarks/results/<date>-pack-<device>.json)')
    args = parser.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + (args.deadline_s if args.deadline_s is not None else math.inf)
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    steps = args.steps or (60 if cuda else 3)
    warmup = args.warmup or (8 if cuda else 1)
    val_batches = args.val_batches or (4 if cuda else 1)
    ks = [int(k) for k in args.ks.split(',')]
    device_name = torch.cuda.get_device_name(device) if cuda else 'cpu'
    date = datetime.date.today().isoformat()
    path = Path(args.json) if args.json else (
        ROOT / 'benchmarks' / 'results' / f"{date}-pack-{device_name.replace(' ', '-').lower()}.json")
    net = NETS[args.net]
    result = {
        'device': device_name, 'command': shlex.join(['python3'] + sys.argv), 'date': date,
        'cpu': platform.processor() or platform.machine(), 'cpu_threads': torch.get_num_threads(),
        'torch': torch.__version__, 'cuda': torch.version.cuda if cuda else None,
        'cudnn': torch.backends.cudnn.version() if cuda else None,
        'net': dict(net, name=args.net), 'batch_size_per_member': BATCH,
        'timed_steps': steps, 'warmup_steps': warmup, 'val_batches_per_member': val_batches,
        'fusion': 'explicit (multiexit.models.fused): grouped convolutions, BatchNorm over K x the '
                  'channels, batched products for the heads',
        'solo_images_per_s': None, 'solo_val_images_per_s': None,
        'pack_images_per_s': {}, 'pack_val_images_per_s': {}, 'peak_memory_bytes': {},
        'warmup_s': {}, 'errors': {}, 'skipped': [], 'grid': GRID,
    }

    def save():
        finish(result)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + '\n')

    def part(name, fn):
        if time.perf_counter() > deadline:
            result['skipped'].append(name)
            print(f'{name}: skipped (deadline)', flush=True)
            return
        start = time.perf_counter()
        try:
            fn()
            print(f'{name}: done in {time.perf_counter() - start:.0f} s', flush=True)
        except Exception as e:  # noqa: BLE001 - a failing part must not stop the others
            result['errors'][name] = f'{type(e).__name__}: {e}'.splitlines()[0][:500]
            print(f'{name}: FAILED {result["errors"][name]}', flush=True)
            traceback.print_exc()
        save()

    if args.count_ops:
        part('op counts', lambda: result.update(op_counts=op_counts(NETS['paper'])))
    gpu = device.index or 0 if cuda else -1
    with tempfile.TemporaryDirectory(prefix='pack_throughput_') as tmp:
        write_fake_cifar(tmp, 'Cifar100', n_train_per_class=TRAIN + VAL, n_test_per_class=1)

        def solo():
            out = time_pack(member_runs(1, net, tmp, Path(tmp) / 'solo', gpu)[:1], device,
                            warmup, steps, val_batches, fused=False)
            result.update(solo_images_per_s=out['train_images_per_s'],
                          solo_val_images_per_s=out['val_images_per_s'],
                          solo_warmup_s=out['warmup_s'],
                          solo_peak_memory_bytes=out.get('peak_memory_bytes'))
        part('solo', solo)
        for k in ks:
            def packed(k=k):
                out = time_pack(member_runs(k, net, tmp, Path(tmp) / f'pack{k}', gpu), device,
                                warmup, steps, val_batches, fused=True)
                result['pack_images_per_s'][str(k)] = out['train_images_per_s']
                result['pack_val_images_per_s'][str(k)] = out['val_images_per_s']
                result['warmup_s'][str(k)] = out['warmup_s']
                result['peak_memory_bytes'][str(k)] = out.get('peak_memory_bytes')
                print(f"  pack of {k}: {out['train_images_per_s']:.0f} training images/s",
                      flush=True)
            part(f'pack of {k}', packed)
            if cuda:
                torch.cuda.empty_cache()
    micro_out = result.setdefault('micro', {})
    part('micro', lambda: micro(net, [int(k) for k in args.micro_ks.split(',')],
                                args.micro_dtypes.split(','), device,
                                args.micro_reps or (10 if cuda else 2), deadline, save,
                                micro_out))
    result['total_s'] = time.perf_counter() - t0
    save()
    print(table(result))
    print(f'wrote {path}')


def finish(r):
    """The derived keys: speed-ups and the grid's projected times, from what was measured."""
    solo, solo_val = r['solo_images_per_s'], r['solo_val_images_per_s']
    packs, vals = r['pack_images_per_s'], r['pack_val_images_per_s']
    r['pack_speedup_vs_solo'] = {k: v / solo for k, v in packs.items()} if solo else {}
    r['projected_grid_solo_s'] = projected_grid_s(solo, solo_val, 1) if solo else None
    fits = {int(k): projected_grid_s(v, vals[k], int(k)) for k, v in packs.items()
            if GRID['cells_per_size'] % int(k) == 0}
    best = min(fits, key=fits.get, default=None)
    r['projected_grid_s'] = fits.get(best)
    r['projected_grid_best_k'] = best
    r['projected_grid_s_by_k'] = {str(k): v for k, v in fits.items()}


def table(r):
    lines = [f"{r['device']} (torch {r['torch']}), net {r['net']['name']}, batch "
             f"{r['batch_size_per_member']} per member"]
    if r['solo_images_per_s']:
        lines.append(f"solo: {r['solo_images_per_s']:9.1f} training images/s")
    for k, v in r['pack_images_per_s'].items():
        memory = r['peak_memory_bytes'].get(k)
        lines.append(f'pack of {k:>2}: {v:9.1f} training images/s'
                     + (f" (x{r['pack_speedup_vs_solo'][k]:.2f} solo)"
                        if k in r['pack_speedup_vs_solo'] else '')
                     + (f', peak {memory / 2**30:.1f} GiB' if memory else ''))
    for key in ('projected_grid_solo_s', 'projected_grid_s'):
        if r.get(key):
            lines.append(f'{key}: {r[key] / 3600:.1f} h' + (
                f" (packs of {r['projected_grid_best_k']})" if key == 'projected_grid_s' else ''))
    for name, config in r.get('micro', {}).get('configs', {}).items():
        lines.append(f'convolutions {name}: ' + ', '.join(
            f"K={k} {ms:.2f} ms (x{config['fusion_efficiency'].get(k, float('nan')):.1f})"
            for k, ms in config['ms'].items()))
    counts = r.get('op_counts')
    if counts:
        fb = counts['forward_backward_ce']
        lines.append(f"ops per forward+backward: alone {fb['alone']}, vmap {fb['vmap']}, "
                     f"fused {fb['fused']}")
    if r['errors']:
        lines.append(f"errors: {r['errors']}")
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
