"""Latency early exit: one image (or a small fixed batch) at a time, block after block, until
every image of the batch has left.

Each step (block k, exit head k, the decision) is a CUDA graph on a GPU that reads the previous
step's output where that step left it; after each step the host reads one flag, whether an image
of the batch goes on, and stops there if none does.
"""
import torch

from .fixed_size import FixedSizeRunner
from .rule import exit_step


class LatencyExit(FixedSizeRunner):
    """Early exit of ``batch_size`` images at a time (1: one image).

    ``run(x, thresholds)`` returns, per image of ``x``, the prediction, the exit it left at and
    its confidence there, as ``rule.exit_indices`` decides them on the full forward pass.
    The images of a batch run together until the last has left (one that has left is still
    computed, masked, while another goes on). Host syncs: one per block run but the last (whether
    to go on), and the captures.
    """

    def __init__(self, model, batch_size=1, input_size=(3, 32, 32), graphs=None):
        super().__init__(model, batch_size, graphs)
        b, device = self.batch_size, self.device
        self.h = [None] * self.n_exits  # block outputs, where the next step reads them
        with self.eval_mode():
            self.x = torch.zeros(b, *input_size, device=device)
            self.active = torch.zeros(b, dtype=torch.bool, device=device)  # not left yet
            self.pending = self.active  # zeros: steps decide nothing
            self.pred = torch.zeros(b, dtype=torch.int64, device=device)
            self.exit = torch.zeros_like(self.pred)
            self.conf = torch.zeros(b, dtype=torch.float32, device=device)
            self.go_on = torch.zeros((), dtype=torch.bool, device=device)
            self.arange = torch.arange(b, device=device)

    def _step(self, k, size):
        h, conf, pred = exit_step(self.model, k, self.h[k - 1] if k else self.x)
        self.h[k] = h
        last = k == self.n_exits - 1
        leave = self.active if last else self.active & (conf >= self.thresholds[k])
        self.pred.copy_(torch.where(leave, pred, self.pred))
        self.exit.masked_fill_(leave, k)
        self.conf.copy_(torch.where(leave, conf, self.conf))
        self.active &= ~leave
        self.go_on.copy_(self.active.any())

    def timed_step(self, k):
        self.run_step(k, self.batch_size)
        self.host_value(self.go_on)

    def run(self, x, thresholds):
        """(predictions int64, exit indices int64, confidences float32) per image of ``x``, in
        its order; ``x`` on the model's device (a copy from elsewhere may sync)."""
        n, b = len(x), self.batch_size
        with self.eval_mode():
            self.set_thresholds(thresholds)
            pred = torch.empty(n, dtype=torch.int64, device=self.device)
            exit_of, conf = torch.empty_like(pred), torch.empty(n, device=self.device)
            for start in range(0, n, b):
                m = min(b, n - start)
                self.x[:m].copy_(x[start:start + m])
                torch.lt(self.arange, m, out=self.active)  # a last, smaller batch is padded
                for k in range(self.n_exits):
                    self.run_step(k, b)
                    # host sync, once per block: whether an image of the batch goes on
                    if k == self.n_exits - 1 or not self.host_value(self.go_on):
                        break
                for out, static in ((pred, self.pred), (exit_of, self.exit), (conf, self.conf)):
                    out[start:start + m] = static[:m]
            return pred, exit_of, conf
