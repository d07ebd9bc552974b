"""torchvision's ImageNet ResNets (He et al. 2016) with early exits after their stages."""
from torch import nn

from .base import MultiExitNet
from .batchnorm import BatchNorm2d
from .resnet import conv_head, pool_head

DEPTHS = (18, 34, 50, 101, 152)  # torchvision's resnet<depth>
N_STAGES = 4


class ImageNetResNet(MultiExitNet):
    """torchvision's ResNet-depth (18, 34, 50, 101 or 152) with exit heads after its stages.

    The network is torchvision's own, with its initialisation: ``blocks[0]`` is the stem (7x7
    conv, BN, ReLU, max pool) and the first stages; a block ends after each stage in
    ``exit_after`` (0-based: 0, 1, 2 follow ``layer1``, ``layer2``, ``layer3``), and the last
    block ends with ``layer4``. The last exit is the network's own classifier (global average
    pooling and ``fc``), so ``exit_after=[]`` is exactly torchvision's single-exit network.
    ``head``: the early exits' head, ``'pool'`` (global average pooling and a linear layer, as
    the final classifier) or ``'conv'`` (MSDNet's, with ``head_width`` channels); they are
    initialised as torchvision initialises the network.
    """

    def __init__(self, depth=50, out_dim=1000, exit_after=(0, 1, 2), head='pool', head_width=128):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f'ImageNetResNet: depth must be one of {list(DEPTHS)}, got {depth}')
        exit_after = list(exit_after)
        if exit_after != sorted(set(exit_after)) or not all(
                0 <= i < N_STAGES - 1 for i in exit_after):
            raise ValueError(f'ImageNetResNet: exit_after must be increasing stage indices in '
                             f'0..{N_STAGES - 2} (stage {N_STAGES - 1} ends in the final '
                             f'classifier), got {exit_after}')
        if head not in ('pool', 'conv'):
            raise ValueError(f"ImageNetResNet: head must be 'pool' or 'conv', got {head!r}")
        # imported here: torchvision's import takes ~2.5 s (it loads torch._dynamo), which every
        # script start would pay for a network few runs build
        from torchvision.models import resnet

        net = getattr(resnet, f'resnet{depth}')(num_classes=out_dim, norm_layer=BatchNorm2d)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        stages = [net.layer1, net.layer2, net.layer3, net.layer4]
        expansion = type(net.layer1[0]).expansion
        self.exit_after = exit_after
        self.blocks, self.exits = nn.ModuleList(), nn.ModuleList()
        start = 0
        for end in exit_after:
            self.blocks.append(nn.Sequential(*([stem] if not start else []),
                                             *stages[start:end + 1]))
            n_in = 64 * 2 ** end * expansion
            self.exits.append(conv_head(n_in, out_dim, head_width) if head == 'conv'
                              else pool_head(n_in, out_dim, preact=False))
            start = end + 1
        self.blocks.append(nn.Sequential(*([stem] if not start else []), *stages[start:]))
        self.exits.append(nn.Sequential(net.avgpool, nn.Flatten(), net.fc))
        for m in self.exits[:-1].modules():  # torchvision's initialisation of the network
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
