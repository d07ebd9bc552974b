"""Training and evaluation throughput of the paper's MsdNet + DBT, side by side in one process.

    python3 benchmarks/train_throughput.py                  # CUDA if available, else CPU
    python3 benchmarks/train_throughput.py --device cpu --steps 10
    python3 benchmarks/train_throughput.py --modes reference,default --no-eval

Training modes (CUDA-only ones are skipped on the CPU); the ladder adds one change at a time:
  reference          the original's mechanics: per-image torchvision transforms in a DataLoader
                     without workers, fp32, eager, temperature as a Python float (host sync per
                     step), for-loop SGD
  device_data        + uint8 data on the device, augmentation on whole batches
  device_temperature + temperature and metrics on the device (no host sync per step)
  channels_last      + NHWC model and batches (CUDA)
  amp                + bf16 autocast (CUDA)
  fused_sgd          + fused SGD (CUDA)
  cuda_graph         + the whole step replayed as one CUDA graph (CUDA)
  cuda_graph_fp32    cuda_graph without bf16 autocast (TF32 convolutions) (CUDA)
  cuda_graph_streams cuda_graph with MsdNet's branches on parallel streams (CUDA)
  cuda_graph_fp32_streams  both (CUDA)
  cuda_graph_compile cuda_graph around a torch.compile'd ('default') model and loss (CUDA)
  cuda_graph_compile_fp32  the same without bf16 autocast (CUDA)
  cuda_graph_max_autotune  cuda_graph around torch.compile mode 'max-autotune' (without
                     graphs of its own: 'max-autotune-no-cudagraphs') (CUDA)
  compile_default    fused_sgd + torch.compile mode 'default' (CUDA)
  compile_reduce_overhead  fused_sgd + torch.compile mode 'reduce-overhead' (CUDA graphs of
                     torch.compile's own)
  default            what train_cifar.py does by default on this device (the defaults of
                     multiexit.config.TrainConfig)
  cudnn_benchmark    default + torch.backends.cudnn.benchmark (autotuning per conv shape) (CUDA)
Evaluation (batch 250): reference (the original's validate()), eager (bf16, channels_last on
CUDA), cuda_graph (the forward pass as a CUDA graph, CUDA), cuda_graph_streams (with parallel
streams, CUDA) and default (what Run does).
Compilation, capture and cuDNN autotuning happen in the warm-up epoch, whose seconds are
reported per mode (warmup_epoch_s), and its first step's apart (first_step_s: the compilation
of forward and backward, with autotuning). Timing synchronises the device before reading the
clock; the warm-up steps are not timed. On CUDA, the kernels of a timed step (replayed, for
the graphed modes) are counted with torch.profiler afterwards (kernels_per_step). Data are
random images of CIFAR's shape. A mode that fails is recorded with its error and the others
still run; the JSON is rewritten after every mode, so a run stopped at its time limit keeps
what it measured. The compile modes
and cudnn_benchmark run last and are skipped once ``--deadline-s`` has passed.
Writes benchmarks/results/<date>-<device>.json (or --json).
"""
import argparse
import datetime
import json
import platform
import resource
import shlex
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multiexit import losses, models  # noqa: E402
from tools import reference_style  # noqa: E402
from multiexit.train.step import build_step  # noqa: E402
from multiexit.data.cifar import DATASETS, DeviceLoader  # noqa: E402
from multiexit.evaluate.passes import GraphedForward, evaluate  # noqa: E402
from tools.kernel_count import cuda_kernels  # noqa: E402
from multiexit.config import shared_defaults  # noqa: E402
from multiexit.train.loop import train_epoch  # noqa: E402

PAPER_NET = dict(call='MsdNet')  # its defaults are the paper's configuration
PAPER_LOSS = dict(call='DistillationBasedLoss', n_exits=11, acc_tops=[1, 5], C=0.5, maxprob=0.5,
                  global_scale=2.0 * 5 / 11)
PAPER_OPT = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
# train_cifar.py's default configuration (100 + 50 images per class) and the 45,000-image one
PAPER_RUN = dict(epochs=300, train_images=10_000, val_images=5_000)
FULL_RUN = dict(epochs=300, train_images=45_000, val_images=5_000)
BATCH, EVAL_BATCH = 64, 250
RUN_DEFAULTS = {k: v for k, v in shared_defaults().items()
                if k in ('amp', 'channels_last', 'compile', 'cuda_graph', 'cuda_streams',
                         'cudnn_benchmark')}
