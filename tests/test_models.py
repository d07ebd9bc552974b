import copy
import io

import pytest
import torch
from torch import nn

from helpers import DATA, TINY, TINY_EXITS
from multiexit.config import PAPER_NET
from multiexit import losses, models
from multiexit.errors import ConfigError
from multiexit.evaluate import flops
from multiexit.models.batchnorm import BatchNorm2d
from multiexit.train.step import TrainStep
from tools.kernel_count import count_ops

# Reference README section 3.
EXIT_MACS_M = [15.33, 28.01, 44.82, 56.32, 70.18, 86.40, 110.29, 124.15, 140.37, 158.95, 170.01]
EXIT_MACS_ALL_HEADS_M = [15.33, 30.83, 51.33, 65.21, 82.33, 102.69, 131.60, 148.72, 169.08,
                         192.69, 209.66]
EXIT_PARAMS = [367152, 477564, 486672, 592476, 707496, 831732, 854484, 969504, 1093740, 1227192,
               1355100]
EXIT_IN_CHANNELS = [120, 168, 96, 144, 192, 240, 144, 192, 240, 288, 336]

# ResNet-18's 11 M parameters overshoot on 16 images at 0.1 (the loss rises at steps 2 and 3)
LEARNING_RATE = {'ImageNetResNet': 0.02}


@pytest.fixture(scope='module')
def paper_net():
    torch.manual_seed(0)
    return models.build(PAPER_NET)


def test_paper_msdnet_structure(paper_net):
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(paper_net) == 5_067_588
    assert count(paper_net.blocks) == 806_904
    assert count(paper_net.exits) == 4_260_684
    kinds = [type(m) for m in paper_net.modules()]
    assert (kinds.count(nn.Conv2d), kinds.count(BatchNorm2d), kinds.count(nn.Linear)) == (263, 263, 11)
    conv_bias = sum(m.bias.numel() for m in paper_net.modules() if isinstance(m, nn.Conv2d))
    assert conv_bias == 8018
    assert [head[0][0].in_channels for head in paper_net.exits] == EXIT_IN_CHANNELS


def test_exit_costs_reproduce_reference_table(paper_net):
    costs = flops.exit_costs(paper_net, (3, 32, 32))
    assert [c['params'] for c in costs] == EXIT_PARAMS
    assert [round(c['macs'] / 1e6, 2) for c in costs] == EXIT_MACS_M
    assert [round(c['macs_all_heads'] / 1e6, 2) for c in costs] == EXIT_MACS_ALL_HEADS_M


def test_init_matches_original_init_order(paper_net, reference_checkpoint):
    ref = reference_checkpoint['state_dict']
    ours = paper_net.state_dict()
    weights = [k for k in ref if k.endswith('.weight') and ref[k].dim() > 1]  # conv and linear
    assert len(weights) == 263 + 11
    for k in weights:
        assert torch.equal(ours[k], ref[k]), k


def test_original_state_dict_loads_strictly_and_reproduces_logits(reference_checkpoint):
    model = models.build(PAPER_NET)
    models.load_original_state_dict(model, reference_checkpoint['state_dict'])
    with torch.no_grad():
        logits = model.eval()(reference_checkpoint['input'])
    assert len(logits) == 11
    torch.testing.assert_close(torch.stack(logits), reference_checkpoint['logits'],
                               rtol=1e-4, atol=1e-5)


def test_dataparallel_prefix_is_accepted(reference_checkpoint):
    model = models.build(PAPER_NET)
    prefixed = {f'module.{k}': v for k, v in reference_checkpoint['state_dict'].items()}
    models.load_original_state_dict(model, prefixed)
    assert torch.equal(model.exits[3][4].weight,
                       reference_checkpoint['state_dict']['exits.3.4.weight'])


