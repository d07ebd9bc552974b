"""MSDNet (Huang et al. 2018) as configured in the original multiexit-distillation code.

The module tree mirrors the original one so that its snapshots (parameter names such as
``blocks.0.0.mods.0.0.weight``) load without renaming, and modules are constructed in the same
order so that ``torch.manual_seed(s)`` before construction gives the same initial weights.
"""
import math

import numpy as np
from torch import nn

from ..accel import streams
from .base import MultiExitNet, cat_channels
from .batchnorm import BatchNorm2d
from .equilibrium import rescale_gradient


def conv_bn_relu(n_in, n_out, kernel_size, stride=1, padding=0):
    # The conv keeps its bias, as in the original (8,018 redundant parameters in the paper model).
    return nn.Sequential(
        nn.Conv2d(int(n_in), int(n_out), kernel_size, stride, padding),
        BatchNorm2d(int(n_out)),
        nn.ReLU(),
    )


class MsdJoinConv(nn.Module):
    """New features of one scale: from the same scale, and (strided) from the finer scale."""
    members = 1  # models folded into the channels (multiexit.models.fused): the concatenation is each's

    def __init__(self, n_in, n_in_down, n_out, btneck, btneck_down):
        super().__init__()
        if n_in_down:
            if n_out % 2:
                raise ValueError(f'MsdNet: {n_out} new channels cannot be split between two paths')
            n_out //= 2
            self.conv_down = self._conv(n_in_down, n_out, stride=2, btneck=btneck_down)
        self.conv = self._conv(n_in, n_out, stride=1, btneck=btneck)

    @staticmethod
    def _conv(n_in, n_out, stride, btneck):
        if not btneck:
            return conv_bn_relu(n_in, n_out, 3, stride=stride, padding=1)
        n_mid = min(n_in, btneck * n_out)
        return nn.Sequential(conv_bn_relu(n_in, n_mid, 1),
                             conv_bn_relu(n_mid, n_out, 3, stride=stride, padding=1))

    def paths(self, x, x_finer):
        """(module, input) of each new-feature path: independent of each other."""
        return [(self.conv, x)] + ([(self.conv_down, x_finer)] if x_finer is not None else [])

    def forward(self, x, x_finer):
        return cat_channels([x] + [conv(v) for conv, v in self.paths(x, x_finer)], self.members)


class MsdLayer0(nn.Module):
    """The stem: the input image at every scale."""

    def __init__(self, nplanes, in_shape):
        super().__init__()
        self.mods = nn.ModuleList()
        if in_shape == 32:
            self.mods.append(conv_bn_relu(3, nplanes[0], 3, padding=1))
        elif in_shape == 224:
            self.mods.append(nn.Sequential(conv_bn_relu(3, nplanes[0], 7, stride=2, padding=3),
                                           nn.MaxPool2d(kernel_size=3, stride=2, padding=1)))
        else:
            raise ValueError(f'MsdNet: in_shape must be 32 or 224, got {in_shape}')
        for n_in, n_out in zip(nplanes[:-1], nplanes[1:]):
            self.mods.append(conv_bn_relu(n_in, n_out, 3, stride=2, padding=1))

    def forward(self, x):
        out = []
        for mod in self.mods:
            x = mod(x)
            out.append(x)
        return out


class MsdLayer(nn.Module):
    """One dense layer at every scale; a scale whose output width is 0 is pruned (None)."""
    members = 1  # models folded into the channels (multiexit.models.fused): the concatenation is each's

    def __init__(self, nplanes_tab, btneck_widths):
        super().__init__()
        btneck_widths = list(btneck_widths) or [None] * len(nplanes_tab)
        self.mods = nn.ModuleList()
        for i, (n_in, n_out) in enumerate(nplanes_tab):
            if not n_out:
                self.mods.append(None)
                continue
            n_in_finer = nplanes_tab[i - 1, 0] if i else 0
            btneck_finer = btneck_widths[i - 1] if i else None
            self.mods.append(MsdJoinConv(n_in, n_in_finer, n_out - n_in,
                                         btneck_widths[i], btneck_finer))

    def forward(self, xs):
        # The paths of all scales are independent: parallel branches (multiexit.accel.streams), joined
        # before each scale concatenates its input and its new features.
        live = [(i, mod.paths(xs[i], xs[i - 1] if i else None))
                for i, mod in enumerate(self.mods) if mod is not None]
        new = iter(streams.branches([path for _, paths in live for path in paths]))
        out = [None] * len(self.mods)
        for i, paths in live:
            out[i] = cat_channels([xs[i]] + [next(new) for _ in paths], self.members)
        return out


