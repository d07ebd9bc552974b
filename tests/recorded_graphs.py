"""A CPU stand-in for CUDA graphs (``accel.cuda_graph.CudaGraphs``), so that the CPU tests run
every captured function through capture and replay; and a module that cannot be captured."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from multiexit.accel.cuda_graph import CaptureFailed

# Ops a CUDA graph cannot capture: they need the host to read the device, or an output shape
# that depends on the data.
SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
           torch.ops.aten.masked_select.default, torch.ops.aten.unique_consecutive.default,
           torch.ops.aten._unique2.default}


def is_view(func, args, kwargs, out):
    """Whether the op returned a view of an input (``to`` may, or may copy)."""
    storage = lambda t: t.untyped_storage().data_ptr()
    inputs = {storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    return func.is_view and all(storage(t) in inputs for t in tree_flatten(out)[0]
                                if isinstance(t, torch.Tensor))


class _Recorder(TorchDispatchMode):
    """Records the ops that run, fails on any a graph cannot hold, and keeps a copy of every
    tensor an op reads or writes before the first (``undo`` puts them back). Every tensor, not
    those the schemas mark as written: native_batch_norm's do not mark the running statistics
    that it updates."""

    def __init__(self):
        super().__init__()
        self.ops, self.saved, self._seen = [], [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        masked = func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default) and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in SYNCING or masked:
            raise CaptureFailed(f'{func} needs a host sync or a data-dependent shape')
        for t in tree_flatten((args, kwargs))[0]:
            if (isinstance(t, torch.Tensor) and id(t) not in self._seen
                    and torch._debug_has_internal_overlap(t) != 1):  # expanded: never written
                self._seen.add(id(t))
                self.saved.append((t, t.clone()))
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def undo(self):
        with torch.no_grad():
            for t, before in reversed(self.saved):
                t.copy_(before)


class RecordedGraphs:
    """A CPU stand-in for ``accel.cuda_graph.CudaGraphs``. A capture records the aten ops of a
    step (and fails on any that a CUDA graph cannot hold), then undoes what they wrote, as
    nothing runs during a real capture; a replay runs those ops again on the same tensors and
    leaves each result where the capture's result lies, as a graph replays its kernels on fixed
    memory. The step's Python code does not run again, so what it computed on the host at
    capture (a size, a buffer, a learning rate) is frozen, as in a graph."""

    def __init__(self):
        self.warm_ups = self.replays = self.pools = 0

    def new_pool(self):
        self.pools += 1

    def warm_up(self, steps):
        self.warm_ups += len(steps)
        return [step() for step in steps]

    def capture(self, step):
        recorder = _Recorder()
        try:
            with recorder:
                captured = step()
        finally:
            recorder.undo()
        ops = [op for op in recorder.ops if not is_view(*op)]  # a view stays one in place

        def replay():
            self.replays += 1
            with torch.no_grad():  # the ops as kernels: below autograd
                for func, args, kwargs, out in ops:
                    result = func(*args, **kwargs)
                    for static, new in zip(tree_flatten(out)[0], tree_flatten(result)[0]):
                        if isinstance(static, torch.Tensor) and static is not new:
                            static.copy_(new)
        return replay, captured


class SyncsInForward(torch.nn.Module):
    """``module`` (whose output is a list), with a host sync: not capturable."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        out = self.module(x)
        if out[-1].sum().item() > 1e30:
            raise AssertionError
        return out
