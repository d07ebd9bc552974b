"""The fast path trains exactly like the original's mechanics, and bf16 stays close to fp32."""
import numpy as np
import pytest
import torch

from helpers import GS, reference_inputs
from multiexit import losses, models
from multiexit.data.cifar import DATASETS, DeviceLoader
from multiexit.train.step import TrainStep
from multiexit.train.loop import train_epoch
from tools import reference_style

NET = dict(call='MsdNet', n_exits=3, nlayers_to_exit=2, nlayers_between_exits=1,
           nplanes_mulv=[2, 4, 8], exit_width=16, btneck_widths=[2, 2, 2], out_dim=10)
# maxprob far below a 10-class teacher's confidence, so that T is raised at (almost) every step
LOSS = dict(call='DistillationBasedLoss', n_exits=3, C=0.5, maxprob=0.02, global_scale=10 / 3)
OPT = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
SPEC = DATASETS['Cifar10']
STEPS, BATCH = 50, 16


@pytest.fixture(scope='module')
def batches():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (STEPS * BATCH, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (STEPS * BATCH,), generator=g)
    return images, labels


def fresh():
    torch.manual_seed(0)
    model = models.build(NET)
    return model, torch.optim.SGD(model.parameters(), **OPT)


def ours(images, labels, amp=False):
    """train_epoch on one batch at a time, to read the loss of every step."""
    model, opt = fresh()
    loss_fn = losses.build(LOSS)
    step = TrainStep(model, loss_fn, opt, 3, (1, 5), 'cpu', amp=amp, T=loss_fn.temperature)
    out = []
    for i in range(STEPS):
        part = slice(i * BATCH, (i + 1) * BATCH)
        loader = DeviceLoader(images[part], labels[part], BATCH, SPEC.mean, SPEC.std, 'cpu')
        [loss], _, [bad] = train_epoch(step, loader)
        assert bad is None
        out.append(loss)
    return np.array(out), loss_fn.T


def test_default_path_equals_reference_mechanics_in_fp32(batches):
    images, labels = batches
    got, T = ours(images, labels)
    model, opt = fresh()
    loss_fn = reference_style.DistillationBasedLoss(**LOSS)
    loader = reference_style.loader(images.numpy(), labels.numpy(), BATCH, SPEC.mean, SPEC.std,
                                    augment=False, train=False)  # the same order, no augmentation
    expected = np.array([reference_style.train_step(model, loss_fn, opt, x, y).item()
                         for x, y in loader])
    assert len(expected) == STEPS
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert T == pytest.approx(loss_fn.T, rel=1e-12) and T > 1.05 ** 40


@pytest.mark.parametrize('scale, first, second, T_after2', [(1, 49.181129, 49.181129, 1.0),
                                                        (10, 253.937973, 260.014587, 1.1025)])
def test_reference_loss_gives_the_originals_values(scale, first, second, T_after2):
    """The reference mechanics' own loss against the values measured on the original code."""
    loss = reference_style.DistillationBasedLoss(C=0.5, maxprob=0.5, n_exits=11, global_scale=GS)
    logits, y = reference_inputs(scale)
    assert loss(logits, y).item() == pytest.approx(first, rel=1e-6)
    assert loss(logits, y).item() == pytest.approx(second, rel=1e-6)
    assert loss.T == pytest.approx(T_after2, rel=1e-12)


def test_bf16_autocast_stays_close_to_fp32(batches):
    """Stated tolerance: per-step losses within 5 % of fp32, their mean within 2 %."""
    images, labels = batches
    fp32, T32 = ours(images, labels)
    bf16, T16 = ours(images, labels, amp=True)
    rel = np.abs(bf16 / fp32 - 1)
    assert rel.max() < 0.05 and rel.mean() < 0.02, rel
    assert abs(np.log(T16 / T32)) <= 2 * np.log(1.05)  # at most two steps of T apart
