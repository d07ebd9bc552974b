"""train_imagenet.py's networks: MSDNet's ImageNet models against MSDNet's published figures,
and the ResNet-50 backbone against torchvision's."""
import pytest
import torch
import torchvision
from torch import nn

from multiexit import models
from multiexit.evaluate import flops
from multiexit.models.msdnet import MsdLayer

# MSDNet (Huang et al. 2018) with step 7 on ImageNet, as its PyTorch code reports it: parameters
# without conv biases, and "FLOPs" that count the multiply-accumulates of convolutions and linear
# layers plus ReLU outputs, pooling window reads and linear biases, with every exit up to k.
PUBLISHED_STEP7_MPARAMS = 62.31
PUBLISHED_STEP7_MFLOPS = [616, 1436, 2283, 2967, 3254]


@pytest.fixture(scope='module')
def train_imagenet():
    import train_imagenet
    return train_imagenet


def cf_net(train_imagenet, named, **changes):
    config = train_imagenet.ex.run('print_config', named_configs=named).config
    return dict(config['cf_net'], out_dim=1000, **changes)


def msdnet_style_mflops(model):
    """Cumulative 'FLOPs' at each exit, counted as MSDNet's op counter counts them."""
    count, at_exits = [0], []

    def hook(module, inputs, out):
        if isinstance(module, nn.Conv2d):
            count[0] += out[0].numel() * module.in_channels * module.kernel_size[0] * \
                module.kernel_size[1] // module.groups
        elif isinstance(module, nn.ReLU):
            count[0] += inputs[0][0].numel()
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            count[0] += out[0].numel() * module.kernel_size ** 2
        elif isinstance(module, nn.Linear):
            count[0] += module.weight.numel() + module.bias.numel()
            at_exits.append(count[0])

    for m in model.modules():
        if not list(m.children()):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    return [round(n / 1e6) for n in at_exits]


def test_msdnet_step7_has_msdnets_parameters_and_flops(train_imagenet):
    model = models.build(cf_net(train_imagenet, ['msdnet_step7']))
    n_params = sum(p.numel() for p in model.parameters())
    conv_bias = sum(m.bias.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert (n_params, conv_bias) == (62_344_376, 29_936)
    assert round((n_params - conv_bias) / 1e6, 2) == PUBLISHED_STEP7_MPARAMS
    costs = flops.exit_costs(model, (3, 224, 224))
    # ours count convolutions and linear layers only: 4 to 8 M fewer, all ReLU and pooling
    ours = [round(c['macs_all_heads'] / 1e6) for c in costs]
    assert ours == [612, 1431, 2276, 2960, 3246]
    assert msdnet_style_mflops(model) == PUBLISHED_STEP7_MFLOPS


@pytest.mark.parametrize('named, layers', [
    ([], [4, 4, 4, 4, 4]),  # the default, step 4
    (['msdnet_step4'], [4, 4, 4, 4, 4]),
    (['msdnet_step6'], [6, 6, 6, 7, 5]),  # a transition at layer 25, where block 4 begins
    (['msdnet_step7'], [7, 7, 7, 7, 7]),
])
def test_msdnet_blocks_follow_the_originals_boundaries(train_imagenet, named, layers):
    """The original counts the transition after layer l in the block that ends at l or later,
    so where a transition follows the first layer of a block, the exit before it moves one layer
    late. Narrow widths: the boundaries do not depend on them."""
    model = models.build(cf_net(train_imagenet, named, nplanes_init=4, nplanes_addh=2,
                                exit_width=8))
    assert [sum(isinstance(m, MsdLayer) for m in block) for block in model.blocks] == layers


def test_resnet50_is_torchvisions_with_three_early_exits(train_imagenet):
    single_exit = cf_net(train_imagenet, ['resnet50'], exit_after=[])  # sacred seeds torch
    torch.manual_seed(0)
    model = models.build(single_exit)  # the default's MsdNet keys are dropped
    torch.manual_seed(0)
    reference = torchvision.models.resnet50()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[0], reference.eval()(x), rtol=0, atol=0)
    model = models.build(cf_net(train_imagenet, ['resnet50']))
    costs = flops.exit_costs(model, (3, 224, 224))
    assert len(costs) == 4 and costs[-1]['params'] == 25_557_032
    assert round(costs[-1]['macs'] / 1e9, 2) == 4.09
