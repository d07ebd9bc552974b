"""CUDA-graph capture, written once, around plain functions: the training step, the evaluation
forward and the fixed-size early-exit steps are ordinary functions that run eagerly on any
device; on a GPU they are captured and replayed here.

One policy for all of them:
- warm-up: the first calls run eagerly on a side stream (cuDNN autotuning, lazy initialisation,
  torch.compile), as PyTorch's whole-network capture requires;
- memory: the graphs captured together (``CudaGraphs``) share one memory pool; what captures
  them afresh drops the old graphs and starts a new pool (``new_pool``), so that the old
  pool's memory is freed;
- failure: one ``warning:`` line naming what failed, then that function runs eagerly for good
  (the eager function is still correct).

Nothing runs during a capture: the first replay computes the captured call. ``CudaGraphs`` is
what a CPU test replaces by a stand-in with its ``warm_up`` and ``capture``.
"""
import sys

import torch


class CaptureFailed(RuntimeError):
    pass


def warn_eager(what, error, then):
    """The one line printed when the capture of ``what`` failed with ``error``."""
    print(f'warning: CUDA graph capture of {what} failed ({error}); {then}', file=sys.stderr,
          flush=True)


class CudaGraphs:
    """Warm-up on a side stream and capture of functions into CUDA graphs that share one memory
    pool. Sharing is safe when the graphs replay one after another on one stream and nothing a
    graph allocates is read after its replay except the outputs its owner keeps referenced."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.new_pool()

    def new_pool(self):
        """The pool of the graphs captured from now on (call once the old graphs are dropped)."""
        self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, steps):
        """Runs ``steps`` eagerly on a side stream; returns their results."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = [step() for step in steps]
        current.wait_stream(side)
        return out

    def capture(self, step):
        """(replay, outputs): a function that replays ``step`` as captured, and what ``step``
        returned at the capture (tensors that every replay writes). Raises CaptureFailed."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):  # host sync (once per capture)
                out = step()
        except Exception as e:  # noqa: BLE001 - the eager step is still correct
            first = (str(e).strip().splitlines() or [''])[0]
            torch.cuda.synchronize(self.device)
            raise CaptureFailed(f'{type(e).__name__}: {first}') from e
        return graph.replay, out


class GraphedCall:
    """``fn(*inputs)``, replayed as one CUDA graph (``fn`` takes tensors and returns tensors
    or None; it must not sync with the host nor depend on the data for a shape).

    The first ``warmup`` calls run ``fn`` eagerly on a side stream. The next call is captured
    on static copies of its inputs (same memory format) and replayed; later calls copy their
    inputs into them and replay, and return ``fn``'s outputs as captured: static tensors, to use
    before the next call. ``key``: a function whose value is a constant of the captured call
    (a learning rate); when it changes, ``fn`` is captured afresh. Inputs of another shape than
    the captured ones raise ValueError (``other_shapes='raise'``) or run eagerly ('eager').
    A failed capture prints one warning line naming ``what`` and ``then`` (what happens
    instead), and ``fn`` runs eagerly from then on (``eager_only``). ``captures`` counts the
    captures. Off CUDA, without ``graphs`` (a stand-in, for tests), ``fn`` simply runs.
    """

    def __init__(self, fn, what, then, warmup=1, key=None, other_shapes='eager', graphs=None):
        if other_shapes not in ('raise', 'eager'):
            raise ValueError(f"other_shapes must be 'raise' or 'eager', got {other_shapes!r}")
        self.fn, self.what, self.then = fn, what, then
        self.warmup, self.key, self.other_shapes, self.graphs = warmup, key, other_shapes, graphs
        self.replay = self.static_inputs = self.static_out = self.captured_key = None
        self.eager_only = False
        self.captures = 0

    def _key(self):
        return self.key() if self.key else None

    def __call__(self, *inputs):
        if self.graphs is None and not self.eager_only:
            if inputs[0].device.type != 'cuda':
                return self.fn(*inputs)
            self.graphs = CudaGraphs(inputs[0].device)
        if self.eager_only:
            return self.fn(*inputs)
        if self.replay is not None and self.captured_key == self._key():
            shapes = [t.shape for t in self.static_inputs]
            if [t.shape for t in inputs] != shapes:
                if self.other_shapes == 'eager':
                    return self.fn(*inputs)
                raise ValueError(f'{self.what} was captured for inputs of '
                                 f'{[tuple(s) for s in shapes]}, got '
                                 f'{[tuple(t.shape) for t in inputs]}')
            for static, t in zip(self.static_inputs, inputs):
                static.copy_(t)
        elif self.warmup > 0:
            self.warmup -= 1
            return self.graphs.warm_up([lambda: self.fn(*inputs)])[0]
        elif not self._capture(inputs):
            return self.fn(*inputs)
        self.replay()
        return self.static_out

    def _capture(self, inputs):
        """Capture ``fn`` on copies of ``inputs``; False, after the warning, if it failed."""
        self.replay = self.static_out = None  # drops the previous graph
        self.graphs.new_pool()
        self.static_inputs = [t.clone() for t in inputs]
        key = self._key()
        try:
            self.replay, self.static_out = self.graphs.capture(
                lambda: self.fn(*self.static_inputs))
        except CaptureFailed as e:
            warn_eager(self.what, e, self.then)
            self.eager_only, self.static_inputs = True, None
            return False
        self.captured_key = key
        self.captures += 1
        return True
