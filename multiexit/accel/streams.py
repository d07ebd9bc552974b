"""A network's independent branches on parallel CUDA streams (the ``cuda_streams`` switch).

Inside ``parallel(device)``, ``branches`` runs independent calls each on a stream of its own,
forked from the current stream and joined back to it with events, and ``aside`` starts a call
on a side stream that ``join`` later joins back (MsdNet's exit heads, which nothing in the
backbone waits for). Autograd runs each backward op on the stream of its forward op, so the
backward pass gets the same parallelism. Inside a captured CUDA graph the forks and joins are
the graph's edges: its kernels then run concurrently where they may, instead of one after
another. The side streams are created once per device and kept, so the eager warm-up steps
before a capture have initialised them (cuDNN and cuBLAS keep per-stream workspaces).

Outside ``parallel``, for CPU tensors, and while torch.compile traces, the calls simply run one
after another: the same ops in the same order.
"""
import contextlib
import threading

import torch

_active = threading.local()  # .streams: the CudaStreams in use, or None
_per_device = {}  # CUDA ordinal -> CudaStreams


class CudaStreams:
    """The current stream and the kept side streams of one CUDA device. torch.cuda.Stream
    draws from a pool of streams per device: should a side stream be the current one, its
    fork and join do nothing and its branch runs in order, which is still correct."""

    def __init__(self, device):
        self.device = device
        self._side = {}

    def current(self):
        return torch.cuda.current_stream(self.device)

    def side(self, key):
        """The side stream named ``key``, the same one at every call."""
        if key not in self._side:
            self._side[key] = torch.cuda.Stream(self.device)
        return self._side[key]

    @staticmethod
    def use(stream):
        return torch.cuda.stream(stream)

    @staticmethod
    def record(tensors, stream):
        """Tell the caching allocator that ``stream`` uses these tensors too, so that their
        memory is not reused on another stream before ``stream``'s work on them is done."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t.record_stream(stream)


@contextlib.contextmanager
def parallel(device, enabled=True, streams=None):
    """Within this context, ``branches`` and ``aside`` use side streams of ``device`` (CUDA
    only; ``enabled=False`` or a CPU device: no change). ``streams``: an object with
    ``CudaStreams``' methods to use instead (tests)."""
    device = torch.device(device)
    if streams is None and enabled and device.type == 'cuda':
        index = torch.cuda.current_device() if device.index is None else device.index
        if index not in _per_device:
            _per_device[index] = CudaStreams(torch.device('cuda', index))
        streams = _per_device[index]
    previous = getattr(_active, 'streams', None)
    _active.streams = streams if enabled else None
    try:
        yield
    finally:
        _active.streams = previous


def _streams():
    if torch.compiler.is_compiling():  # torch.compile's generated code orders the kernels
        return None
    return getattr(_active, 'streams', None)


def branches(calls, name='branch'):
    """``[fn(*args) for fn, *args in calls]`` for independent calls: within ``parallel``, call
    0 on the current stream and call k on side stream (``name``, k), all forked from the
    current stream and joined back to it. Not to be nested with the same ``name``."""
    s = _streams()
    if s is None or len(calls) < 2:
        return [fn(*args) for fn, *args in calls]
    current = s.current()
    sides = [s.side((name, k)) for k in range(1, len(calls))]
    for side in sides:
        side.wait_stream(current)  # fork: the inputs are ready
    fn, *args = calls[0]
    out = [fn(*args)]
    for side, (fn, *args) in zip(sides, calls[1:]):
        with s.use(side):
            out.append(fn(*args))
        s.record(args, side)
    for side, result in zip(sides, out[1:]):
        current.wait_stream(side)  # join
        s.record([result], current)
    return out


def aside(fn, *args, name='exits'):
    """``fn(*args)``; within ``parallel``, on side stream ``name``, forked from the current
    stream now. Its result may be used on the current stream only after ``join(name)``."""
    s = _streams()
    if s is None:
        return fn(*args)
    side = s.side(name)
    side.wait_stream(s.current())
    with s.use(side):
        out = fn(*args)
    s.record(args, side)
    return out


def join(results, name='exits'):
    """``results`` (of ``aside(..., name=name)``), made safe to use on the current stream."""
    s = _streams()
    if s is not None:
        current = s.current()
        current.wait_stream(s.side(name))
        s.record(results, current)
    return results
