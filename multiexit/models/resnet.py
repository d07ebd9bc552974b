"""CIFAR ResNets (He et al. 2016) and Wide ResNets (Zagoruyko & Komodakis 2016) with exit heads.

Both are a 3x3 stem and three stages of residual blocks at 32x32, 16x16 and 8x8. Exit heads read
the output of chosen residual blocks; the last exit is the architecture's own classifier, so with
``exit_after=[]`` a model is exactly the standard single-exit network. By default the exits sit
where Shallow-Deep Networks (Kaya et al. 2019) put their internal classifiers: after the residual
blocks whose cumulative MACs are closest to 15, 30, ..., 90 % of the backbone's.
"""
from functools import partial

from torch import nn
from torch.nn import functional as F

from .base import MultiExitNet, pad_channels
from .batchnorm import BatchNorm2d

SDN_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)
IN_SIZE = 32  # CIFAR; the closed-form MACs that place the default exits are counted at it
STEM_WIDTH = 16


def conv3x3(n_in, n_out, stride=1):
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=False)


def conv_macs(n_in, n_out, kernel_size, size):
    """MACs of a bias-free conv with a size x size output (what FlopCounterMode counts / 2)."""
    return kernel_size ** 2 * n_in * n_out * size ** 2


class BasicBlock(nn.Module):
    """He et al.'s CIFAR block: conv-BN-ReLU-conv-BN, + shortcut, ReLU.

    The shortcut is their option A, used for all their CIFAR ResNets: where the block halves the
    size and doubles the width, the input is subsampled and zero channels are appended, so
    shortcuts add no parameters.
    """
    members = 1  # models folded into the channels (multiexit.models.fused): each gets its zero channels

    def __init__(self, n_in, n_out, stride):
        super().__init__()
        self.n_in, self.n_out, self.stride = n_in, n_out, stride
        self.conv1 = conv3x3(n_in, n_out, stride)
        self.bn1 = BatchNorm2d(n_out)
        self.conv2 = conv3x3(n_out, n_out)
        self.bn2 = BatchNorm2d(n_out)

    def macs(self, size):
        """(MACs, output size) for a size x size input."""
        out = -(-size // self.stride)
        convs = conv_macs(self.n_in, self.n_out, 3, out) + conv_macs(self.n_out, self.n_out, 3, out)
        return convs, out

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, ::self.stride, ::self.stride]
        extra = self.n_out - self.n_in
        if extra:
            shortcut = pad_channels(shortcut, extra // 2, extra - extra // 2, self.members)
        return F.relu(out + shortcut)


class WideBlock(nn.Module):
    """WRN's pre-activation block: BN-ReLU-conv-BN-ReLU-dropout-conv, + shortcut.

    Where width or stride change, a 1x1 conv projects the shortcut; it reads the pre-activated
    input, as in the authors' code.
    """

    def __init__(self, n_in, n_out, stride, dropout):
        super().__init__()
        self.n_in, self.n_out, self.stride = n_in, n_out, stride
        self.bn1 = BatchNorm2d(n_in)
        self.conv1 = conv3x3(n_in, n_out, stride)
        self.bn2 = BatchNorm2d(n_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(n_out, n_out)
        self.projects = n_in != n_out or stride != 1
        if self.projects:
            self.shortcut = nn.Conv2d(n_in, n_out, 1, stride=stride, bias=False)

    def macs(self, size):
        """(MACs, output size) for a size x size input."""
        out = -(-size // self.stride)
        convs = conv_macs(self.n_in, self.n_out, 3, out) + conv_macs(self.n_out, self.n_out, 3, out)
        return convs + (conv_macs(self.n_in, self.n_out, 1, out) if self.projects else 0), out

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(a)))))
        return out + (self.shortcut(a) if self.projects else x)


def pool_head(n_in, n_classes, preact):
    """Global average pooling and a linear layer: the architecture's own classifier. A
    pre-activation network's blocks output unnormalised sums, so its heads start with BN-ReLU."""
    norm = [BatchNorm2d(n_in), nn.ReLU()] if preact else []
    return nn.Sequential(*norm, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(n_in, n_classes))


def conv_head(n_in, n_classes, width):
    """MSDNet's exit head: two stride-2 3x3 conv-BN-ReLU, then global average pooling of what is
    left (2x2 at 8x8 as in MSDNet, 8x8 after a 32x32 block) and a linear layer."""
    return nn.Sequential(
        conv3x3(n_in, width, stride=2), BatchNorm2d(width), nn.ReLU(),
        conv3x3(width, width, stride=2), BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, n_classes),
    )


