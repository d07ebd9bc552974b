"""Image folders: both layouts, the original's ImageNet transforms, the loader's order and
shares."""
import gc
import math
import os
import weakref

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from torchvision.datasets import ImageFolder as TorchvisionImageFolder

from multiexit import data
from multiexit.data import folders, image_transforms
from multiexit.data.image_transforms import (EIGVAL, EIGVEC, MEAN, STD, BatchNormalize,
                                             TrainTransform)
from multiexit.errors import ConfigError, DataError

SIZE = 32  # crops of the loader tests; the transform tests use the real 224


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """5 classes, 10 training and 4 test images each, in both layouts."""
    return folders.write_fake_image_folders(tmp_path_factory.mktemp('images') / 'gen')


def data_set(call='ImageFolder', **kwargs):
    cf = dict(call=call, nval_per_class=2, augment=True, seed=0, image_size=SIZE, n_workers=0)
    return data.build(dict(cf, **kwargs))


def batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b))


def test_the_standard_layout_reads_as_torchvision_imagefolder(folder):
    for split, test in (('train', False), ('val', True)):
        files = folders.folder_files(folder, test)
        theirs = TorchvisionImageFolder(folder / split)
        assert files.classes == tuple(theirs.classes)
        assert [str(files.root / p.decode()) for p in files.paths] == [p for p, _ in theirs.samples]
        assert files.labels.tolist() == theirs.targets
    assert data_set().n_classes(folder) == data_set('ImageNet').n_classes(folder) == 5


@pytest.mark.parametrize('split', ['train', 'val'])
def test_both_layouts_give_the_same_batches(folder, split):
    loaders = [data_set(call).loader(split, folder, 8, 'cpu', seed=3)
               for call in ('ImageFolder', 'ImageNet')]
    a, b = (batches(loader, epoch=1) for loader in loaders)
    assert len(a) == (5 if split == 'train' else 2) and same(a, b)


def test_both_layouts_give_the_same_test_samples(folder):
    """The test images come in another order (by class, or by number), so compare the sets."""
    samples = []
    for call in ('ImageFolder', 'ImageNet'):
        (x, y), = batches(data_set(call).loader('test', folder, 64, 'cpu'))
        order = torch.argsort(x.flatten(1).sum(1))
        samples.append((x[order], y[order]))
    (xa, ya), (xb, yb) = samples
    assert len(ya) == 20 and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_the_file_list_is_made_once(folder, monkeypatch):
    from torchvision.datasets import folder as torchvision_folder  # image_folders imports it lazily

    calls = []
    scan = torchvision_folder.make_dataset
    monkeypatch.setattr(torchvision_folder, 'make_dataset',
                        lambda *a, **k: calls.append(a) or scan(*a, **k))
    folders._scan.cache_clear()
    for cf in (dict(), dict(augment=False)):  # cf_trn and cf_val of a run
        for split in ('train', 'val'):
            data_set(**cf).loader(split, folder, 8, 'cpu')
    assert len(calls) == 1


def test_the_validation_split_is_held_out_per_class_with_the_seed(folder):
    def labels(split, seed):
        return data_set(seed=seed).loader(split, folder, 8, 'cpu').labels
    train, val = labels('train', 0), labels('val', 0)
    assert len(train) == 40 and len(val) == 10
    assert torch.bincount(val).tolist() == [2] * 5 and torch.bincount(train).tolist() == [8] * 5
    assert not torch.equal(val, labels('val', 1))  # another class permutation and draw


def rgb(img):
    return np.asarray(img.convert('RGB'), dtype=np.float32) / 255


