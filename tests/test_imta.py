"""IMTA (Li et al., ICCV 2019) against the authors' code (kalviny/IMTA;
tests/data/imta_reference.json holds its numbers and recipe): the one-for-all distillation loss
(``losses.IMTADistillation``) and Gradient Equilibrium (``MsdNet(gradient_equilibrium=True)``),
which must leave the forward values alone, fold into a pack, and train and resume exactly."""
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import DATA
from multiexit.config import TrainConfig
from multiexit.data.cifar import write_fake_cifar
from multiexit import losses
from multiexit.errors import ConfigError
from multiexit.models import MsdNet, build
from multiexit.models.fused import fuse, member_part
from multiexit.train.api import train_alone
from multiexit.train.run import Run

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
    cf = dict(call='MsdNet', **REFERENCE['ge_net'], gradient_equilibrium=True)
    TrainConfig.check(dict(cf_net=cf, cf_loss=dict(call='IMTADistillation', gamma=0.1, T=1.0)))
    assert build(cf).gradient_equilibrium
    with pytest.raises(ConfigError, match='gradient_equilibrium must be True or False'):
        build(dict(cf, gradient_equilibrium=1))
    with pytest.raises(ConfigError, match='cf_loss.gamma=1.5: expected a number in'):
        TrainConfig.check(dict(cf_loss=dict(call='IMTADistillation', gamma=1.5)))


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """train_cifar.py's smoke configuration with GE and the IMTA loss (train_cifar.py with
    cf_net.gradient_equilibrium=True cf_loss.call=IMTADistillation), on generated data."""
    import train_cifar

    config = dict(train_cifar.ex.run('print_config', named_configs=['smoke']).config)
    data = tmp_path_factory.mktemp('data')
    write_fake_cifar(data, 'Cifar100', n_train_per_class=30, n_test_per_class=2)
    small = dict(n_per_class=3, nval_per_class=1)  # 3 steps an epoch
    return dict(config, data_dir=str(data), seed=3, parent_snapshot=None,
                cf_net=dict(config['cf_net'], gradient_equilibrium=True),
                cf_loss=dict(config['cf_loss'], call='IMTADistillation'),
                cf_trn=dict(config['cf_trn'], **small), cf_val=dict(config['cf_val'], **small))


def trained(config, run_dir, starts_at=0, **changes):
    run_dir.mkdir(parents=True)
    config = dict(config, **changes)
    (run_dir / 'config.json').write_text(json.dumps(config))  # what sacred records
    run = Run(TrainConfig.of(config), run_dir, run_dir.parent, log=print)
    assert run.epoch == starts_at
    train_alone(run)
    return run


def test_ge_with_the_imta_loss_trains_and_resumes_exactly(smoke, tmp_path):
    full = trained(smoke, tmp_path / 'full', n_epochs=2)
    assert full.model.gradient_equilibrium and isinstance(full.loss_fn, losses.IMTADistillation)
    trained(smoke, tmp_path / 'parent', n_epochs=1)
    trained(smoke, tmp_path / 'resumed', starts_at=1, n_epochs=2,
            parent_snapshot=str(tmp_path / 'parent'))
    ref, resumed = (torch.load(tmp_path / name / 'last.pt', weights_only=True)
                    for name in ('full', 'resumed'))
    assert ref['epoch'] == resumed['epoch'] == 2
    for k, v in ref['model'].items():
        assert torch.equal(v, resumed['model'][k]), k
    first = torch.load(tmp_path / 'parent' / 'last.pt', weights_only=True)['model']
    assert any(not torch.equal(v, first[k]) for k, v in ref['model'].items())  # it trained
