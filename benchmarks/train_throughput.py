"""Training and evaluation throughput of the paper's MsdNet + DBT, side by side in one process.

    python benchmarks/train_throughput.py                  # CUDA if available, else CPU
    python benchmarks/train_throughput.py --device cpu --steps 10

Modes, each adding one change to the previous (CUDA-only ones are skipped on the CPU):
  reference          the original's mechanics: per-image torchvision transforms in a DataLoader
                     without workers, fp32, eager, temperature as a Python float (host sync per
                     step), for-loop SGD
  device_data        + uint8 data on the device, augmentation on whole batches
  device_temperature + temperature and metrics on the device (no host sync per step)
  channels_last      + NHWC model and batches (CUDA)
  amp                + bf16 autocast (CUDA)
  fused_sgd          + fused SGD (CUDA)
  compile            + torch.compile of model and loss (CUDA; --compile-mode)
  default            what train_cifar.py does by default on this device
Timing synchronises the device before reading the clock; warm-up steps (and compilation) are
excluded and compilation is reported separately. Data are random images of CIFAR's shape.
Writes benchmarks/results/<date>-<device>.json.
"""
import argparse
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multiexit import losses, models, reference_style  # noqa: E402
from multiexit.data import DATASETS, DeviceLoader  # noqa: E402
from multiexit.evaluation import evaluate  # noqa: E402
from multiexit.training import train_epoch  # noqa: E402

PAPER_NET = dict(call='MsdNet')  # its defaults are the paper's configuration
PAPER_LOSS = dict(call='DistillationBasedLoss', n_exits=11, acc_tops=[1, 5], C=0.5, maxprob=0.5,
                  global_scale=2.0 * 5 / 11)
PAPER_OPT = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
FULL_RUN = dict(epochs=300, train_images=45_000, val_images=5_000)
CUDA_MODES = ('channels_last', 'amp', 'fused_sgd', 'compile')
BATCH, EVAL_BATCH = 64, 250


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def fake_cifar(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.randint(0, 100, (n,), generator=g))


def build(device, channels_last=False, fused=False):
    torch.manual_seed(0)
    model = models.build(PAPER_NET).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt_kw = dict(fused=True) if fused else dict(foreach=False)
    return model, torch.optim.SGD(model.parameters(), **PAPER_OPT, **opt_kw)


def time_reference(device, images, labels, warmup, steps):
    """The original's loop: per-image transforms, Python-float temperature, fp32, eager."""
    model, opt = build(device)
    loss_fn = reference_style.DistillationBasedLoss(**PAPER_LOSS)
    spec = DATASETS['Cifar100']
    loader = reference_style.loader(images.numpy(), labels.numpy(), BATCH, spec.mean, spec.std,
                                    augment=True, train=True)
    model.train()
    batches = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x, y = next(batches)
        reference_style.train_step(model, loss_fn, opt, x.to(device), y.to(device))
    sync(device)
    return steps * BATCH / (time.perf_counter() - start)


def time_ours(device, images, labels, warmup, steps, reference_loss=False, channels_last=False,
              amp=False, fused=False, compile_mode=None):
    """Our loop (multiexit.training.train_epoch) with the given switches; returns (images/s,
    compile seconds or None)."""
    model, opt = build(device, channels_last, fused)
    loss_fn = losses.build(PAPER_LOSS).to(device)
    spec = DATASETS['Cifar100']
    step_model = torch.compile(model, mode=compile_mode) if compile_mode else model
    step_loss = torch.compile(loss_fn, mode=compile_mode) if compile_mode else loss_fn
    if reference_loss:  # device data, but the original's host-synced temperature
        ref = reference_style.DistillationBasedLoss(**PAPER_LOSS)
        step_loss = torch.nn.Module()
        step_loss.forward = ref
    T = None if reference_loss else loss_fn.temperature
    warm = DeviceLoader(images[:warmup * BATCH], labels[:warmup * BATCH], BATCH, spec.mean,
                        spec.std, device, augment=True, shuffle=True, drop_last=True,
                        channels_last=channels_last)
    start = time.perf_counter()
    train_epoch(step_model, step_loss, opt, warm, 11, (1, 5), amp=amp, T=T)
    sync(device)
    compile_s = time.perf_counter() - start if compile_mode else None
    timed = DeviceLoader(images[:steps * BATCH], labels[:steps * BATCH], BATCH, spec.mean,
                         spec.std, device, augment=True, shuffle=True, drop_last=True,
                         channels_last=channels_last)
    sync(device)
    start = time.perf_counter()
    train_epoch(step_model, step_loss, opt, timed, 11, (1, 5), amp=amp, T=T)  # syncs once
    sync(device)
    return steps * BATCH / (time.perf_counter() - start), compile_s