FAST = dict(channels_last=True, amp=True, fused=True)
TRAIN_MODES = {  # name: (switches of time_ours, CUDA only); None: the reference loop
    'reference': (None, False),
    'device_data': (dict(reference_loss=True), False),
    'device_temperature': (dict(), False),
    'channels_last': (dict(channels_last=True), True),
    'amp': (dict(channels_last=True, amp=True), True),
    'fused_sgd': (FAST, True),
    'cuda_graph': (dict(FAST, cuda_graph=True), True),
    'cuda_graph_fp32': (dict(FAST, amp=False, cuda_graph=True), True),
    'cuda_graph_streams': (dict(FAST, cuda_graph=True, cuda_streams=True), True),
    'cuda_graph_fp32_streams': (dict(FAST, amp=False, cuda_graph=True, cuda_streams=True), True),
    'default': ('default', False),
    # the slow ones last, the likeliest to be fastest first: a deadline may cut the rest
    'cuda_graph_compile': (dict(FAST, cuda_graph=True, compile_mode='default'), True),
    'cuda_graph_compile_fp32': (dict(FAST, amp=False, cuda_graph=True, compile_mode='default'),
                                True),
    'cuda_graph_max_autotune': (dict(FAST, cuda_graph=True, compile_mode='max-autotune'), True),
    'compile_default': (dict(FAST, compile_mode='default'), True),
    'compile_reduce_overhead': (dict(FAST, compile_mode='reduce-overhead'), True),
    'cudnn_benchmark': ('default', True),
}
SLOW = tuple(name for name in TRAIN_MODES if 'compile' in name or 'autotune' in name) + (
    'cudnn_benchmark',)
EVAL_MODES = ('reference', 'eager', 'cuda_graph', 'cuda_graph_streams', 'default')


def default_switches(cuda):
    """Run's defaults on this device: the CUDA switches apply on CUDA only."""
    if not cuda:
        return {}
    d = RUN_DEFAULTS
    return dict(channels_last=d['channels_last'], amp=d['amp'], fused=True,
                cuda_graph=d['cuda_graph'] and d['compile'] != 'reduce-overhead',
                compile_mode=d['compile'] or None, cuda_streams=d['cuda_streams'])


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


def paper_step(device, reference_loss=False, channels_last=False, amp=False, fused=False,
               compile_mode=None, cuda_graph=False, cuda_streams=False):
    """The training step (``multiexit.train.step``) of the paper's MsdNet + DBT with these
    switches (those of TRAIN_MODES and ``default_switches``)."""
    model, opt = build(device, channels_last, fused)
    loss_fn = losses.build(PAPER_LOSS).to(device)
    T = loss_fn.temperature
    if reference_loss:  # device data, but the original's host-synced temperature
        loss_fn, T = torch.nn.Module(), None
        loss_fn.forward = reference_style.DistillationBasedLoss(**PAPER_LOSS)
    return build_step(model, loss_fn, opt, 11, (1, 5), device, amp=amp, T=T,
                            cuda_graph=cuda_graph, compile=compile_mode,
                            cuda_streams=cuda_streams)


def time_ours(device, images, labels, warmup, steps, **switches):
    """Our loop (multiexit.train.loop.train_epoch) with the given switches (``paper_step``'s);
    returns dict(images_per_s, warmup_epoch_s: compilation and capture included, first_step_s,
    kernels_per_step: on CUDA)."""
    step = paper_step(device, **switches)
    spec = DATASETS['Cifar100']
    channels_last, cuda_graph = switches.get('channels_last'), switches.get('cuda_graph')
    loader = lambda n, start=0: DeviceLoader(
        images[start * BATCH:(start + n) * BATCH], labels[start * BATCH:(start + n) * BATCH],
        BATCH, spec.mean, spec.std, device, augment=True, shuffle=True, drop_last=True,
        channels_last=channels_last)
    out = {}
    start = time.perf_counter()
    for first, n in ((0, 1), (1, warmup - 1)):  # the first step compiles, if anything does
        train_epoch(step, loader(n, first))
        sync(device)
        if 'first_step_s' not in out:
            out['first_step_s'] = time.perf_counter() - start
            if switches.get('compile_mode'):  # in the log even if a time limit stops the rest
                print(f"first step (compilation): {out['first_step_s']:.1f} s", flush=True)
    out['warmup_epoch_s'] = time.perf_counter() - start
    timed = loader(steps)
    sync(device)
    start = time.perf_counter()
    train_epoch(step, timed)  # syncs once
    sync(device)
    out['images_per_s'] = steps * BATCH / (time.perf_counter() - start)
    if cuda_graph and step.eager_only:
        raise RuntimeError('the CUDA graph capture failed: the step ran eagerly')
    if device.type == 'cuda':
        x, y = next(iter(timed))
        out['kernels_per_step'] = cuda_kernels(lambda: step(x, y), 2)[0]
    return out


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


