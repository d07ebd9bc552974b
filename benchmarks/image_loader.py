"""Images per second of the image-folder training loader alone, for several numbers of loader
processes, and what each per-image step of it costs.

    python3 benchmarks/image_loader.py                          # 0, 1 and 2 workers, CPU
    python3 benchmarks/image_loader.py --device cuda --workers 0 4 8 16
    python3 benchmarks/image_loader.py --data data/imagenet     # real images (train/<class>/)

The loader is what train_imagenet.py trains from: ``ImageFolder(...).loader('train', ...)``
(decoding, the original's ImageNet augmentation per image, batches of uint8, pinned on CUDA,
the lighting noise and normalisation on the device), without a network. Without --data, it
writes --images JPEG files of ImageNet's typical size (500x375, smooth colours with noise,
quality 90) into a temporary folder. Each number of workers runs a warm-up epoch (process
start, page cache), then the timed epochs; the numbers of workers take turns, so that a change in
the load of a shared machine hits them alike, and the best epoch is reported (every time is in
the JSON, with the load average). The per-image steps are timed in this process on --stage-images
images: decoding (open, RGB), RandomResizedCrop, ColorJitter, flip and the copy to an array.

Writes benchmarks/results/<date>-image_loader-<device>.json with the exact command line.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multiexit import data  # noqa: E402
from multiexit.data import image_transforms  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--data', help='an image folder (train/<class>/...) to read instead of '
                                  'generated JPEG files')
    p.add_argument('--images', type=int, default=640, help='generated images (10 classes)')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--epochs', type=int, default=2, help='timed epochs per number of workers')
    p.add_argument('--stage-images', type=int, default=64)
    p.add_argument('--out', help='output JSON (default: benchmarks/results/<date>-image_loader-'
                                 '<device type>.json)')
    return p.parse_args(argv)


def write_images(root, n, n_classes=10, size=(500, 375), seed=0):
    """``n`` photo-like JPEG files in root/train/<class>/ (and an empty root/val/)."""
    rs = np.random.RandomState(seed)
    for i in range(n):
        folder = root / 'train' / f'class{i % n_classes}'
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rs.randint(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size)
        pixels = np.clip(np.asarray(small) + rs.normal(0, 12, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.JPEG', quality=90)
    (root / 'val').mkdir(exist_ok=True)


def time_epochs(loaders, epochs):
    """{workers: [seconds per epoch]}, the numbers of workers taking turns; epoch 0 warms up."""
    times = {w: [] for w in loaders}
    for epoch in range(epochs + 1):
        for w, loader in loaders.items():
            loader.set_epoch(epoch)
            start = time.perf_counter()
            for x, _ in loader:
                pass
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            if epoch:
                times[w].append(time.perf_counter() - start)
    return times


def time_stages(paths, size):
    """Milliseconds per image of each per-image step of the training transform."""
    crop = T.RandomResizedCrop(size)
    jitter = T.ColorJitter(brightness=image_transforms.JITTER, contrast=image_transforms.JITTER,
                           saturation=image_transforms.JITTER)
    flip = T.RandomHorizontalFlip()
    steps = {'decode': lambda img: img, 'random_resized_crop': crop, 'color_jitter': jitter,
             'flip_and_array': lambda img: np.array(flip(img), dtype=np.uint8)}
    seconds = dict.fromkeys(steps, 0.0)
    for path in paths:
        start = time.perf_counter()
        with Image.open(path) as img:
            out = img.convert('RGB')
        for name, step in steps.items():
            if name != 'decode':
                start = time.perf_counter()
                out = step(out)
            seconds[name] += time.perf_counter() - start
    return {name: 1000 * s / len(paths) for name, s in seconds.items()}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        if not args.data:
            write_images(root, args.images)
        files = sorted((root / 'train').glob('*/*'))
        folder = data.build(dict(call='ImageFolder', nval_per_class=1, augment=True,
                                   image_size=args.image_size))
        load_before = os.getloadavg()
        stages = time_stages(files[:args.stage_images], args.image_size)
        loaders = {}
        for w in args.workers:
            folder.n_workers = w
            loaders[w] = folder.loader('train', root, args.batch_size, device, seed=0)
        n_images = len(loaders[args.workers[0]]) * args.batch_size
        times = time_epochs(loaders, args.epochs)
        mean_bytes = float(np.mean([f.stat().st_size for f in files]))
    out = {
        'command': shlex.join([sys.executable] + sys.argv),
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'device': str(device),
        'device_name': (torch.cuda.get_device_name(device) if device.type == 'cuda'
                        else platform.processor() or platform.machine()),
        'cpu_count': os.cpu_count(),
        'torch': torch.__version__, 'pillow': PIL.__version__,
        'load_average_before_after': [load_before, os.getloadavg()],
        'data': args.data or f'{args.images} generated 500x375 JPEG files (quality 90)',
        'mean_file_bytes': mean_bytes,
        'image_size': args.image_size, 'batch_size': args.batch_size,
        'images_per_epoch': n_images,
        'per_image_ms_in_one_process': stages,
        'workers': {str(w): {'images_per_s': n_images / min(t), 'epoch_seconds': t}
                    for w, t in times.items()},
    }
    path = Path(args.out or ROOT / 'benchmarks' / 'results' /
                f'{datetime.date.today()}-image_loader-{device.type}.json')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + '\n')
    for w in args.workers:
        print(f'{w} workers: {out["workers"][str(w)]["images_per_s"]:.1f} images/s')
    print('per image, in one process (ms): ' +
          ', '.join(f'{k} {v:.2f}' for k, v in stages.items()))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