class MsdTransition(nn.Module):
    """1x1 convs that reduce the width of every scale."""

    def __init__(self, nplanes_tab):
        super().__init__()
        self.conv = nn.ModuleList([conv_bn_relu(n_in, n_out, 1) if n_in else None
                                   for n_in, n_out in nplanes_tab])

    def forward(self, xs):
        live = [i for i, mod in enumerate(self.conv) if mod is not None]
        out = [None] * len(xs)
        for i, y in zip(live, streams.branches([(self.conv[i], xs[i]) for i in live])):
            out[i] = y
        return out


def exit_head(n_in, n_classes, width):
    return nn.Sequential(
        conv_bn_relu(n_in, width, 3, stride=2, padding=1),
        conv_bn_relu(width, width, 3, stride=2, padding=1),
        nn.AvgPool2d(kernel_size=2),
        nn.Flatten(),
        nn.Linear(width, n_classes),
    )


def _reduce_layers(n_scales, n_layers, prune, plane_reduction):
    """Layers after which a transition halves the width."""
    if not plane_reduction:
        return []
    if prune == 'min':
        if n_layers < 4:  # the first transition would come before the first layer
            raise ValueError(f'MsdNet: plane_reduction with {n_layers} layers; it needs at least 4 '
                             '(1 + nlayers_to_exit + nlayers_between_exits * (n_exits - 1))')
        return [math.floor((n_layers - 1) / 3), math.floor((n_layers - 1) * 2 / 3)]
    if prune == 'max':
        interval = math.ceil((n_layers - 1) / n_scales)
        return list(range(interval + 1, n_layers, interval))
    raise ValueError(f"MsdNet: plane_reduction needs prune='min' or 'max', got prune={prune!r}")


