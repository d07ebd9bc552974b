"""Counting the operators a piece of code dispatches: on a GPU each one that is not a view
launches at least one kernel, so their number per training step is what a launch-bound step
costs, and it can be counted on the CPU."""
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


# Operators that allocate or reinterpret memory and launch nothing, besides the views.
NO_KERNEL = {'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided',
             '_unsafe_view'}


class KernelCounter(TorchDispatchMode):
    """``with KernelCounter() as ops: ...``: ``ops.total`` is the number of aten operators
    dispatched that launch kernels (not views, not ``NO_KERNEL``), ``ops.by_name`` the number of
    each. An operator that runs others counts once. The backward pass is counted where autograd
    runs it in this thread (on the CPU)."""

    def __init__(self):
        super().__init__()
        self.by_name = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.by_name[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.by_name.values())
