"""IMTA (Li et al., ICCV 2019) against the authors' code (kalviny/IMTA;
tests/data/imta_reference.json holds its numbers and recipe): the one-for-all distillation loss
(``losses.IMTADistillation``) and Gradient Equilibrium (``MsdNet(gradient_equilibrium=True)``),
which must leave the forward values alone, fold into a pack, and train and resume exactly."""
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import DATA
from multiexit import losses
from multiexit.errors import ConfigError
from multiexit.models import MsdNet, build
from multiexit.models.fused import fuse, member_part

REFERENCE = json.loads((DATA / 'imta_reference.json').read_text())
SETTINGS = [(0.1, 1.0), (0.9, 3.0)]  # run_IMTA.sh's (the defaults), args.py's


def reference_batch():
    """The recipe's inputs: 4 exits x 16 examples x 10 classes of logits, labels, a teacher."""
    torch.manual_seed(0)
    logits = torch.randn(4, 16, 10) * 3
    y = torch.randint(0, 10, (16,))
    teacher = torch.randn(16, 10) * 3
    assert y.tolist() == REFERENCE['y']
    return [z.clone().requires_grad_() for z in logits.unbind()], y, teacher


def assert_matches(loss, logits, expected):
    loss.backward()
    assert loss.item() == pytest.approx(expected['loss'], rel=1e-6)
    assert [z.grad.norm().item() for z in logits] == pytest.approx(expected['grad_norm'],
                                                                  rel=1e-5)


@pytest.mark.parametrize('gamma, T', SETTINGS)
def test_the_loss_with_the_last_exit_as_teacher_is_the_authors(gamma, T):
    logits, y, _ = reference_batch()
    loss = losses.IMTADistillation(n_exits=4, gamma=gamma, T=T)(logits, y)
    assert_matches(loss, logits, REFERENCE[f'last_exit_g{gamma}_T{T}'])


@pytest.mark.parametrize('gamma, T', SETTINGS)
def test_the_loss_with_their_separate_teacher_is_the_authors(gamma, T):
    logits, y, teacher = reference_batch()
    loss = losses.imta_loss(torch.stack(logits), y, teacher.requires_grad_(), gamma, T)
    assert_matches(loss, logits, REFERENCE[f'teacher_g{gamma}_T{T}'])
    assert teacher.grad is None  # detached


def test_the_defaults_are_run_IMTA_sh():
    loss = losses.build(dict(call='IMTADistillation', n_exits=4, C=0.5, maxprob=0.5))
    assert (loss.gamma, loss.T) == (0.1, 1.0)


def test_each_member_of_a_pack_gets_its_own_loss():
    logits, y, teacher = reference_batch()
    z = torch.stack(logits).detach()
    other = z.flip(1)
    both = losses.imta_loss(torch.stack([z, other], dim=1), torch.stack([y, y.flip(0)]),
                            torch.stack([teacher, teacher.flip(0)]), 0.1, 2.0)
    alone = [losses.imta_loss(z, y, teacher, 0.1, 2.0),
             losses.imta_loss(other, y.flip(0), teacher.flip(0), 0.1, 2.0)]
    torch.testing.assert_close(both, torch.stack(alone))


def test_unlabelled_examples_only_add_distillation_and_one_exit_is_its_cross_entropy():
    logits, y, _ = reference_batch()
    unlabelled = torch.full_like(y, losses.IGNORE)
    assert losses.IMTADistillation(4)(logits, unlabelled).item() > 0
    assert losses.IMTADistillation(4, gamma=0.0)(logits, unlabelled).item() == 0
    one = losses.IMTADistillation(1)(logits[-1:], y)
    assert one.item() == pytest.approx(F.cross_entropy(logits[-1], y).item())


def ge_net(gradient_equilibrium, seed=0):
    torch.manual_seed(seed)
    return MsdNet(**REFERENCE['ge_net'], gradient_equilibrium=gradient_equilibrium)


def ge_input():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))


@pytest.mark.parametrize('name', ['ge', 'plain'])
def test_gradient_equilibrium_rescales_as_the_authors_forward_does(name):
    """Their MSDNet-GE forward on our blocks and heads (the recipe) and our option give every
    block the same gradient from every exit, and from the sum of the exits' losses."""
    expected = REFERENCE[name]
    net = ge_net(name == 'ge')
    x, y = ge_input()
    for i in list(range(4)) + ['all']:
        net.zero_grad()
        xg = x.clone().requires_grad_()
        logits = net(xg)
        loss = (sum(F.cross_entropy(z, y) for z in logits) if i == 'all'
                else F.cross_entropy(logits[i], y))
        loss.backward()
        norms = [torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                            for p in b.parameters()]).norm().item() for b in net.blocks]
        key = 'all_' if i == 'all' else ''
        assert norms == pytest.approx(expected[key + 'block_grad_norm'] if i == 'all'
                                      else expected['block_grad_norm'][i], rel=1e-5, abs=1e-12)
        assert xg.grad.norm().item() == pytest.approx(
            expected['all_x_grad_norm'] if i == 'all' else expected['x_grad_norm'][i], rel=1e-5)
    assert [z.sum().item() for z in logits] == pytest.approx(expected['logits_sum'], rel=1e-5)


def test_gradient_equilibrium_leaves_the_forward_values_unchanged():
    ge, plain = ge_net(True), ge_net(False)
    x, _ = ge_input()
    for a, b in zip(ge(x), plain(x)):
        assert torch.equal(a, b)
    h = x  # the exit-by-exit path of early exit
    for k, (block, head) in enumerate(zip(ge.blocks, ge.exits)):
        h = block(h)
        assert torch.equal(head(ge.exit_features(h)), plain(x)[k])


def test_gradient_equilibrium_survives_fusing():
    members = [ge_net(True, seed) for seed in (0, 5)]
    xs = [torch.randn(2, 3, 32, 32) for _ in members]
    y = torch.randint(0, 10, (2,))
    fused = fuse(members)
    assert fused.gradient_equilibrium
    out = fused(torch.cat(xs, dim=1))
    sum(F.cross_entropy(z.flatten(0, 1), y.repeat(2)) * 2 for z in out).backward()
    for k, (member, x) in enumerate(zip(members, xs)):
        sum(F.cross_entropy(z, y) for z in member(x)).backward()
        for (name, p), q in zip(fused.named_parameters(), member.parameters()):
            torch.testing.assert_close(member_part(p.grad, k, q.shape), q.grad, rtol=1e-4,
                                       atol=1e-6, msg=name)


def test_the_settings_pass_the_checks_and_bad_ones_are_one_line():
    from multiexit.config import TrainConfig

    cf = dict(call='MsdNet', **REFERENCE['ge_net'], gradient_equilibrium=True)
    TrainConfig.check(dict(cf_net=cf, cf_loss=dict(call='IMTADistillation', gamma=0.1, T=1.0)))
    assert build(cf).gradient_equilibrium
    with pytest.raises(ConfigError, match='gradient_equilibrium must be True or False'):
        build(dict(cf, gradient_equilibrium=1))
    with pytest.raises(ConfigError, match='cf_loss.gamma=1.5: expected a number in'):
        TrainConfig.check(dict(cf_loss=dict(call='IMTADistillation', gamma=1.5)))
