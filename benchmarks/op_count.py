"""Kernels per training step of the paper's MsdNet + DBT, for the default switches and variants.

    python3 benchmarks/op_count.py                  # CPU: ops that launch kernels, in seconds
    python3 benchmarks/op_count.py --device cuda    # + CUDA kernels per step (torch.profiler)
    python3 benchmarks/op_count.py --variants default,fp32 --json out.json

A step is ``multiexit.train.step``'s: forward, the DBT loss, the metrics, backward, SGD and the
accumulators. On the CPU, ``multiexit.kernel_count.OpCounter`` counts the aten ops that reach
the kernels (below autograd and autocast: the backward pass and autocast's casts count; views
and allocations do not) of one step after a warm-up step. The count does not depend on the
batch size, so it runs at batch ``--count-batch`` (4) for speed and is reported per step of
batch 64 and per training image. On the CPU, bf16 autocast follows the CPU's cast policy, which
casts the same convolution and linear weights as CUDA's. On CUDA (``--device cuda``) the
profiler counts the kernels themselves, at batch 64, of eager steps and of graph replays.

Variants (the switches of ``train_throughput.paper_step``; default = train_cifar.py's CUDA path):
  default        bf16 autocast, channels_last, fused SGD
  fp32           default without bf16 autocast (on CUDA: TF32 convolutions)
  torch_batchnorm  fp32 with torch's BatchNorm2d, which adds 1 to num_batches_tracked in
                 every training pass (one op per BatchNorm per step: before issue 26)
  for_loop_sgd   default with SGD's for-loop implementation
Writes benchmarks/results/<date>-op_count-<device>.json (or ``--json``) with the exact command.
"""
import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import BATCH, ROOT, default_switches, paper_step  # noqa: E402

from tools.kernel_count import count_ops, cuda_kernels  # noqa: E402
from multiexit.models.batchnorm import BatchNorm2d  # noqa: E402

VARIANTS = {  # name: changes to the default switches (torch_batchnorm: not a switch of ours)
    'default': {},
    'fp32': dict(amp=False),
    'torch_batchnorm': dict(amp=False, torch_batchnorm=True),
    'for_loop_sgd': dict(fused=False),
}
TOP = 30  # ops listed by name per variant


def switches_of(name):
    return dict(default_switches(cuda=True), cuda_graph=False, **VARIANTS[name])


def variant_step(name, device, **changes):
    """The training step of the variant ``name`` (with ``changes`` to its switches)."""
    sw = dict(switches_of(name), **changes)
    torchs = sw.pop('torch_batchnorm', False)
    step = paper_step(device, **sw)
    if torchs:
        for m in step.model.modules():
            if isinstance(m, BatchNorm2d):
                m.__class__ = nn.BatchNorm2d
    return step


def batch(device, n, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (n,), generator=g).to(device)
    return (x.to(memory_format=torch.channels_last) if channels_last else x), y


def counted(name, device, n):
    """(ops per step, Counter by op name) of the variant ``name``, after one warm-up step."""
    step = variant_step(name, device)
    x, y = batch(device, n, switches_of(name)['channels_last'])
    step.start_epoch()
    step(x, y)  # lazy state: momentum buffers, the fused optimizer's first step
    return count_ops(lambda: step(x, y))


def cuda_counts(name, device, warmup=3, calls=3):
    """CUDA kernels per step of the variant ``name`` at batch 64: {eager: n} and, for the
    default, {graph: n} of the replayed step."""
    out = {}
    for graph in ((False, True) if name == 'default' else (False,)):
        step = variant_step(name, device, cuda_graph=graph)
        x, y = batch(device, BATCH, switches_of(name)['channels_last'])
        step.start_epoch()
        for _ in range(warmup + graph):  # cuDNN's first calls; then the capture
            step(x, y)
        n, gpu_ms, _ = cuda_kernels(lambda: step(x, y), calls)
        out['graph' if graph else 'eager'] = dict(kernels=n, gpu_ms=gpu_ms)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--variants', default=','.join(VARIANTS),
                        help=f'comma-separated, of: {", ".join(VARIANTS)}')
    parser.add_argument('--count-batch', type=int, default=4,
                        help='batch size of the counted step (the count does not depend on it)')
    parser.add_argument('--json', default=None, help='output file (default: benchmarks/results/'
                        '<date>-op_count-<device>.json)')
    args = parser.parse_args()
    names = args.variants.split(',')
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f'unknown variants {sorted(unknown)}; known: {", ".join(VARIANTS)}')
    device = torch.device(args.device)
    date = datetime.date.today().isoformat()
    result = dict(command=shlex.join(['python3'] + sys.argv), date=date, torch=torch.__version__,
                  cpu=platform.processor() or platform.machine(),
                  device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
                  batch_size=BATCH, count_batch=args.count_batch,
                  variants={n: switches_of(n) for n in names},
                  ops_per_step={}, ops_per_image={}, ops_by_name={}, count_s={})
    if device.type == 'cuda':
        result['cuda_kernels_per_step'] = {}
    path = Path(args.json) if args.json else (
        ROOT / 'benchmarks' / 'results' / f'{date}-op_count-{args.device}.json')
    print(f"{'variant':>16} {'ops/step':>9} {'ops/image':>10}"
          + (f" {'CUDA kernels (eager, graph)':>28}" if device.type == 'cuda' else ''))
    for name in names:
        start = time.perf_counter()
        total, by_name = counted(name, 'cpu', args.count_batch)
        result['count_s'][name] = round(time.perf_counter() - start, 1)
        result['ops_per_step'][name] = total
        result['ops_per_image'][name] = total / BATCH
        result['ops_by_name'][name] = dict(by_name.most_common(TOP))
        line = f'{name:>16} {total:9d} {total / BATCH:10.1f}'
        if device.type == 'cuda':
            cuda = result['cuda_kernels_per_step'][name] = cuda_counts(name, device)
            line += f" {cuda['eager']['kernels']:14.0f} " + (
                f"{cuda['graph']['kernels']:13.0f}" if 'graph' in cuda else f"{'':13}")
        print(line, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
