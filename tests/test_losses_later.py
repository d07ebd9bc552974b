"""Distillation from later exits and from the next exit against the early-exit benchmark's own
loss code (Kubaty et al.; tests/data/distill_later_reference.json holds its numbers and recipe)."""
import json

import pytest
import torch

from helpers import DATA
from multiexit import losses

REFERENCE = json.loads((DATA / 'distill_later_reference.json').read_text())
LOSSES = {'distill_later': losses.DistillationFromLaterExits,
          'distill_next': losses.DistillationFromNextExit}


def reference_batch():
    """The recipe's inputs: 4 exits x 16 examples x 10 classes of logits, and labels."""
    torch.manual_seed(0)
    logits = torch.randn(4, 16, 10) * 3
    y = torch.randint(0, 10, (16,))
    assert y.tolist() == REFERENCE['y']
    return [z.clone().requires_grad_() for z in logits.unbind()], y


@pytest.mark.parametrize('weight', [1.0, 0.5])
@pytest.mark.parametrize('name', list(LOSSES))
def test_loss_and_gradients_match_the_authors(name, weight):
    expected = REFERENCE[f'{name}_w{weight}']
    logits, y = reference_batch()
    loss = LOSSES[name](n_exits=4, kd_weight=weight)(logits, y)
    loss.backward()
    assert loss.item() == pytest.approx(expected['loss'], rel=1e-6)
    assert [z.grad.norm().item() for z in logits] == pytest.approx(expected['grad_norm'],
                                                                  rel=1e-5)


@pytest.mark.parametrize('make', list(LOSSES.values()))
def test_the_last_exit_learns_from_the_labels_alone(make):
    logits, y = reference_batch()
    make(n_exits=4, kd_weight=100.0)(logits, y).backward()
    alone, _ = reference_batch()
    make(n_exits=4, kd_weight=0.0)(alone, y).backward()
    torch.testing.assert_close(logits[-1].grad, alone[-1].grad)


@pytest.mark.parametrize('make', list(LOSSES.values()))
def test_unlabelled_examples_only_add_distillation(make):
    logits, y = reference_batch()
    unlabelled = torch.full_like(y, losses.IGNORE)
    assert make(n_exits=4)(logits, unlabelled).item() > 0
    assert make(n_exits=4, kd_weight=0.0)(logits, unlabelled).item() == 0


@pytest.mark.parametrize('make', list(LOSSES.values()))
def test_one_exit_is_its_cross_entropy(make):
    logits, y = reference_batch()
    plain = losses.ClassificationOnlyLoss(1)(logits[:1], y)
    assert make(n_exits=1)(logits[:1], y).item() == pytest.approx(plain.item())


def test_build():
    loss = losses.build(dict(call='DistillationFromNextExit', n_exits=4, kd_weight=0.3, C=0.5))
    assert isinstance(loss, losses.DistillationFromNextExit) and loss.kd_weight == 0.3
