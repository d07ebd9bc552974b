import pickle

import numpy as np
import pytest
import torch

from multiexit.data import cifar, order, splits
from multiexit.errors import ConfigError, DataError


@pytest.fixture(scope='module')
def reference_labels(semantics):
    rs = np.random.RandomState(123)
    targets = np.repeat(np.arange(100), 500)
    rs.shuffle(targets)
    return targets


@pytest.mark.parametrize('key, n_per_class', [('150_50', 150), ('all_50', None)])
@pytest.mark.parametrize('split', ['train', 'val'])
def test_subset_indices_equal_the_original(semantics, reference_labels, split, key, n_per_class):
    idx, label_map = splits.subset_indices(reference_labels, split, n_per_class, 50, seed=0)
    assert idx.tolist() == semantics['subsets'][f'{split}_{key}']
    assert label_map.tolist() == semantics['subsets']['label_map_seed0']


def test_test_split_takes_everything_with_the_same_label_map(semantics, reference_labels):
    idx, label_map = splits.subset_indices(reference_labels, 'test', seed=0)
    assert idx.tolist() == list(range(50000))
    assert label_map.tolist() == semantics['subsets']['label_map_seed0']


def test_pickles_with_bytes_keys_load(tmp_path):
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for name in ('train', 'test'):
        with open(folder / name, 'wb') as f:
            pickle.dump({b'data': images, b'fine_labels': [3, 7], b'coarse_labels': [0, 1]}, f,
                        protocol=2)
    x, y = cifar.load_cifar('Cifar100', tmp_path, train=True, download=False)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.uint8 and y.tolist() == [3, 7]
    assert x[0, 1, 0, 0] == images[0, 1024]  # planes R, G, B of 1024 pixels each


def test_missing_data_and_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError('no network')

    monkeypatch.setattr(torchvision.datasets, 'CIFAR100', offline)
    with pytest.raises(DataError) as e:
        cifar.load_cifar('Cifar100', tmp_path, train=True)
    msg = str(e.value)
    assert '\n' not in msg and 'cifar-100-python' in msg and 'download=True' in msg


def test_corrupt_file_is_a_data_error(tmp_path):
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    (folder / 'train').write_bytes(b'not a pickle')
    with pytest.raises(DataError, match='cannot read'):
        cifar.load_cifar('Cifar100', tmp_path, train=True, download=False)


def reference_augment(x_u8, flip, dy, dx, mean, std, pad=4):
    """Per image, in the original's order: flip, to [0,1], normalise, shift filling 0."""
    out = torch.zeros(x_u8.shape)
    for i in range(len(x_u8)):
        img = x_u8[i].flip(2) if flip[i] else x_u8[i]
        img = (img.float() / 255 - mean[:, None, None]) / std[:, None, None]
        for r in range(32):
            for c in range(32):
                if 0 <= r + dy[i] < 32 and 0 <= c + dx[i] < 32:
                    out[i, :, r, c] = img[:, r + dy[i], c + dx[i]]
    return out


def test_batched_augmentation_equals_per_image_semantics():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    spec = cifar.DATASETS['Cifar100']
    loader = cifar.DeviceLoader(x, torch.zeros(6, dtype=torch.long), 6, spec.mean, spec.std, 'cpu')
    loader.generator.manual_seed(5)
    out = loader.augment_batch(x)
    replay = torch.Generator().manual_seed(5)  # the draws augment_batch makes, in its order
    flip = torch.rand(6, generator=replay) < 0.5
    shift = torch.randint(-4, 5, (2, 6, 1), generator=replay)
    expected = reference_augment(x, flip, shift[0, :, 0], shift[1, :, 0],
                                 torch.tensor(spec.mean), torch.tensor(spec.std))
    torch.testing.assert_close(out, expected)
    assert flip.any() and not flip.all() and (shift != 0).any()


def test_loader_epochs_are_seeded_permutations(fake_data):
    cf = dict(call='Cifar100', n_per_class=12, nval_per_class=2, augment=True, seed=0)
    loader, n_classes = cifar.build_split(cf, 'train', fake_data, 64, 'cpu', seed=7)
    assert n_classes == 100 and len(loader.labels) == 1000 and len(loader) == 1000 // 64
    def epoch(e):
        loader.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in loader]
    a, b, c = epoch(3), epoch(3), epoch(4)
    assert len(a) == 15 and all(len(y) == 64 for _, y in a)  # drop_last
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    seen = torch.cat([y for _, y in a])
    assert len(seen) == 960 and seen.min() >= 0 and seen.max() < 100