def time_eval_ours(device, images, labels, batches, channels_last, amp, cuda_graph,
                   cuda_streams=False):
    model, _ = build(device, channels_last)
    spec = DATASETS['Cifar100']
    n = batches * EVAL_BATCH
    loader = DeviceLoader(images[:n], labels[:n], EVAL_BATCH, spec.mean, spec.std, device,
                          channels_last=channels_last)
    forward = GraphedForward(model, amp=amp, cuda_streams=cuda_streams) if cuda_graph else None
    for _ in range(2):  # warm-up: cuDNN autotuning, then the capture
        evaluate(model, loader, 11, amp=amp, forward=forward)
    sync(device)
    start = time.perf_counter()
    evaluate(model, loader, 11, amp=amp, forward=forward)
    sync(device)
    if cuda_graph and forward.graph is None:
        raise RuntimeError('the CUDA graph capture failed: evaluation ran eagerly')
    return n / (time.perf_counter() - start)


def measure(name, fn, store, errors):
    """store[name] = fn(), or errors[name] = the error; prints a line either way."""
    try:
        store[name] = fn()
        print(f'{name:>24}: {store[name]:10.1f} images/s', flush=True)
    except Exception as e:  # noqa: BLE001 - a failing mode must not stop the others
        errors[name] = f'{type(e).__name__}: {e}'.splitlines()[0][:500]
        print(f'{name:>24}: FAILED {errors[name]}', flush=True)
        traceback.print_exc()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--steps', type=int, default=None, help='timed steps per mode')
    parser.add_argument('--warmup', type=int, default=None, help='untimed steps per mode')
    parser.add_argument('--eager-steps', type=int, default=None,
                        help='timed steps of the modes without a CUDA graph (default: --steps); '
                        'on a slow host CPU these are launch bound and slow')
    parser.add_argument('--eval-batches', type=int, default=None)
    parser.add_argument('--modes', default=','.join(TRAIN_MODES),
                        help='training modes to time, comma-separated')
    parser.add_argument('--no-eval', action='store_true', help='skip the evaluation timings')
    parser.add_argument('--deadline-s', type=float, default=None,
                        help='skip the compile and cudnn_benchmark modes once this many '
                        'seconds have passed')
    parser.add_argument('--cuda-tests', default=None,
                        help='passed,failed,skipped of tests/test_cuda.py, added to the JSON')
    parser.add_argument('--json', default=None, help='output file (default: '
                        'benchmarks/results/<date>-<device>.json)')
    args = parser.parse_args()
    t0 = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    steps = args.steps or (200 if cuda else 10)
    warmup = args.warmup or (30 if cuda else 2)
    eval_batches = args.eval_batches or (20 if cuda else 4)
    eager_steps = args.eager_steps or steps
    unknown = set(args.modes.split(',')) - set(TRAIN_MODES)
    if unknown:
        parser.error(f'unknown modes {sorted(unknown)}; known: {", ".join(TRAIN_MODES)}')
    torch.backends.cudnn.benchmark = cuda and RUN_DEFAULTS['cudnn_benchmark']
    images, labels = fake_cifar((warmup + steps) * BATCH)
    np.random.seed(0)

    device_name = torch.cuda.get_device_name(device) if cuda else 'cpu'
    date = datetime.date.today().isoformat()
    path = Path(args.json) if args.json else (
        ROOT / 'benchmarks' / 'results' / f"{date}-{device_name.replace(' ', '-').lower()}.json")
    train, warmup_s, evals, errors, skipped = {}, {}, {}, {}, []
    first_step_s, kernels = {}, {}
    result = {
        'device': device_name,
        'cpu': platform.processor() or platform.machine(),
        'cpu_threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'cuda': torch.version.cuda if cuda else None,
        'cudnn': torch.backends.cudnn.version() if cuda else None,
        'command': shlex.join(['python3'] + sys.argv),
        'date': date,
        'batch_size': BATCH, 'eval_batch_size': EVAL_BATCH, 'timed_steps': steps,
        'timed_steps_eager': eager_steps, 'warmup_steps': warmup, 'eval_batches': eval_batches,
        'run_defaults': RUN_DEFAULTS,
        'train_images_per_s': train, 'warmup_epoch_s': warmup_s, 'first_step_s': first_step_s,
        'kernels_per_step': kernels, 'eval_images_per_s': evals,
        'errors': errors, 'skipped_modes': skipped,
    }
    if args.cuda_tests:
        passed, failed, skipped_tests = (int(v) for v in args.cuda_tests.split(','))
        result['cuda_tests'] = dict(passed=passed, failed=failed, skipped=skipped_tests)

    def save():
        finish(result, cuda)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + '\n')

    for name in args.modes.split(','):
        switches, cuda_only = TRAIN_MODES[name]
        if cuda_only and not cuda:
            skipped.append(name)
            continue
        if name in SLOW:
            if args.deadline_s is not None and time.perf_counter() - t0 > args.deadline_s:
                skipped.append(name)
                print(f'{name:>24}: skipped (deadline)', flush=True)
                continue
        graphed = isinstance(switches, dict) and (switches.get('cuda_graph') or
                                                  switches.get('compile_mode') == 'reduce-overhead')
        n_steps = steps if graphed or switches == 'default' else eager_steps
        if switches is None:
            measure(name, lambda: time_reference(device, images, labels, warmup, eager_steps),
                    train, errors)
        else:
            if switches == 'default':
                switches = default_switches(cuda)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)

            def run(switches=switches, name=name):
                saved = torch.backends.cudnn.benchmark
                torch.backends.cudnn.benchmark = saved or name == 'cudnn_benchmark'
                try:
                    out = time_ours(device, images, labels, warmup, n_steps, **switches)
                finally:
                    torch.backends.cudnn.benchmark = saved
                warmup_s[name], first_step_s[name] = out['warmup_epoch_s'], out['first_step_s']
                if 'kernels_per_step' in out:
                    kernels[name] = out['kernels_per_step']
                return out['images_per_s']
            measure(name, run, train, errors)
            if name == 'default' and cuda:
                result['peak_memory_bytes'] = torch.cuda.max_memory_allocated(device)
        save()
        if name == 'default' and not args.no_eval:
            measure('eval reference', lambda: time_eval_reference(
                device, images, labels, eval_batches), evals, errors)
            for mode, graph, on in (('eager', False, False), ('cuda_graph', True, False),
                                    ('cuda_graph_streams', True, True)):
                if graph and not cuda:
                    continue
                measure(f'eval {mode}', lambda graph=graph, on=on: time_eval_ours(
                    device, images, labels, eval_batches, channels_last=cuda, amp=cuda,
                    cuda_graph=graph, cuda_streams=on), evals, errors)
            d = RUN_DEFAULTS
            default_eval = ('eval eager' if not (cuda and d['cuda_graph']) else
                            'eval cuda_graph_streams' if d['cuda_streams'] else 'eval cuda_graph')
            if default_eval in evals:
                evals['eval default'] = evals[default_eval]
            for key in list(evals):  # 'eval x' -> 'x'
                evals[key.split(' ', 1)[1]] = evals.pop(key)
            save()
    result['total_s'] = time.perf_counter() - t0
    save()
    print(table(result))
    print(f'wrote {path}')


