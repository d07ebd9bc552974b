"""BatchNorm over the global batch of a torch.distributed job (the ``sync_bn`` switch)."""
import torch
import torch.distributed as dist


def convert(model):
    """``model`` with every BatchNorm2d normalising over all ranks' batches: torch's
    SyncBatchNorm on CUDA; elsewhere (torch's refuses CPU tensors) CrossRankBatchNorm. The
    parameters stay the same objects and the state dict keeps its keys."""
    if next(model.parameters()).device.type == 'cuda':
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _cross_rank(model)


def _cross_rank(module):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, CrossRankBatchNorm.like(child))
        else:
            _cross_rank(child)
    return module


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose gradient is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CrossRankBatchNorm(torch.nn.BatchNorm2d):
    """SyncBatchNorm's semantics in plain differentiable ops: in training, the mean and
    (biased) variance of the batches of every rank, which must all have the same size;
    otherwise BatchNorm2d."""

    @classmethod
    def like(cls, bn):
        device = bn.running_mean.device if bn.track_running_stats else bn.weight.device
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  device=device)
        new.load_state_dict(bn.state_dict())
        if bn.affine:  # the same Parameter objects: an optimizer built earlier still updates them
            new.weight, new.bias = bn.weight, bn.bias
        return new

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        n = x.numel() // c * dist.get_world_size()
        mean = _SumOverRanks.apply(x.sum((0, 2, 3))) / n
        centred = x - mean.view(1, c, 1, 1)
        var = _SumOverRanks.apply(centred.square().sum((0, 2, 3))) / n  # two passes: accurate
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = (self.momentum if self.momentum is not None
                        else 1.0 / float(self.num_batches_tracked))  # host sync, as torch's
            with torch.no_grad():
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * n / max(n - 1, 1), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return out
