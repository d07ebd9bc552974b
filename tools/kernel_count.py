"""How many kernels a training step launches: a dispatch counter (any device, seconds on the
CPU) and the CUDA profiler's count.

A captured CUDA graph removes the host's launch cost but not the GPU's: at MsdNet's size the
GPU runs thousands of small kernels one after another and waits on their latency, so the
number of kernels per step is what the speed work steers by.
"""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate or record without running a kernel (views are recognised by their schema).
NO_KERNEL = frozenset({'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided',
                       '_unsafe_view', 'lift_fresh', 'set_', 'resize_', 'record_stream',
                       '_record_function_enter_new', '_record_function_exit'})


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that reach a device's kernels, below autograd and autocast (so the
    backward pass and autocast's casts are counted), by name in ``counts``. Views and
    allocations are left out: they launch nothing. On CUDA each counted op is one kernel or a
    few (a convolution's backward two or three, a foreach or fused optimizer op one per chunk
    of tensors); ``cuda_kernels`` counts those."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in NO_KERNEL):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn):
    """(total, Counter by op name) of the kernel-launching ops that ``fn()`` dispatches (on the
    calling thread: a CPU backward runs there, a CUDA one on autograd's device threads)."""
    with OpCounter() as counter:
        fn()
    return sum(counter.counts.values()), counter.counts


def cuda_kernels(fn, calls=3):
    """(kernels per call, their GPU ms per call, [(kernel name, calls, ms) per call, most time
    first]) of ``fn()``, from torch.profiler; kernels replayed by a CUDA graph are counted too."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return kernel_table(prof, calls)


def kernel_table(prof, calls):
    """(kernels per call, GPU ms per call, [(name, count per call, ms per call)]) of a profile
    that ran ``calls`` calls."""
    per_name = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            row = per_name[e.name]
            row[0] += 1
            row[1] += e.device_time_total / 1000
    n = sum(r[0] for r in per_name.values()) / calls
    ms = sum(r[1] for r in per_name.values()) / calls
    top = sorted(((name, c / calls, t / calls) for name, (c, t) in per_name.items()),
                 key=lambda r: -r[2])
    return n, ms, top