def finish(r, cuda):
    """The derived keys: speed-ups and projected run times, from what was measured."""
    train, evals = r['train_images_per_s'], r['eval_images_per_s']
    r['speedup_default_vs_reference'] = {
        'train': train['default'] / train['reference'] if {'default', 'reference'} <= set(train)
        else None,
        'eval': evals['default'] / evals['reference'] if {'default', 'reference'} <= set(evals)
        else None}
    for key, run in (('paper', PAPER_RUN), ('full', FULL_RUN)):
        r[f'{key}_run'] = run
        for suffix, mode in (('', 'default'), ('_reference', 'reference')):
            ok = mode in train and mode in evals
            r[f'projected_{key}_run{suffix}_s'] = (
                run['epochs'] * (run['train_images'] / train[mode] + run['val_images'] / evals[mode])
                if ok else None)
    r['max_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def table(r):
    train = r['train_images_per_s']
    ref = train.get('reference')
    kernels, first = r.get('kernels_per_step', {}), r.get('first_step_s', {})
    lines = [f"{r['device']} (torch {r['torch']}), batch {r['batch_size']}",
             f"{'mode':>24} {'train img/s':>12} {'x reference':>12} {'kernels/step':>13} "
             f"{'first step s':>13}"]
    for mode, ips in train.items():
        lines.append(f"{mode:>24} {ips:12.1f} {ips / ref if ref else float('nan'):12.2f} "
                     f"{kernels.get(mode, float('nan')):13.0f} "
                     f"{first.get(mode, float('nan')):13.1f}")
    for mode in r['errors']:
        lines.append(f"{mode:>24} {'FAILED':>12}")
    e = r['eval_images_per_s']
    for mode, ips in e.items():
        ratio = ips / e['reference'] if 'reference' in e else float('nan')
        lines.append(f"{'eval ' + mode:>24} {ips:12.1f} {ratio:12.2f}")
    for key, label in (('paper', '10,000'), ('full', '45,000')):
        s = r.get(f'projected_{key}_run_s')
        ref_s = r.get(f'projected_{key}_run_reference_s')
        if s:
            lines.append(f"projected run, 300 epochs of {label} + 5,000 images: {s / 60:.1f} min"
                         + (f" (reference style {ref_s / 3600:.1f} h)" if ref_s else ''))
    if r.get('peak_memory_bytes'):
        lines.append(f"peak GPU memory (default mode): {r['peak_memory_bytes'] / 2**20:.0f} MiB")
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