def time_eval_reference(device, images, labels, batches):
    """The original's validate(): per-image transforms, autograd left on."""
    model, _ = build(device)
    spec = DATASETS['Cifar100']
    loader = reference_style.loader(images.numpy()[:batches * EVAL_BATCH],
                                    labels.numpy()[:batches * EVAL_BATCH], EVAL_BATCH, spec.mean,
                                    spec.std, augment=False, train=False)
    model.eval()
    sync(device)
    start = time.perf_counter()
    for x, y in loader:
        logits = model(x.to(device))
        [(z.argmax(1) == y.to(device)).float().mean().item() for z in logits]  # per-batch syncs
    sync(device)
    return batches * EVAL_BATCH / (time.perf_counter() - start)


def time_eval_ours(device, images, labels, batches, channels_last, amp):
    model, _ = build(device, channels_last)
    spec = DATASETS['Cifar100']
    n = batches * EVAL_BATCH
    loader = DeviceLoader(images[:n], labels[:n], EVAL_BATCH, spec.mean, spec.std, device,
                          channels_last=channels_last)
    evaluate(model, loader, 11, amp=amp)  # warm-up (cudnn autotuning)
    sync(device)
    start = time.perf_counter()
    evaluate(model, loader, 11, amp=amp)
    sync(device)
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--steps', type=int, default=None, help='timed steps per mode')
    parser.add_argument('--warmup', type=int, default=None, help='untimed steps per mode')
    parser.add_argument('--eval-batches', type=int, default=None)
    parser.add_argument('--compile-mode', default='reduce-overhead')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    steps = args.steps or (200 if cuda else 10)
    warmup = args.warmup or (30 if cuda else 2)
    eval_batches = args.eval_batches or (20 if cuda else 4)
    if cuda:
        torch.backends.cudnn.benchmark = True
    images, labels = fake_cifar((warmup + steps) * BATCH)
    np.random.seed(0)

    train, compile_s = {}, None
    train['reference'] = time_reference(device, images, labels, warmup, steps)
    ladder = [('device_data', dict(reference_loss=True)), ('device_temperature', dict())]
    if cuda:
        ladder += [('channels_last', dict(channels_last=True)),
                   ('amp', dict(channels_last=True, amp=True)),
                   ('fused_sgd', dict(channels_last=True, amp=True, fused=True)),
                   ('compile', dict(channels_last=True, amp=True, fused=True,
                                    compile_mode=args.compile_mode))]
    for name, switches in ladder:
        train[name], c = time_ours(device, images, labels, warmup, steps, **switches)
        compile_s = c if c is not None else compile_s
        print(f'{name:>20}: {train[name]:8.1f} images/s', flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # the defaults of train_cifar.py: amp, channels_last, fused SGD on CUDA; compile off
    default = dict(channels_last=True, amp=True, fused=True) if cuda else {}
    train['default'], _ = time_ours(device, images, labels, warmup, steps, **default)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None

    evals = {'reference': time_eval_reference(device, images, labels, eval_batches),
             'default': time_eval_ours(device, images, labels, eval_batches, channels_last=cuda,
                                       amp=cuda)}
    per_epoch = (FULL_RUN['train_images'] / train['default']
                 + FULL_RUN['val_images'] / evals['default'])
    reference_epoch = (FULL_RUN['train_images'] / train['reference']
                       + FULL_RUN['val_images'] / evals['reference'])
    result = {
        'device': torch.cuda.get_device_name(device) if cuda else 'cpu',
        'cpu': platform.processor() or platform.machine(),
        'cpu_threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'command': ' '.join([Path(sys.executable).name] + sys.argv),
        'date': datetime.date.today().isoformat(),
        'batch_size': BATCH, 'eval_batch_size': EVAL_BATCH, 'timed_steps': steps,
        'warmup_steps': warmup,
        'train_images_per_s': train,
        'eval_images_per_s': evals,
        'speedup_default_vs_reference': {'train': train['default'] / train['reference'],
                                         'eval': evals['default'] / evals['reference']},
        'full_run': FULL_RUN,
        'projected_full_run_s': FULL_RUN['epochs'] * per_epoch,
        'projected_full_run_reference_s': FULL_RUN['epochs'] * reference_epoch,
        'compile_s': compile_s,
        'peak_memory_bytes': peak,
        'max_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        'skipped_modes': [] if cuda else list(CUDA_MODES),
    }
    print(table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = result['device'].replace(' ', '-').lower()
    path = out / f"{result['date']}-{name}.json"
    path.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {path}')


def table(r):
    lines = [f"{r['device']} (torch {r['torch']}), batch {r['batch_size']}",
             f"{'mode':>20} {'train img/s':>12} {'x reference':>12}"]
    for mode, ips in r['train_images_per_s'].items():
        lines.append(f"{mode:>20} {ips:12.1f} {ips / r['train_images_per_s']['reference']:12.2f}")
    e = r['eval_images_per_s']
    lines.append(f"{'eval reference':>20} {e['reference']:12.1f}")
    lines.append(f"{'eval default':>20} {e['default']:12.1f} {e['default'] / e['reference']:12.2f}")
    lines.append(f"projected full run (300 epochs of 45,000 + 5,000 images): "
                 f"{r['projected_full_run_s'] / 60:.1f} min (reference style "
                 f"{r['projected_full_run_reference_s'] / 3600:.1f} h)")
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