def reference_train(img, size, seed):
    """The original's ImageNet training transform from its definitions, per image, replaying
    the draws that torchvision makes in its order: RandomResizedCrop(size) with scale
    (0.08, 1) and ratio (3/4, 4/3), ColorJitter(0.4, 0.4, 0.4) in a random order, flip with
    p = 0.5, then lighting noise alpha ~ N(0, 0.1^2) along the PCA eigenvectors, normalise."""
    gen = torch.default_generator
    gen.manual_seed(seed)
    img = img.convert('RGB')
    width, height = img.size
    log_ratio = torch.log(torch.tensor([3 / 4, 4 / 3]))
    for _ in range(10):
        area = width * height * torch.empty(1).uniform_(0.08, 1.0).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, (1,)).item()
            left = torch.randint(0, width - w + 1, (1,)).item()
            break
    else:
        raise AssertionError('the test images are large enough for a random crop')
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    order = torch.randperm(4).tolist()
    factors = [torch.empty(1).uniform_(1 - 0.4, 1 + 0.4).item() for _ in range(3)]
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color, None]
    for k in order:
        if enhancers[k] is not None:
            img = enhancers[k](img).enhance(factors[k])
    flipped = torch.rand(1).item() < 0.5
    if flipped:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255
    alpha = torch.randn(3) * 0.1
    noise = (torch.tensor(EIGVEC) * alpha * torch.tensor(EIGVAL)).sum(dim=1)
    x = x + noise[:, None, None]
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (x - mean) / std, (top, left, h, w, flipped, tuple(order))


def reference_test(img, size):
    """Resize the shorter side to 256/224 of size (bilinear), centre crop, normalise."""
    img = img.convert('RGB')
    width, height = img.size
    short = round(size * 256 / 224)
    w, h = (short, int(short * height / width)) if width <= height else (
        int(short * width / height), short)
    img = img.resize((w, h), Image.BILINEAR)
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    x = torch.from_numpy(rgb(img.crop((left, top, left + size, top + size)))).permute(2, 0, 1)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (x - mean) / std


@pytest.fixture(scope='module')
def photos():
    """A landscape RGB photo-like image, and the same as greyscale, RGBA and CMYK (ImageNet
    has greyscale and CMYK JPEGs): each must be converted to RGB before the transforms."""
    rs = np.random.RandomState(0)
    base = Image.fromarray(rs.randint(0, 256, (4, 6, 3), dtype=np.uint8)).resize((300, 200))
    noisy = np.clip(np.asarray(base) + rs.normal(0, 10, (200, 300, 3)), 0, 255)
    rgb_image = Image.fromarray(noisy.astype(np.uint8))
    return [rgb_image, rgb_image.convert('L'), rgb_image.convert('RGBA'),
            rgb_image.convert('CMYK')]


def normalized(transform, img, seed, lighting):
    x, alpha = transform(img, seed)
    return BatchNormalize('cpu', lighting)(torch.from_numpy(x)[None], alpha[None])[0]


def test_training_augmentation_follows_the_original_definitions(photos):
    transform = TrainTransform(224)
    draws = []
    for seed in range(12):
        img = photos[seed % len(photos)]
        expected, drawn = reference_train(img, 224, seed)
        torch.testing.assert_close(normalized(transform, img, seed, lighting=True), expected,
                                   rtol=0, atol=1e-5)
        draws.append(drawn)
    assert len({d[:4] for d in draws}) == 12  # every crop differs
    assert {d[4] for d in draws} == {False, True} and len({d[5] for d in draws}) > 1


def test_lighting_noise_is_the_original_pca_noise():
    """On a grey image, the noise is the only change: eigvec @ (alpha * eigval), per image."""
    x = torch.full((2, 8, 8, 3), 128, dtype=torch.uint8)
    alpha = torch.tensor([[0.1, -0.2, 0.05], [0.0, 0.0, 0.3]])
    out = BatchNormalize('cpu', lighting=True)(x, alpha)
    std, mean = torch.tensor(STD), torch.tensor(MEAN)
    for i in range(2):
        noise = sum(alpha[i, j] * EIGVAL[j] * torch.tensor(EIGVEC)[:, j] for j in range(3))
        torch.testing.assert_close(out[i, :, 3, 5] * std + mean, 128 / 255 + noise)


def test_test_transform_resizes_and_crops_the_centre(photos):
    for img in photos:
        torch.testing.assert_close(normalized(image_transforms.TestTransform(224), img, None,
                                              lighting=False),
                                   reference_test(img, 224), rtol=0, atol=1e-6)


def test_loader_epochs_are_seeded_and_do_not_depend_on_the_workers(folder):
    serial, forked = (data_set(n_workers=n).loader('train', folder, 8, 'cpu', seed=7)
                      for n in (0, 2))
    a, b, c = batches(serial, 3), batches(forked, 3), batches(forked, 4)
    assert same(a, b) and same(batches(forked, 3), a)  # persistent workers, epoch again
    assert not torch.equal(a[0][1], c[0][1]) and not torch.equal(a[0][0], c[0][0])
    x, _ = a[0]
    assert x.shape == (8, 3, SIZE, SIZE) and x.dtype == torch.float32