def test_regenerated_reference_state_reproduces_logits():
    """Self-contained: seed 0, BN statistics from 5 train-mode passes, as the reference was made."""
    ref = torch.load(DATA / 'msdnet_reference_io.pt', weights_only=True)
    torch.manual_seed(0)
    model = models.build(PAPER_NET)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(5):
            model.train()(torch.randn(64, 3, 32, 32, generator=g))
        logits = model.eval()(ref['input'])
    # BN statistics summed over 5 passes round differently by thread count (one thread, as
    # under pytest -n 2: 1.5e-5 on logits of order 1)
    torch.testing.assert_close(torch.stack(logits), ref['logits'], rtol=1e-4, atol=5e-5)


def test_build_unknown_name_lists_known():
    with pytest.raises(ConfigError, match="unknown net call='ResNet9000'.*MsdNet"):
        models.build(dict(call='ResNet9000'))


def test_build_bad_keyword_is_config_error():
    with pytest.raises(ConfigError, match='n_exitz'):
        models.build(dict(PAPER_NET, n_exitz=3))


def test_imagenet_stem():
    model = models.build(dict(PAPER_NET, in_shape=224, n_scales=4, nplanes_mulv=[6, 12, 24, 24],
                              btneck_widths=[4, 4, 4, 4], n_exits=2, out_dim=1000))
    stem = model.blocks[0][0].mods[0]
    assert stem[0][0].kernel_size == (7, 7) and isinstance(stem[1], nn.MaxPool2d)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 224, 224))
    assert [tuple(z.shape) for z in out] == [(2, 1000)] * 2


def test_too_few_layers_for_the_transitions_is_a_config_error():
    with pytest.raises(ConfigError, match='at least 4'):
        models.build(dict(PAPER_NET, n_exits=2, nlayers_to_exit=1, nlayers_between_exits=1))


def test_inconsistent_scales_are_rejected():
    with pytest.raises(ConfigError, match='coarsest scale'):
        models.build(dict(PAPER_NET, n_scales=2, nplanes_mulv=[6, 12], btneck_widths=[4, 4]))


def test_every_registered_model_has_a_tiny_config():
    assert set(TINY) == set(models.REGISTRY)


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_registered_model_contract(name):
    torch.manual_seed(0)
    cf = TINY[name]
    model = models.build(cf)
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert isinstance(logits, list) and len(logits) == TINY_EXITS == len(model.exits)
    assert all(z.shape == (4, cf['out_dim']) and torch.isfinite(z).all() for z in logits)
    sum(z.square().mean() for z in logits).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_registered_model_blocks_and_exits_reproduce_forward(name):
    torch.manual_seed(0)
    model = models.build(TINY[name]).eval()
    x = torch.randn(2, 3, 32, 32)
    h, by_parts = x, []
    with torch.no_grad():
        for block, head in zip(model.blocks, model.exits):
            h = block(h)
            by_parts.append(head(model.exit_features(h)))
        assert all(torch.equal(a, b) for a, b in zip(model(x), by_parts))


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_registered_model_learns_a_fixed_batch(name):
    torch.manual_seed(0)
    model = models.build(TINY[name]).train()
    loss_fn = losses.build(dict(call='ClassificationOnlyLoss', n_exits=TINY_EXITS))
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE.get(name, 0.1), momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    values = []
    for _ in range(6):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    assert all(b < a for a, b in zip(values, values[1:])) and values[-1] < 0.95 * values[0], values


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_registered_model_state_dict_round_trip(name):
    torch.manual_seed(0)
    model = models.build(TINY[name])
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))  # BN running statistics away from their init
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    other = models.build(TINY[name])
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(x), other.eval()(x)))


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_registered_model_exit_costs(name):
    model = models.build(TINY[name])
    costs = flops.exit_costs(model)
    macs = [c['macs_all_heads'] for c in costs]
    assert len(costs) == TINY_EXITS and macs[0] > 0
    assert all(a < b for a, b in zip(macs, macs[1:]))
    assert all(c['macs'] <= c['macs_all_heads'] for c in costs)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert costs[-1]['params'] == count(model) - sum(count(h) for h in model.exits[:-1])