def _nprune_per_layer(n_scales, n_layers, prune):
    """Number of finest scales dropped at each layer."""
    if prune == 'min':
        return list(np.maximum(0, min(n_scales, n_layers) - np.arange(n_layers, 0, -1)))
    if prune == 'max':
        interval = math.ceil((n_layers - 1) / n_scales)
        return [0] + [i // interval for i in range(n_layers - 1)]
    return [0] * n_layers


def nplanes_table(n_scales, n_layers, nplanes_init, nplanes_mulv, nplanes_addh, prune,
                  plane_reduction):
    """Channels per (scale, column); a column is a layer or a transition."""
    reduce_at = _reduce_layers(n_scales, n_layers, prune, plane_reduction)
    nprune_per_layer = _nprune_per_layer(n_scales, n_layers, prune)
    base, nprune = [nplanes_init], [0]
    for i in range(1, n_layers):
        base.append(base[-1] + nplanes_addh)
        nprune.append(nprune_per_layer[i])
        if i in reduce_at:
            base.append(math.floor(base[-1] * plane_reduction))
            nprune.append(nprune_per_layer[i])
    tab = np.outer(nplanes_mulv, base)
    for col, n in enumerate(nprune):
        tab[:n, col] = 0
    return tab


def block_boundaries(block_nlayers, n_scales, prune, plane_reduction):
    """Column index at which each block ends, transitions counted as columns."""
    n_layers = 1 + sum(block_nlayers)
    sep = np.cumsum([1] + list(block_nlayers))
    shift = np.zeros_like(sep)
    for layer in _reduce_layers(n_scales, n_layers, prune, plane_reduction):
        shift += sep >= layer
    return sep + shift


class MsdNet(MultiExitNet):
    """Multi-scale dense network; ``forward`` returns one logits tensor per exit.

    Keyword arguments are those of the original ``cf_net``, and ``gradient_equilibrium``: train
    with Li et al.'s Gradient Equilibrium (``forward``). Exit ``k`` reads the coarsest scale
    after ``blocks[k]``.
    """

    def __init__(self, in_shape=32, out_dim=100, n_scales=3, n_exits=11, nlayers_to_exit=4,
                 nlayers_between_exits=2, nplanes_mulv=(6, 12, 24), nplanes_addh=1,
                 nplanes_init=1, prune='min', plane_reduction=0.5, exit_width=128,
                 btneck_widths=(4, 4, 4), gradient_equilibrium=False):
        super().__init__()
        if nlayers_to_exit < nlayers_between_exits:
            raise ValueError('MsdNet: nlayers_to_exit must be >= nlayers_between_exits')
        if len(nplanes_mulv) != n_scales:
            raise ValueError(f'MsdNet: nplanes_mulv needs {n_scales} entries (n_scales), '
                             f'got {len(nplanes_mulv)}')
        coarsest = in_shape // (2 ** (n_scales - 1)) // (4 if in_shape == 224 else 1)
        if -(-coarsest // 4) // 2 != 1:  # two stride-2 convs, then AvgPool2d(2), must give 1x1
            raise ValueError(f'MsdNet: the exit heads need the coarsest scale between 5x5 and '
                             f'12x12, but in_shape={in_shape} with n_scales={n_scales} gives '
                             f'{coarsest}x{coarsest} (use n_scales=3 for 32, 4 for 224)')
        self.n_exits, self.in_shape = n_exits, in_shape
        if not isinstance(gradient_equilibrium, bool):
            raise ValueError(f'MsdNet: gradient_equilibrium must be True or False, got '
                             f'{gradient_equilibrium!r}')
        self.gradient_equilibrium = gradient_equilibrium
        block_nlayers = [nlayers_to_exit] + [nlayers_between_exits] * (n_exits - 1)
        n_layers = 1 + sum(block_nlayers)
        tab = nplanes_table(n_scales, n_layers, nplanes_init, nplanes_mulv, nplanes_addh,
                            prune, plane_reduction)
        sep = block_boundaries(block_nlayers, n_scales, prune, plane_reduction)
        self.blocks = nn.ModuleList()
        self.exits = nn.ModuleList()
        # Interleaved construction (block 0, exit 0, block 1, ...) reproduces the original's
        # default-init RNG stream; init_weights then visits all blocks before all exits.
        for i in range(n_exits):
            self.blocks.append(self._block(tab[:, sep[i] - 1:sep[i + 1]],
                                           in_shape if i == 0 else 0, btneck_widths))
            width = exit_width or tab[-1, sep[i + 1] - 1]
            self.exits.append(exit_head(tab[-1, sep[i + 1] - 1], out_dim, width))
        self.init_weights()

    @staticmethod
    def _block(tab, stem_size, btneck_widths):
        layers = [MsdLayer0(tab[:, 0], stem_size)] if stem_size else []
        for i in range(1, tab.shape[1]):
            grows = tab[-1, i - 1] < tab[-1, i]
            layers.append(MsdLayer(tab[:, i - 1:i + 1], btneck_widths) if grows
                          else MsdTransition(tab[:, i - 1:i + 1]))
        return nn.Sequential(*layers)

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0.0, math.sqrt(2 / fan_out))
                m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1.0)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    @staticmethod
    def exit_features(h):
        """What an exit head reads of a block's output: the coarsest scale."""
        return h[-1]

    def forward(self, x):
        """Every exit's logits. With Gradient Equilibrium the values are the same, and the
        gradient of the coarsest scale after block i (of n) is 1/(n-i) times the sum of exit i's
        and n-i-1 times the later blocks' (finer scales keep theirs): as MSDNet.forward of
        kalviny/IMTA, models/msdnet_ge.py, at a9378373241c3247db01f826e3cd8025702fa54b, which
        rescales x[-1] by 1/(nBlocks-i) before classifier i and by nBlocks-i-1 after it."""
        if not self.gradient_equilibrium:
            return super().forward(x)
        logits, n = [], len(self.blocks)
        for i, (block, head) in enumerate(zip(self.blocks, self.exits)):
            x = list(block(x))
            x[-1] = rescale_gradient(x[-1], 1.0 / (n - i))
            logits.append(streams.aside(head, self.exit_features(x)))
            if i + 1 < n:  # the authors' scale 0 after the last exit reaches nothing
                x[-1] = rescale_gradient(x[-1], n - i - 1)
        return streams.join(logits)
