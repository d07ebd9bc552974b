"""Where a training step of the paper's MsdNet + DBT spends its GPU time (torch.profiler).

    python3 benchmarks/profile_step.py                   # train_cifar.py's CUDA defaults
    python3 benchmarks/profile_step.py --no-amp --json out.json

Profiles a few eager steps with the default switches (every kernel, with its duration) and
times the replays of the same step captured as a CUDA graph. From these: kernels per step, the
GPU time those kernels take (their summed durations), the wall time of an eager step (launch
bound when it exceeds the GPU time) and of a replay (the gaps between kernels are what is left
over the GPU time), and the kernels that take the most time, by name. Writes a JSON
(``--json``) with the exact command and prints a table.
"""
import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import BATCH, ROOT, default_switches, fake_cifar, paper_step  # noqa: E402

from multiexit.data.cifar import DATASETS, DeviceLoader  # noqa: E402
from tools.kernel_count import kernel_table  # noqa: E402


def make_step(device, amp, graph):
    sw = dict(default_switches(cuda=True), amp=amp, cuda_graph=graph)
    step = paper_step(device, **sw)
    spec = DATASETS['Cifar100']
    x, y = fake_cifar(BATCH)
    loader = DeviceLoader(x, y, BATCH, spec.mean, spec.std, device,
                          channels_last=sw['channels_last'])
    return step, next(iter(loader))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--no-amp', action='store_true', help='fp32 (TF32 convolutions)')
    parser.add_argument('--steps', type=int, default=5, help='profiled eager steps')
    parser.add_argument('--replays', type=int, default=50, help='timed graph replays')
    parser.add_argument('--json', default=None)
    args = parser.parse_args()
    device = torch.device('cuda')
    amp = default_switches(cuda=True)['amp'] and not args.no_amp

    step, (x, y) = make_step(device, amp, graph=False)
    step.start_epoch()
    for _ in range(3):
        step(x, y)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(x, y)
    torch.cuda.synchronize()
    eager_ms = (time.perf_counter() - start) / args.steps * 1000
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step(x, y)
        torch.cuda.synchronize()
    n_kernels, gpu_ms, top = kernel_table(prof, args.steps)

    graphed, (x, y) = make_step(device, amp, graph=True)
    graphed.start_epoch()
    for _ in range(5):  # warm-up, capture
        graphed(x, y)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.replays):
        graphed(x, y)
    torch.cuda.synchronize()
    replay_ms = (time.perf_counter() - start) / args.replays * 1000

    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=datetime.date.today().isoformat(),
                  command=shlex.join(['python3'] + sys.argv), batch_size=BATCH, amp=amp,
                  kernels_per_step=n_kernels, gpu_kernel_ms_per_step=gpu_ms,
                  eager_step_ms=eager_ms, graph_replay_ms=replay_ms,
                  graph_captured=graphed.graph is not None,
                  top_kernels=[dict(name=n[:200], calls_per_step=c, ms_per_step=t)
                               for n, c, t in top[:25]])
    lines = [f"{result['device']}, batch {BATCH}, {'bf16 autocast' if amp else 'fp32'}",
             f'kernels per step {n_kernels:.0f}; their GPU time {gpu_ms:.2f} ms per step',
             f'eager step {eager_ms:.2f} ms; graph replay {replay_ms:.2f} ms '
             f'(gaps: {replay_ms - gpu_ms:.2f} ms)',
             f"{'ms/step':>8} {'calls':>6}  kernel"]
    lines += [f'{t:8.3f} {c:6.0f}  {n[:110]}' for n, c, t in top[:20]]
    print('\n'.join(lines))
    path = Path(args.json) if args.json else (
        ROOT / 'benchmarks' / 'results' / f"{result['date']}-profile_step-"
        f"{result['device'].replace(' ', '-').lower()}{'' if amp else '-fp32'}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