def residual_stages(make_block, n_per_stage, widths):
    """The residual blocks of three stages; every stage but the first starts with stride 2."""
    blocks, n_in = [], STEM_WIDTH
    for stage, width in enumerate(widths):
        for i in range(n_per_stage):
            blocks.append(make_block(n_in, width, stride=2 if stage and not i else 1))
            n_in = width
    return blocks


def blocks_per_stage(name, depth, extra_layers):
    n, rest = divmod(depth - extra_layers, 6)
    if rest or n < 1:
        raise ValueError(f'{name}: depth must be 6n+{extra_layers} with n >= 1, got {depth}')
    return n


def sdn_exit_after(cumulative_macs, fractions=SDN_FRACTIONS):
    """Indices of the residual blocks whose cumulative MACs are closest to each fraction of the
    total (the earlier block on a tie); repeats and the last block, where the final classifier
    sits, are dropped."""
    total, last = cumulative_macs[-1], len(cumulative_macs) - 1
    picks = {min(range(len(cumulative_macs)), key=lambda i: abs(cumulative_macs[i] - f * total))
             for f in fractions}
    return sorted(picks - {last})


class _ExitResNet(MultiExitNet):
    """A stem and residual blocks cut into ``blocks`` at the exits, with ``exits`` their heads."""

    def _assemble(self, stem, res_blocks, out_dim, exit_after, head, head_width, preact):
        name = type(self).__name__
        size, macs = IN_SIZE, conv_macs(3, STEM_WIDTH, 3, IN_SIZE)
        self.backbone_macs = []  # stem + residual blocks 0..i, closed form, at 32x32
        for block in res_blocks:
            block_macs, size = block.macs(size)
            macs += block_macs
            self.backbone_macs.append(macs)
        last = len(res_blocks) - 1
        exit_after = sdn_exit_after(self.backbone_macs) if exit_after is None else list(exit_after)
        if exit_after != sorted(set(exit_after)) or not all(0 <= i < last for i in exit_after):
            raise ValueError(f'{name}: exit_after must be increasing residual block indices in '
                             f'0..{last - 1} (block {last} ends in the final classifier), '
                             f'got {exit_after}')
        if head not in ('pool', 'conv'):
            raise ValueError(f"{name}: head must be 'pool' or 'conv', got {head!r}")
        self.exit_after = exit_after
        self.blocks, self.exits = nn.ModuleList(), nn.ModuleList()
        start = 0
        for end in exit_after + [last]:
            self.blocks.append(nn.Sequential(*([stem] if not start else []),
                                             *res_blocks[start:end + 1]))
            n_in = res_blocks[end].n_out
            self.exits.append(conv_head(n_in, out_dim, width=head_width)
                              if head == 'conv' and end < last
                              else pool_head(n_in, out_dim, preact=preact))
            start = end + 1
        self.init_weights()

    def init_weights(self):
        # He init for convs, as in the WRN authors' code (He et al. used the same scheme).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)



class ResNet(_ExitResNet):
    """He et al.'s CIFAR ResNet-depth (depth = 6n+2: ResNet-56, ResNet-110) with exit heads.

    exit_after: residual block indices (0..3n-2) followed by an exit; None = the SDN placement.
    head: 'pool' (global average pooling + linear) or 'conv' (MSDNet's head, head_width channels)
    for the early exits; the last exit is always the standard pooling + linear classifier.
    """

    def __init__(self, depth=56, out_dim=100, exit_after=None, head='pool', head_width=128):
        super().__init__()
        n = blocks_per_stage('ResNet', depth, extra_layers=2)
        stem = nn.Sequential(conv3x3(3, STEM_WIDTH), BatchNorm2d(STEM_WIDTH), nn.ReLU())
        res_blocks = residual_stages(BasicBlock, n_per_stage=n, widths=(16, 32, 64))
        self._assemble(stem, res_blocks, out_dim=out_dim, exit_after=exit_after, head=head,
                       head_width=head_width, preact=False)


class WideResNet(_ExitResNet):
    """Zagoruyko & Komodakis' WRN-depth-widen_factor (depth = 6n+4: WRN-28-10) with exit heads.

    dropout: between the two convs of every block. exit_after, head and head_width as for
    ResNet; every pooling head, the last exit's included, is BN-ReLU-pool-linear.
    """

    def __init__(self, depth=28, widen_factor=10, dropout=0.0, out_dim=100, exit_after=None,
                 head='pool', head_width=128):
        super().__init__()
        n = blocks_per_stage('WideResNet', depth, extra_layers=4)
        stem = conv3x3(3, STEM_WIDTH)
        res_blocks = residual_stages(partial(WideBlock, dropout=dropout), n_per_stage=n,
                                     widths=[w * widen_factor for w in (16, 32, 64)])
        self._assemble(stem, res_blocks, out_dim=out_dim, exit_after=exit_after, head=head,
                       head_width=head_width, preact=True)
