"""ResNet and WideResNet: standard sizes, exit placement, heads, named configs, a CPU smoke run."""
import itertools
import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from helpers import run_in_process
from multiexit.config import PAPER_NET
from multiexit import models
from multiexit.errors import ConfigError
from multiexit.evaluate import flops
from multiexit.metrics import metric_names
from multiexit.models.batchnorm import BatchNorm2d
from multiexit.models.resnet import BasicBlock, WideBlock, sdn_exit_after

# README "Backbones": ResNet-56 with the default exits.
RESNET56_EXIT_AFTER = [3, 7, 11, 15, 19, 23]
RESNET56_EXIT_PARAMS = [20852, 39540, 96884, 171124, 340980, 636916, 858868]
RESNET56_EXIT_MACS_M = [19.32, 38.19, 55.89, 74.76, 92.46, 111.34, 125.49]


def count(module):
    return sum(p.numel() for p in module.parameters())


def build(cf):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no key of these configs may be dropped
        return models.build(cf)


@pytest.mark.parametrize('cf, n_params, n_conv3, n_conv1', [
    (dict(call='ResNet', depth=56), 858_868, 55, 0),
    (dict(call='ResNet', depth=110), 1_733_812, 109, 0),
    (dict(call='WideResNet', depth=28, widen_factor=10), 36_536_884, 25, 3),
])
def test_without_exits_the_standard_network(cf, n_params, n_conv3, n_conv1):
    model = build(dict(cf, exit_after=[]))
    assert len(model.blocks) == len(model.exits) == 1
    assert count(model) == n_params
    convs = [m.kernel_size for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert (convs.count((3, 3)), convs.count((1, 1)), len(convs)) == (n_conv3, n_conv1,
                                                                      n_conv3 + n_conv1)
    linear = model.exits[-1][-1]
    assert isinstance(linear, nn.Linear) and linear.out_features == 100


def test_resnet56_default_exits_and_costs():
    model = build(dict(call='ResNet', depth=56))
    assert model.exit_after == RESNET56_EXIT_AFTER
    assert len(model.exits) == 7
    costs = flops.exit_costs(model)
    assert [c['params'] for c in costs] == RESNET56_EXIT_PARAMS
    assert [round(c['macs'] / 1e6, 2) for c in costs] == RESNET56_EXIT_MACS_M
    assert costs[-1]['macs'] == model.backbone_macs[-1] + 64 * 100  # + the final linear layer


def test_wrn28_10_default_exits():
    assert build(dict(call='WideResNet')).exit_after == [1, 3, 5, 6, 8, 10]


@pytest.mark.parametrize('cf', [dict(call='ResNet', depth=56),
                                dict(call='WideResNet', depth=16, widen_factor=2)])
def test_closed_form_macs_match_the_flop_counter(cf):
    n_blocks = len(build(cf).backbone_macs)
    model = build(dict(cf, exit_after=list(range(n_blocks - 1))))  # one residual block per segment
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    measured = [sum(per_module[f'{root}.blocks.{k}'].values()) // 2 for k in range(n_blocks)]
    assert list(itertools.accumulate(measured)) == model.backbone_macs


@pytest.mark.parametrize('cumulative, expected', [
    ([10, 20, 30, 40, 50, 60, 70, 80, 90, 100], [0, 2, 3, 5, 6, 8]),  # ties go to the earlier
    ([50, 100], [0]),  # repeats merge; 90 % would be the last block, the final classifier's
])
def test_sdn_exit_placement(cumulative, expected):
    assert sdn_exit_after(cumulative) == expected


def test_conv_heads_at_every_stage():
    model = build(dict(call='ResNet', depth=20, exit_after=[1, 4, 7], head='conv', head_width=32))
    kinds = [[type(m) for m in head] for head in model.exits]
    assert all(kind[0] is nn.Conv2d and kind[3] is nn.Conv2d for kind in kinds[:-1])
    assert kinds[-1] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]  # the standard classifier
    with torch.no_grad():
        logits = model.eval()(torch.randn(2, 3, 32, 32))  # exits read 32x32, 16x16 and 8x8
    assert [tuple(z.shape) for z in logits] == [(2, 100)] * 4


def test_wide_resnet_pool_heads_normalise_first():
    model = build(dict(call='WideResNet', depth=10, widen_factor=1, exit_after=[0]))
    for head in model.exits:
        assert [type(m) for m in head] == [BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d,
                                           nn.Flatten, nn.Linear]


def test_option_a_shortcut_subsamples_and_pads_with_zeros():
    block = BasicBlock(16, 32, stride=2).eval()
    nn.init.zeros_(block.bn2.weight)  # the residual branch now outputs 0
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        out = block(x)
    assert torch.equal(out[:, 8:24], torch.relu(x[:, :, ::2, ::2]))
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_wide_block_projects_the_preactivated_input():
    block = WideBlock(16, 32, stride=2, dropout=0.0).eval()
    nn.init.zeros_(block.conv2.weight)
    nn.init.constant_(block.bn1.bias, -0.5)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = block.shortcut(torch.relu(block.bn1(x)))
        assert torch.equal(block(x), expected)


def test_dropout_is_active_in_training_only():
    model = build(dict(call='WideResNet', depth=10, widen_factor=1, dropout=0.5, exit_after=[]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model.train()(x)[0], model(x)[0])
        assert torch.equal(model.eval()(x)[0], model(x)[0])


@pytest.mark.parametrize('cf, message', [
    (dict(call='ResNet', depth=10), 'depth must be 6n\\+2'),
    (dict(call='WideResNet', depth=26), 'depth must be 6n\\+4'),
    (dict(call='ResNet', depth=8, exit_after=[2]), 'exit_after must be increasing'),
    (dict(call='ResNet', depth=8, exit_after=[1, 0]), 'exit_after must be increasing'),
    (dict(call='ResNet', depth=8, head='max'), "head must be 'pool' or 'conv'"),
])
def test_bad_arguments_are_config_errors(cf, message):
    with pytest.raises(ConfigError, match=message):
        models.build(cf)


@pytest.mark.filterwarnings('error')  # silently: the user did not set them
def test_msdnet_keys_left_in_cf_net_are_dropped():
    """What ``with resnet56 smoke`` passes: the default MsdNet keys merged with ResNet's."""
    model = models.build(dict(PAPER_NET, call='ResNet', depth=8))
    assert model.exit_after == [0, 1]


@pytest.fixture(scope='module')
def train_cifar():
    import train_cifar
    return train_cifar


@pytest.mark.parametrize('name, n_params, opt, epochs, scheduler', [
    ('resnet56', 881_868, dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False),
     164, dict(milestones=[82, 123], gamma=0.1)),
    ('resnet110', 1_756_812, dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False),
     164, dict(milestones=[82, 123], gamma=0.1)),
    ('wrn28_10', 36_765_964, dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
     200, dict(milestones=[60, 120, 160], gamma=0.2)),
])
def test_named_configs(train_cifar, name, n_params, opt, epochs, scheduler):
    config = train_cifar.ex.run('print_config', named_configs=[name]).config
    model = models.build(config['cf_net'])  # the default's MsdNet keys are dropped
    assert count(model) == n_params and len(model.exits) == 7
    assert config['cf_loss']['n_exits'] is None
    assert config['cf_opt'] == dict(call='SGD', **opt)
    assert config['cf_scheduler'] == dict(call='MultiStepLR', **scheduler)
    assert (config['batch_size'], config['n_epochs']) == (128, epochs)
    assert (config['cf_trn']['n_per_class'], config['cf_trn']['nval_per_class']) == (150, 50)


def test_resnet_smoke_run_trains_and_evaluates(tmp_path):
    snaps = tmp_path / 'snapshots'  # the scripts' default
    # depth 8 (exits after blocks 0 and 1) keeps it fast; resnet56 smoke takes ~1 min on 2 cores
    run_in_process('train_cifar.py', 'with', 'resnet56', 'smoke', 'cf_net.depth=8',
                   'snapshot_name=resnet', cwd=tmp_path)
    run = json.loads((snaps / '1' / 'run.json').read_text())
    assert run['status'] == 'COMPLETED'
    assert json.loads((snaps / '1' / 'config.json').read_text())['cf_net']['call'] == 'ResNet'
    proc = run_in_process('eval.py', 'with', 'snapshot_name=resnet', cwd=tmp_path)
    assert 'ensemble top-1' in proc.stdout
    result = json.loads((snaps / '2' / 'run.json').read_text())['result']
    assert set(metric_names(3, (1, 5))) <= set(result) and 'acc1_clf3' not in result
