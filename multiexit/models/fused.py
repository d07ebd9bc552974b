"""K models of one architecture folded into one network, whose every kernel does the K models'
work (horizontal fusion): what lets a pack of runs (``train.pack.PackedRuns``) train them at once.

A step of a small network such as the paper's MsdNet is thousands of small kernels launched one
after another; a GPU runs them no faster for one model than for K. Folded, the K members' channels
sit side by side in one tensor (member k's are the k-th of K equal parts of dim 1), so that:

- a convolution is one convolution with ``groups`` K times the member's (each group sees only its
  member's channels), a BatchNorm one BatchNorm over K times the channels (each channel has its own
  statistics anyway), pooling and ReLU act on every channel as they are;
- a head's ``nn.Linear`` is one batched matrix product (``PackedLinear``), whose output puts the
  members first: every exit's logits are (K, B, classes), as ``train.pack.PackLoss`` and
  ``metrics.MultiExitAccuracy(members=K)`` take them;
- the models' own channel operations (MsdNet's concatenations, the ResNet shortcut's zero
  channels) go through ``models.base.cat_channels`` and ``pad_channels``, which the fusion tells
  the number of members (their ``members`` attribute).

So the number of kernels per step is one model's whatever K, and a member computes exactly what
its model computes alone, up to the order of floating-point sums. Its weights, BatchNorm statistics
and optimizer state are parts of the fused tensors: ``fuse`` stacks them, ``load_members`` (and
``train.pack.optimizer_states_to_members``) copy them back into the members' own models (and
optimizers), which hold what a solo run of that member would (its checkpoints are ordinary state
dicts).
"""
import copy

import torch
from torch import nn

from ..errors import ConfigError

# Modules without weights that act on every channel alike: the fusion leaves them as they are.
CHANNELWISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
               nn.Identity)
# Modules whose own forward code the fusion trusts: containers, and those of the registered
# models (which go through cat_channels and pad_channels), checked against their solo forward by
# the tests of every registered model.
TRUSTED_PACKAGES = ('torch.nn.modules.container', 'multiexit.models', 'torchvision.models')


class PackedLinear(nn.Module):
    """K linear layers as one batched matrix product: (B, K * in) -> (K, B, out). ``weight`` is
    (K, out, in) and ``bias`` (K, out): member k's are nn.Linear's weight and bias."""

    def __init__(self, members, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(members, out_features, **kw)) if bias else None

    def forward(self, x):
        x = x.view(x.shape[0], self.members, self.in_features).transpose(0, 1)  # (K, B, in)
        return _BatchedLinear.apply(x, self.weight, self.bias)


class _BatchedLinear(torch.autograd.Function):
    """x (K, B, in) @ weight (K, out, in)^T + bias (K, out), with the weight's gradient computed
    as nn.Linear's is, grad^T @ x (autograd's own for a batched product would be (x^T @
    grad)^T, whose sums run in another order): a member's update is its solo run's to the bit
    where the other operators are too."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        wt = weight.transpose(1, 2)
        return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias[:, None, :], x, wt)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return (torch.bmm(grad, weight), torch.bmm(grad.transpose(1, 2), x),
                grad.sum(dim=1) if ctx.has_bias else None)


def _fused_module(module, members):
    """The module that does ``members`` copies of ``module``'s work on folded channels (its
    tensors uninitialised, on the meta device), or None if it is left as it is."""
    K, meta = members, dict(device='meta')
    if isinstance(module, nn.Conv2d):
        m = module
        return nn.Conv2d(K * m.in_channels, K * m.out_channels, m.kernel_size, m.stride,
                         m.padding, m.dilation, K * m.groups, m.bias is not None, m.padding_mode,
                         **meta)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, nn.SyncBatchNorm):
        m = module
        return type(m)(K * m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                       **meta)
    if isinstance(module, nn.Linear):
        return PackedLinear(K, module.in_features, module.out_features, module.bias is not None,
                            **meta)
    if isinstance(module, nn.Dropout):
        if module.p:
            raise ConfigError(f'a pack cannot train a network with dropout (p={module.p}): each '
                              'member would draw other masks than its solo run; train it alone')
        return None
    if isinstance(module, CHANNELWISE):
        return None
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if own or not type(module).__module__.startswith(TRUSTED_PACKAGES):
        raise ConfigError(f'a pack cannot fold {type(module).__name__} modules of '
                          f'{type(module).__module__}; train this network alone')
    return None


def stack_members(tensors, like):
    """One tensor of the fused shape of ``like`` from the members' ``tensors`` (all of one
    shape): member k's is the k-th part along dim 0. Where ``like`` has the members' shape (a
    BatchNorm's step counter, an optimizer's step), they share it: member 0's."""
    if like.shape == tensors[0].shape:
        return tensors[0]
    return torch.stack(list(tensors)).view(like.shape)


def member_part(fused, k, shape):
    """Member k's part, of ``shape``, of a tensor that ``stack_members`` made (a view)."""
    if fused.shape == shape:
        return fused
    return fused.view(-1, *shape)[k]


def fuse(models, always=False):
    """One network that computes ``models`` (of one architecture, on one device) at once: its
    input is their inputs concatenated along dim 1, and its every exit returns their logits
    stacked, (K, B, classes). It has their parameter and buffer names, in their order, each
    tensor the stack of theirs (``stack_members``), in contiguous memory. One model is returned
    as it is, unless ``always``."""
    if len(models) == 1 and not always:
        return models[0]
    K = len(models)
    fused = copy.deepcopy(models[0])
    for parent in list(fused.modules()):
        for name, child in list(parent.named_children()):
            new = _fused_module(child, K)
            if new is not None:
                setattr(parent, name, new)
    for module in fused.modules():
        if hasattr(type(module), 'members'):
            module.members = K
    device = next(models[0].parameters()).device
    fused.to_empty(device=device)
    names = [n for n, _ in fused.named_parameters()]
    if names != [n for n, _ in models[0].named_parameters()]:
        raise ConfigError('the fused network does not mirror its members\' parameters')
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        for name, tensor in fused.state_dict().items():
            tensor.copy_(stack_members([s[name] for s in states], tensor))
    return fused


@torch.no_grad()
def load_members(fused, models):
    """Copy every member's part of the fused weights and buffers into its own model."""
    for k, model in enumerate(models):
        own = model.state_dict()
        for name, tensor in fused.state_dict().items():
            own[name].copy_(member_part(tensor, k, own[name].shape))
