"""BatchNorm2d without a kernel per training step for its step counter."""
import torch
from torch import nn
from torch.nn import functional as F


class BatchNorm2d(nn.BatchNorm2d):
    """torch's BatchNorm2d, except that in training with a fixed ``momentum`` (ours: 0.1) it
    leaves ``num_batches_tracked`` to ``count_batches``, called once per epoch for all of them.

    torch adds 1 to the counter in every training forward pass: one kernel per BatchNorm per
    step (263 in the paper's MsdNet, a tenth of a step's kernels) for a number that only
    ``momentum=None`` (a cumulative average) reads; with ``momentum=None`` this counts per pass
    as torch does. The state dict is torch's, counter included, so snapshots of the original
    code and of torch's BatchNorm2d load into it, and its snapshots load into them.
    """

    def forward(self, x):
        if not (self.training and self.track_running_stats and self.momentum is not None):
            return super().forward(x)
        self._check_input_dim(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            True, self.momentum, self.eps)


def count_batches(model, n):
    """Add ``n`` training batches to the counters of ``model``'s BatchNorm2d layers that
    leave them aside, so that ``num_batches_tracked`` is what torch's BatchNorm2d would hold:
    not those whose weights a training regime froze (``train.regime``), which it keeps in eval
    mode (a flag that a replayed CUDA graph does not set again, unlike ``requires_grad``)."""
    counters = [m.num_batches_tracked for m in model.modules()
                if isinstance(m, BatchNorm2d) and m.track_running_stats and m.momentum is not None
                and (m.weight is None or m.weight.requires_grad)]
    if counters and n:
        torch._foreach_add_(counters, n)  # one kernel per chunk of counters on CUDA