def test_training_batches_are_the_original_augmentation_of_their_files(folder):
    """The loader's pieces together: each image of a training batch is the reference transform
    (crop, jitter, flip, and the lighting noise that the device adds) of its file, drawn with
    the seed of (run seed, epoch, position)."""
    loader = data_set().loader('train', folder, 8, 'cpu', seed=7)
    x, y = batches(loader, epoch=2)[0]
    files = loader._loader.dataset
    idx, _, _ = next(loader.order.batches(2))
    for j, i in enumerate(idx.tolist()):
        with Image.open(files.root / files.paths[i].decode()) as img, \
                torch.random.fork_rng(devices=[]):
            expected, _ = reference_train(img, SIZE, image_transforms.sample_seed(7, 2, i))
        torch.testing.assert_close(x[j], expected, rtol=0, atol=1e-5)
        assert y[j] == files.labels[i]

def test_a_dropped_loader_stops_its_processes_at_once(folder):
    """Freed by reference counting, not left to the garbage collector: that one closes the
    queues to the loader processes first, and each process then waits out a 5 s timeout
    (eval.py spent 10 s so on two loaders)."""
    loader = data_set(n_workers=2).loader('test', folder, 8, 'cpu')
    batches(loader)
    processes = loader._loader._iterator._workers
    alive = weakref.ref(loader)
    gc.disable()  # only reference counting may free it
    try:
        del loader
        assert alive() is None
    finally:
        gc.enable()
    for process in processes:
        process.join(timeout=1)
        assert process.exitcode is not None


@pytest.mark.parametrize('split, batch_size', [('train', 8), ('val', 4), ('test', 6)])
def test_ranks_read_their_parts_of_the_single_process_batches(folder, split, batch_size):
    whole = batches(data_set().loader(split, folder, batch_size, 'cpu', seed=2), 1)
    parts = [batches(data_set().loader(split, folder, batch_size, 'cpu', seed=2, rank=r,
                                       world_size=2), 1) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert len(y0) == len(y) // 2


def test_channels_last_batches(folder):
    loader = data_set().loader('val', folder, 4, 'cpu', channels_last=True)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, batches(data_set().loader('val', folder, 4, 'cpu'))[0][0])


def test_an_unreadable_image_is_one_line_naming_it(folder, tmp_path):
    broken = tmp_path / 'broken'
    folders.write_fake_image_folders(broken)
    victim = sorted((broken / 'val' / 'n00000003').iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:300])  # a truncated JPEG
    loader = data_set(n_workers=2).loader('test', broken, 50, 'cpu')
    with pytest.raises(DataError) as e:
        batches(loader)
    assert str(e.value).startswith(f'cannot read image {victim}') and '\n' not in str(e.value)


@pytest.mark.parametrize('call, change, kwargs, error, match', [
    ('ImageFolder', lambda d: (d / 'train').rename(d / 'training'), {}, DataError,
     'no .*/train/'),
    ('ImageNet', lambda d: (d / 'classes.csv').write_text('synset\tn\nn00000000\t3\n'), {},
     DataError, 'classes.csv gives n00000000 3 images but .* holds 10'),
    ('ImageNet', lambda d: (d / 'val_targets.csv').write_text('label\n0\n'), {}, DataError,
     "has no column 'target'"),
    ('ImageFolder', lambda d: None, dict(n_per_class=12), ConfigError,
     'cf_trn asks for n_per_class=12 images per class, but class n00000000 of '),
])
def test_bad_data_is_one_line(tmp_path, call, change, kwargs, error, match):
    root = folders.write_fake_image_folders(tmp_path / 'gen')
    change(root)
    with pytest.raises(error, match=match):
        for split in ('train', 'test'):
            data_set(call, **kwargs).loader(split, root, 8, 'cpu')


def test_loader_processes_default_to_8_or_the_cores_there_are():
    """torch warns of more loader processes than cores: the default never asks for them."""
    assert folders.ImageFolder().n_workers == min(8, len(os.sched_getaffinity(0)))
    assert folders.ImageFolder(n_workers=3).n_workers == 3
