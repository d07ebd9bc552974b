import pytest
import torch
import torch.nn.functional as F

from helpers import GS, reference_inputs
from multiexit import losses
from multiexit.errors import ConfigError
from tools.kernel_count import count_ops

def dbt(**kw):
    return losses.DistillationBasedLoss(**{**dict(C=0.5, maxprob=0.5, n_exits=11,
                                                  global_scale=GS), **kw})


def test_reference_inputs_are_the_documented_ones():
    assert reference_inputs(1)[1].tolist() == [63, 16, 76, 45, 95, 5, 4, 39]


@pytest.mark.parametrize('scale, first, T_after, second, T_after2', [
    (1, 49.181129, 1.0, 49.181129, 1.0),
    (10, 253.937973, 1.05, 260.014587, 1.1025),
])
def test_dbt_reference_values_and_temperature(scale, first, T_after, second, T_after2):
    logits, y = reference_inputs(scale)
    loss = dbt()
    assert loss(logits, y).item() == pytest.approx(first, rel=1e-6)
    assert loss.T == pytest.approx(T_after, rel=1e-12)
    assert loss(logits, y).item() == pytest.approx(second, rel=1e-6)
    assert loss.T == pytest.approx(T_after2, rel=1e-12)


@pytest.mark.parametrize('scale, expected', [(1, 54.099239), (10, 279.331757)])
def test_dbt_global_scale_one(scale, expected):
    assert dbt(global_scale=1.0)(*reference_inputs(scale)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize('scale, gs, expected', [(1, GS, 363.124359), (10, GS, 687.472046),
                                                  (1, 1.0, 399.436798), (10, 1.0, 756.219238)])
def test_const_temperature_reference_values(scale, gs, expected):
    loss = losses.DistillationLossConstTemp(C=0.5, T=4.0, n_exits=11, global_scale=gs)
    assert loss(*reference_inputs(scale)).item() == pytest.approx(expected, rel=1e-6)
    assert loss.T == 4.0


@pytest.mark.parametrize('scale, expected', [(1, 57.031063), (10, 293.609436)])
def test_classification_only_reference_values(scale, expected):
    loss = losses.ClassificationOnlyLoss(n_exits=11)
    assert loss(*reference_inputs(scale)).item() == pytest.approx(expected, rel=1e-6)


def test_temperature_trajectory(semantics):
    ref = semantics['temperature']
    g = torch.Generator().manual_seed(3)
    loss = dbt()
    values, temps = [], []
    for step in range(40):
        logits = torch.randn(11, 16, 100, generator=g) * (1 + step * 0.5)
        y = torch.randint(0, 100, (16,), generator=g)
        values.append(loss(list(logits), y).item())
        temps.append(loss.T)
    assert values == pytest.approx(ref['loss_values'], rel=1e-5)
    assert temps == pytest.approx(ref['temperature_after_each_step'], rel=1e-12)


def test_temperature_is_state_and_frozen_in_eval():
    logits, y = reference_inputs(10)
    loss = dbt()
    for _ in range(3):
        loss(logits, y)
    assert loss.T == pytest.approx(1.05 ** 3)
    restored = dbt()
    restored.load_state_dict(loss.state_dict())
    assert restored.T == loss.T
    restored.eval()
    restored(logits, y)
    assert restored.T == loss.T


def test_C_one_drops_early_cross_entropies():
    logits, y = reference_inputs(1)
    loss = losses.DistillationLossConstTemp(C=1.0, T=2.0, n_exits=11)
    prob_t = F.softmax(logits[-1] / 2.0, dim=1)
    expected = sum(4.0 * -(prob_t * F.log_softmax(z / 2.0, dim=1)).sum(1).mean()
                   for z in logits[:-1])
    assert loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_unlabelled_examples_only_add_distillation():
    logits, y = reference_inputs(1)
    loss = losses.DistillationLossConstTemp(C=0.5, T=4.0, n_exits=11)
    y_unl = y.clone()
    y_unl[4:] = -100
    keep = lambda t: [z[:4] for z in t]
    prob = lambda zs: F.softmax(zs[-1] / 4.0, dim=1)
    dist = lambda zs: sum(-(prob(zs) * F.log_softmax(z / 4.0, 1)).sum(1).mean() for z in zs[:-1])
    ce = sum(F.cross_entropy(z, y[:4]) for z in keep(logits))
    expected = 0.5 * ce + 16 * 0.5 * dist(logits)
    assert loss(logits, y_unl).item() == pytest.approx(expected.item(), rel=1e-6)
    all_unl = torch.full_like(y, -100)
    assert torch.isfinite(losses.ClassificationOnlyLoss(11)(logits, all_unl))


def test_gradient_does_not_flow_into_the_teacher_through_distillation():
    logits, y = reference_inputs(1)
    logits = [z.clone().requires_grad_() for z in logits]
    losses.DistillationLossConstTemp(C=1.0, T=4.0, n_exits=11)(logits, y).backward()
    assert logits[-1].grad is None or not logits[-1].grad.abs().sum()
    assert logits[0].grad.abs().sum() > 0


def test_build():
    loss = losses.build(dict(call='DistillationBasedLoss', n_exits=11, acc_tops=[1, 5], C=0.5,
                             maxprob=0.5, global_scale=GS))
    assert isinstance(loss, losses.DistillationBasedLoss) and loss.acc_tops == (1, 5)
    with pytest.raises(ConfigError, match='known: ClassificationOnlyLoss'):
        losses.build(dict(call='Nope', n_exits=11))
    with pytest.raises(ConfigError, match='typo'):
        losses.build(dict(call='ClassificationOnlyLoss', n_exits=11, typo=1))


@pytest.mark.filterwarnings('error')  # dropped silently: the training scripts warn where set
def test_build_drops_keys_of_other_losses_left_by_a_merged_config():
    loss = losses.build(dict(call='ClassificationOnlyLoss', n_exits=11, C=0.5, maxprob=0.5,
                             global_scale=GS))
    assert isinstance(loss, losses.ClassificationOnlyLoss)


@pytest.mark.parametrize('make', [lambda n: losses.ClassificationOnlyLoss(n_exits=n),
                                  lambda n: losses.DistillationLossConstTemp(0.5, 4.0, n),
                                  lambda n: dbt(n_exits=n),
                                  lambda n: losses.DistillationFromLaterExits(n),
                                  lambda n: losses.DistillationFromNextExit(n)],
                         ids=['ClassificationOnlyLoss', 'DistillationLossConstTemp',
                              'DistillationBasedLoss', 'DistillationFromLaterExits',
                              'DistillationFromNextExit'])
def test_a_loss_runs_its_ops_once_for_all_exits(make):
    """The exits are stacked: forward and backward launch as many kernels for 11 exits as
    for 3 (a loop over the exits cost ~25 ops per exit and step)."""
    def ops(n):
        logits = [z.requires_grad_() for z in torch.randn(n, 8, 100).unbind()]
        y = torch.randint(0, 100, (8,))
        return count_ops(lambda: make(n)(logits, y).backward())[0]
    assert ops(11) == ops(3)
