"""What every multi-exit model shares: the forward pass over blocks and their exit heads, and the
channel operations that a pack of models folded into one (``multiexit.models.fused``) does per member."""
import torch
import torch.nn.functional as F
from torch import nn

from ..accel import streams


class MultiExitNet(nn.Module):
    """Subclasses fill ``blocks`` and ``exits`` (see the contract in ``multiexit.models``)."""

    @staticmethod
    def exit_features(h):
        """What an exit head reads of a block's output (all of it, unless overridden)."""
        return h

    def forward(self, x):
        logits = []
        for block, head in zip(self.blocks, self.exits):
            x = block(x)
            # nothing in the backbone waits for an exit head: a side stream (multiexit.accel.streams)
            logits.append(streams.aside(head, self.exit_features(x)))
        return streams.join(logits)


def _by_member(x, members):
    """``x`` (B, K*C, H, W) as (B, K, C, H, W), or as (B, H, W, K, C) where its memory is
    channels-last, so that the result of an op on C folds back without a copy: ``fold``."""
    b, kc, h, w = x.shape
    if x.stride(1) != 1 or x.is_contiguous():
        return x.view(b, members, kc // members, h, w), 2, lambda y: y.flatten(1, 2)
    return (x.permute(0, 2, 3, 1).view(b, h, w, members, kc // members), 4,
            lambda y: y.flatten(3, 4).permute(0, 3, 1, 2))


def cat_channels(tensors, members=1):
    """``torch.cat(tensors, dim=1)`` of each member's channels: with K ``members`` folded into
    the channels (member k's are the k-th K-th), the result keeps that layout."""
    if members == 1:
        return torch.cat(tensors, dim=1)
    return _CatMembers.apply(members, *tensors)


class _CatMembers(torch.autograd.Function):
    """One concatenation forward and one split backward: a gradient of each input is a copy
    (its channels are strided in the output's), all made by one operator."""

    @staticmethod
    def forward(ctx, members, *tensors):
        parts = [_by_member(t, members) for t in tensors]
        _, dim, fold = parts[0]
        ctx.members, ctx.sizes = members, [t.shape[1] // members for t in tensors]
        return fold(torch.cat([p for p, _, _ in parts], dim=dim))

    @staticmethod
    def backward(ctx, grad):
        part, dim, fold = _by_member(grad, ctx.members)
        return (None, *map(fold, torch.ops.aten.split_with_sizes_copy(part, ctx.sizes, dim)))


def pad_channels(x, before, after, members=1):
    """``before`` zero channels in front of each member's channels and ``after`` behind them."""
    if members == 1:
        return F.pad(x, (0, 0, 0, 0, before, after))
    part, dim, fold = _by_member(x, members)
    return fold(F.pad(part, (0, 0) * (part.dim() - 1 - dim) + (before, after)))
