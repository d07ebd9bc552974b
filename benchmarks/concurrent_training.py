"""Total training throughput of N processes that train at once on one GPU.

    python3 benchmarks/concurrent_training.py --procs 1 2 4 --seconds 10

Each process is what one cell of the paper's grid runs: the paper's MsdNet + DBT at batch 64
with train_cifar.py's CUDA defaults (multiexit.config.TrainConfig's), on random images. The processes
warm up (cuDNN autotuning, the CUDA graph capture), wait for each other at a barrier, then train
for ``--seconds``; each reports its images/s and the total is their sum. This says how many grid
cells should share a GPU. Writes a JSON with the exact command (``--json``).
"""
import argparse
import datetime
import json
import multiprocessing as mp
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (BATCH, ROOT, RUN_DEFAULTS, default_switches,  # noqa: E402
                              fake_cifar, paper_step)

from multiexit.data.cifar import DATASETS, DeviceLoader  # noqa: E402
from multiexit.train.loop import train_epoch  # noqa: E402


def worker(barrier, seconds, results, index):
    device = torch.device('cuda')
    torch.backends.cudnn.benchmark = RUN_DEFAULTS['cudnn_benchmark']
    sw = default_switches(cuda=True)
    step = paper_step(device, **sw)
    spec = DATASETS['Cifar100']
    images, labels = fake_cifar(20 * BATCH, seed=index)
    loader = DeviceLoader(images, labels, BATCH, spec.mean, spec.std, device, augment=True,
                          shuffle=True, drop_last=True, channels_last=sw['channels_last'])
    train_epoch(step, loader)  # warm-up and capture
    barrier.wait()
    start = time.perf_counter()
    n, epoch = 0, 1
    step.start_epoch()
    while time.perf_counter() - start < seconds:
        loader.set_epoch(epoch)
        for x, y in loader:
            step(x, y)
            n += 1
            if n % 10 == 0:
                torch.cuda.synchronize()  # host sync, measurement only: keep the clock honest
        epoch += 1
    torch.cuda.synchronize()
    results[index] = n * BATCH / (time.perf_counter() - start)


def measure(n_procs, seconds):
    ctx = mp.get_context('spawn')
    barrier = ctx.Barrier(n_procs)
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=worker, args=(barrier, seconds, results, i))
             for i in range(n_procs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs) or len(results) != n_procs:
        raise RuntimeError(f'{n_procs} processes: exit codes {[p.exitcode for p in procs]}')
    return [results[i] for i in range(n_procs)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--procs', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--seconds', type=float, default=10.0, help='timed seconds per setting')
    parser.add_argument('--json', default=None, help='output file (default: benchmarks/results/'
                        '<date>-concurrent_training-<device>.json)')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit('error: concurrent_training.py measures processes sharing a GPU; none is visible')
    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    rows = {}
    for n in args.procs:
        per_proc = measure(n, args.seconds)
        rows[str(n)] = dict(per_process_images_per_s=per_proc, total_images_per_s=sum(per_proc))
        print(f'{n} process(es): {sum(per_proc):9.1f} images/s in total '
              f'({", ".join(f"{v:.0f}" for v in per_proc)})', flush=True)
    result = dict(device=device, torch=torch.__version__, date=date,
                  command=shlex.join(['python3'] + sys.argv), batch_size=BATCH,
                  seconds=args.seconds, defaults=default_switches(cuda=True), procs=rows)
    path = Path(args.json) if args.json else (
        ROOT / 'benchmarks' / 'results'
        / f"{date}-concurrent_training-{device.replace(' ', '-').lower()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