@pytest.mark.parametrize('name', sorted(models.REGISTRY) + ['paper'])
def test_exit_macs_are_what_the_flop_counter_counts(name, paper_net):
    """flops counts by hooks what FlopCounterMode counts (FLOPs / 2), layer by layer."""
    from torch.utils.flop_counter import FlopCounterMode

    model = (paper_net if name == 'paper' else models.build(TINY[name])).eval()
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    root = type(model).__name__
    counted = {k[len(root) + 1:]: sum(v.values()) // 2
               for k, v in counter.get_flop_counts().items() if k.startswith(root + '.')}
    with torch.no_grad():
        hooked = flops.module_macs(model, x)
    assert {k: v for k, v in counted.items() if k in hooked} == hooked
    assert sum(hooked.values()) == sum(counter.get_flop_counts()[root].values()) // 2


def with_torchs_batchnorm(model):
    """A copy of ``model`` whose BatchNorms are torch's own (as the original's were)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.__class__ = nn.BatchNorm2d
    return model


def train_steps(model, n, seed=0):
    """(ops of the last step, by name) after ``n`` CPU training steps on one batch, then the
    end of the epoch."""
    torch.manual_seed(seed)  # dropout's masks, the same for every model trained here
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))  # 10: TINY's and fewer
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = losses.build(dict(call='ClassificationOnlyLoss', n_exits=len(model.exits)))
    step = TrainStep(model, loss_fn, opt, len(model.exits), (1,), 'cpu')
    step.start_epoch()
    for _ in range(n - 1):
        step(x, y)
    _, ops = count_ops(lambda: step(x, y))
    step.finish_epoch()
    return ops


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_training_steps_launch_no_batchnorm_counter_and_the_epoch_counts_them(name):
    """torch's BatchNorm2d adds 1 to num_batches_tracked in every training pass, one kernel per
    BatchNorm per step; ours leaves that to the end of the epoch, after which the whole state,
    counters included, is bit for bit what torch's BatchNorm2d gives."""
    torch.manual_seed(0)
    ours = models.build(TINY[name])
    theirs = with_torchs_batchnorm(ours)
    n_bn = sum(isinstance(m, BatchNorm2d) for m in ours.modules())
    assert n_bn > 0
    ops_ours, ops_theirs = train_steps(ours, 3), train_steps(theirs, 3)
    assert ops_theirs - ops_ours == {'add_': n_bn} and not ops_ours - ops_theirs
    state, expected = ours.state_dict(), theirs.state_dict()
    assert all(int(v) == 3 for k, v in state.items() if k.endswith('num_batches_tracked'))
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected), name


def test_batchnorm_with_momentum_none_counts_every_pass_as_torchs():
    """momentum=None (a cumulative average, as benchmarks/early_exit.py calibrates) reads the
    counter in every pass, so it is counted there."""
    ours, theirs = BatchNorm2d(4, momentum=None), nn.BatchNorm2d(4, momentum=None)
    for x in torch.randn(3, 8, 4, 5, 5):
        assert torch.equal(ours(x), theirs(x))
    assert int(ours.num_batches_tracked) == 3
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.running_var, theirs.running_var)


def test_a_trained_snapshot_has_the_originals_format(reference_checkpoint):
    """A state dict of ours loads wherever the original's does: its keys in the same order, with
    the same shapes and dtypes, num_batches_tracked included (the number of training steps, as
    the original's BatchNorms count them), and strictly into a network with torch's BatchNorm.
    The other way is test_original_state_dict_loads_strictly_and_reproduces_logits."""
    torch.manual_seed(0)
    model = models.build(PAPER_NET)
    train_steps(model, 2)
    ref = reference_checkpoint['state_dict']
    state = model.state_dict()
    assert list(state) == list(ref)
    assert all(state[k].dtype == ref[k].dtype and state[k].shape == ref[k].shape for k in ref)
    counters = [v for k, v in state.items() if k.endswith('num_batches_tracked')]
    assert len(counters) == 263 and all(int(v) == 2 for v in counters)
    with_torchs_batchnorm(models.build(PAPER_NET)).load_state_dict(state)