def test_val_and_test_loaders_keep_every_example_in_order(fake_data):
    cf = dict(call='Cifar100', n_per_class=12, nval_per_class=2, seed=0)
    val, _ = cifar.build_split(cf, 'val', fake_data, 64, 'cpu')
    assert sum(len(y) for _, y in val) == 200 and len(val) == 4
    test, _ = cifar.build_split(dict(call='Cifar100', seed=0), 'test', fake_data, 250, 'cpu')
    x, y = next(iter(test))
    assert len(test.labels) == 300 and x.dtype == torch.float32
    mean, std = torch.tensor([0.507, 0.487, 0.441]), torch.tensor([0.267, 0.256, 0.276])
    expected = (test.images[:250].float() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(x, expected)  # normalisation only, dataset order


def test_label_map_is_applied_consistently(fake_data):
    images, raw = cifar.load_cifar('Cifar100', fake_data, train=False)
    loader, _ = cifar.build_split(dict(call='Cifar100', seed=0), 'test', fake_data, 250, 'cpu')
    _, label_map = splits.subset_indices(raw, 'test', seed=0, n_classes=100)
    assert loader.labels.tolist() == label_map[raw].tolist()


def test_cifar10_number_of_classes_comes_from_the_data_set(fake_data):
    cf = dict(call='Cifar10', n_per_class=30, nval_per_class=5, augment=True, seed=0)
    loader, n_classes = cifar.build_split(cf, 'train', fake_data, 32, 'cpu')
    assert n_classes == 10 and len(loader.labels) == 250 and loader.labels.max() == 9


def test_semi_supervised_interleaves_labelled_and_unlabelled(fake_data):
    cf = dict(call='Cifar100', n_per_class=8, nval_per_class=2, seed=0, n_unl_per_class=4,
              lab_unl_ratio=(1, 2))
    loader, _ = cifar.build_split(cf, 'train', fake_data, 30, 'cpu')
    labels = loader.labels
    assert (labels == -100).sum() == 400 and (labels >= 0).sum() == 600
    order = labels[loader.order.positions(loader.epoch)]
    assert len(order) == 3 * 200 == loader.order.n_examples()  # n_tup = min(600 // 1, 400 // 2)
    assert len(loader) == 600 // 30
    pattern = (order == -100).view(-1, 3)
    assert pattern.tolist() == [[False, True, True]] * 200
    val, _ = cifar.build_split(dict(cf, augment=False), 'val', fake_data, 30, 'cpu')
    assert (val.labels >= 0).all() and len(val.labels) == 200



def test_semi_supervised_epochs_draw_the_unlabelled_examples_afresh():
    """With more unlabelled examples than the ratio takes (semisup: 350 per class for 100
    labelled, 1:1), every epoch visits each labelled example once, paired with a new draw of
    unlabelled ones, so that over the epochs all of them are used."""
    labels = torch.tensor([-100] * 12 + [3] * 4)
    epochs = order.EpochOrder(labels, 4, shuffle=True, lab_unl_ratio=(1, 1), seed=0)
    draws = []
    for epoch in range(20):
        pos = epochs.positions(epoch).view(-1, 2)  # (labelled, unlabelled) pairs
        assert len(pos) * 2 == epochs.n_examples()
        assert sorted(pos[:, 0].tolist()) == [12, 13, 14, 15]
        draws.append(frozenset(pos[:, 1].tolist()))
        assert len(draws[-1]) == 4 and (labels[pos[:, 1]] == -100).all()
    assert len(set(draws)) > 10 and frozenset().union(*draws) == set(range(12))

def test_unlabelled_images_never_enter_the_labelled_splits(fake_data):
    _, raw = cifar.load_cifar('Cifar100', fake_data, train=True)
    unl = splits.unlabelled_indices(raw, 4, seed=0, n_classes=100)
    assert len(unl) == 400 and all((raw[unl] == k).sum() == 4 for k in range(100))
    labels = raw.copy()
    labels[unl] = -100
    for split in ('train', 'val'):
        idx, _ = splits.subset_indices(labels, split, 8, 2, seed=0, n_classes=100)
        assert not set(idx) & set(unl)



def test_semi_supervised_splits_are_disjoint_and_unlabelled_images_reach_the_loss_unlabelled(
        fake_data):
    """One draw's labelled training, unlabelled and validation images are pairwise disjoint;
    an epoch's batches (what the training step hands the loss) carry -100 for every unlabelled
    image, and the permuted class of the image for a labelled one, the same in both splits."""
    cf = dict(call='Cifar100', n_per_class=6, nval_per_class=2, seed=3, n_unl_per_class=4,
              lab_unl_ratio=(1, 1))
    images, raw = cifar.load_cifar('Cifar100', fake_data, train=True)
    which = {image.tobytes(): i for i, image in enumerate(images)}
    assert len(which) == len(images)  # the generated images are distinct: they identify
    spec = cifar.DATASETS['Cifar100']
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    seen = {}
    for split in ('train', 'val'):  # not augmented: a batch's images show which images they are
        loader, _ = cifar.build_split(cf, split, fake_data, 50, 'cpu')
        for x, y in loader:
            u8 = ((x * std + mean) * 255).round().to(torch.uint8).numpy()
            for image, label in zip(u8, y.tolist()):
                seen.setdefault(split, {})[which[image.tobytes()]] = label
    train, val = seen['train'], seen['val']
    unl = {i for i, label in train.items() if label == -100}
    lab = set(train) - unl
    assert (len(lab), len(unl), len(val)) == (400, 400, 200)  # an epoch: every image once
    assert not (lab & unl or lab & set(val) or unl & set(val))
    assert all(sum(raw[i] == k for i in unl) == 4 for k in range(100))
    class_of = {}  # the class permutation: one label per raw class, a bijection
    for i, label in list(train.items()) + list(val.items()):
        if label != -100:
            assert class_of.setdefault(raw[i], label) == label
    assert sorted(class_of.values()) == list(range(100)) and -100 not in val.values()

def test_unlabelled_without_ratio_is_rejected(fake_data):
    cf = dict(call='Cifar100', n_per_class=8, nval_per_class=2, seed=0, n_unl_per_class=4)
    with pytest.raises(ConfigError, match='lab_unl_ratio'):
        cifar.build_split(cf, 'train', fake_data, 30, 'cpu')


@pytest.mark.parametrize('cf, match', [
    (dict(call='Cifar100', n_per_class=10, nval_per_class=10), 'nval_per_class < n_per_class'),
    (dict(call='Cifar100', n_per_class=10, nval_per_class=0), 'nval_per_class must be > 0'),
    (dict(call='Svhn'), 'known: Cifar10, Cifar100'),
    (dict(call='Cifar100', nval_per_class=5, colour=True), "unknown data keys \\['colour'\\]"),
])
def test_bad_data_config(fake_data, cf, match):
    with pytest.raises(ConfigError, match=match):
        cifar.build_split(cf, 'train', fake_data, 32, 'cpu')
