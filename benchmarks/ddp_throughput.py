"""Training throughput of the paper's MsdNet + DBT with DDP, for one process or several.

    python3 benchmarks/ddp_throughput.py --device cpu               # 1 process
    torchrun --nproc_per_node=2 benchmarks/ddp_throughput.py --device cpu
    torchrun --nproc_per_node=8 benchmarks/ddp_throughput.py       # 8 GPUs

The global batch is 64 images (--batch) whatever the number of processes, each taking its part,
as train_cifar.py does; the images are random uint8 of CIFAR's shape. Rank 0 times --steps steps
after --warmup untimed ones (synchronising the device before reading the clock) and writes
benchmarks/results/<date>-ddp_throughput-<device>-<processes>x<threads per process>.json.
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multiexit.accel import distributed  # noqa: E402
from multiexit import losses, models  # noqa: E402
from multiexit.data.cifar import DATASETS, DeviceLoader  # noqa: E402
from multiexit.train.step import TrainStep  # noqa: E402
from multiexit.train.loop import train_epoch  # noqa: E402
from multiexit.train.run import resolve_device  # noqa: E402

PAPER_LOSS = dict(call='DistillationBasedLoss', n_exits=11, acc_tops=[1, 5], C=0.5, maxprob=0.5,
                  global_scale=2.0 * 5 / 11)


def loader(n_steps, batch, device, seed):
    g = torch.Generator().manual_seed(seed)
    n = n_steps * batch
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 100, (n,), generator=g)
    spec = DATASETS['Cifar100']
    return DeviceLoader(images, labels, batch, spec.mean, spec.std, device, augment=True,
                        shuffle=True, drop_last=True, rank=distributed.rank(),
                        world_size=distributed.world_size())


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(args):
    device = resolve_device(0 if args.device == 'cuda' else -1)
    torch.manual_seed(0)
    model = models.build(dict(call='MsdNet')).to(device)
    loss_fn = losses.build(PAPER_LOSS).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    step = model
    if distributed.world_size() > 1:
        model, step = distributed.wrap(model, device, sync_bn=args.sync_bn)
    step = TrainStep(step, loss_fn, opt, 11, (1, 5), device)
    train_epoch(step, loader(args.warmup, args.batch, device, 1))
    timed = loader(args.steps, args.batch, device, 2)
    sync(device)
    start = time.perf_counter()
    train_epoch(step, timed)  # ends with a host sync
    sync(device)
    return args.steps * args.batch / (time.perf_counter() - start), device


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--batch', type=int, default=64, help='global batch')
    parser.add_argument('--sync-bn', action='store_true')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
    args = parser.parse_args()
    with distributed.process_group(0 if args.device == 'cuda' else -1, timeout_s=600):
        load_before = os.getloadavg()
        images_per_s, device = measure(args)
        if distributed.rank():
            return
        world = distributed.world_size()
        result = {
            'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
            'processes': world, 'threads_per_process': torch.get_num_threads(),
            'cpu_cores': os.cpu_count(), 'torch': torch.__version__,
            'command': (f'torchrun --nproc_per_node={world} ' if world > 1 else 'python3 ')
                       + ' '.join(sys.argv),
            'date': datetime.date.today().isoformat(),
            'global_batch': args.batch, 'timed_steps': args.steps, 'warmup_steps': args.warmup,
            'sync_bn': args.sync_bn, 'train_images_per_s': images_per_s,
            'load_average_before_after': [load_before, os.getloadavg()],
        }
    print(f"{world} process(es) on {result['device']}, {result['threads_per_process']} "
          f'thread(s) each: {images_per_s:.1f} training images/s')
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = (f"{result['date']}-ddp_throughput-{result['device'].replace(' ', '-').lower()}-"
            f"{world}x{result['threads_per_process']}.json")
    path = out / name
    path.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
