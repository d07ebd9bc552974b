"""Fixed-shape early-exit steps (block k and exit head k on a batch of a fixed size, and the
decision of which images leave), replayed as CUDA graphs on a GPU and run eagerly elsewhere.

A step reads and writes only tensors that outlive it (queues, counters, outputs, thresholds),
so a graph captured once replays it for any images and thresholds. What the host has to read
back (queue lengths, whether to go on) goes through ``FixedSizeRunner.host_value``, which counts
the syncs.
"""
import contextlib
import sys
import time

import torch

from .shrinking import checked_thresholds


class CaptureFailed(RuntimeError):
    pass


class CudaGraphs:
    """Warm-up on a side stream and capture of steps into CUDA graphs that share one memory pool:
    they run one after another on one stream, and nothing a graph allocates is read after its
    replay except the outputs its runner keeps referenced, so sharing is safe in any replay
    order."""

    def __init__(self, device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, steps):
        """Runs ``steps`` eagerly on a side stream (lazy initialisation, cuDNN plans)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for step in steps:
                step()
        current.wait_stream(side)

    def capture(self, step):
        """A function that replays ``step`` as captured (nothing runs during the capture)."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):  # host sync (once per capture)
                step()
        except Exception as e:  # noqa: BLE001 - the eager step is still correct
            first = (str(e).strip().splitlines() or [''])[0]
            torch.cuda.synchronize(self.device)
            raise CaptureFailed(f'{type(e).__name__}: {first}') from e
        return graph.replay


class FixedSizeRunner:
    """What the streaming and latency runners share: the model in eval mode, thresholds in a
    device tensor read by the steps, steps of fixed sizes captured lazily (all blocks of a size
    at once, inside ``sandbox``) and the count of host syncs.

    Subclasses define ``_step(k, size)`` (no host sync, no data-dependent shape) and
    ``pending``, a tensor whose zeros leave no image pending (every queue empty, no image
    active), so that a step only computes and decides nothing (see ``sandbox``).
    """

    def __init__(self, model, batch_size, graphs=None):
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        self.model, self.batch_size = model, int(batch_size)
        self.n_exits = len(model.exits)
        self.device = next(model.parameters()).device
        if graphs is None and self.device.type == 'cuda':
            graphs = CudaGraphs(self.device)
        self.graphs = graphs  # None: eager steps
        self.replays = {}  # (block, size) -> replay of its captured step
        self.captures = self.syncs = 0
        with self.eval_mode():
            self.thresholds = torch.zeros(self.n_exits, dtype=torch.float32, device=self.device)

    @property
    def graphed(self):
        """Whether the steps replay as graphs (False: eager, also after a failed capture)."""
        return self.graphs is not None

    def set_thresholds(self, thresholds):
        values = checked_thresholds(self.model, thresholds)
        if self.device.type == 'cuda':
            values = values.pin_memory()  # from pageable memory, the copy may wait for the GPU
        self.thresholds.copy_(values, non_blocking=True)

    def host_value(self, t):
        """``t`` (on the device) as a Python number or list: a host sync, counted."""
        self.syncs += 1
        return t.tolist()

    def run_step(self, k, size):
        if self.graphs is None:
            return self._step(k, size)
        if (k, size) not in self.replays:
            self._capture(size)
            if self.graphs is None:
                return self._step(k, size)
        self.replays[(k, size)]()

    def _capture(self, size):
        steps = [lambda k=k: self._step(k, size) for k in range(self.n_exits)]
        with self.sandbox():
            try:
                self.graphs.warm_up(steps)
                for k, step in enumerate(steps):  # in order: step k may read step k-1's outputs
                    self.replays[(k, size)] = self.graphs.capture(step)
                    self.captures += 1
            except CaptureFailed as e:
                print(f'warning: CUDA graph capture of an early-exit step failed ({e}); '
                      f'running it eagerly', file=sys.stderr, flush=True)
                self.graphs, self.replays = None, {}

    @contextlib.contextmanager
    def sandbox(self):
        """No image pending, restored afterwards: warm-up, capture and timing run there, also
        in the middle of a stream."""
        saved = self.pending.clone()
        self.pending.zero_()
        try:
            yield
        finally:
            self.pending.copy_(saved)

    def _step(self, k, size):
        raise NotImplementedError

    def timed_step(self, k):
        """What one step of block k costs in this mode (overridden where it syncs)."""
        self.run_step(k, self.batch_size)

    @contextlib.contextmanager
    def eval_mode(self):
        """The model in eval mode (restored afterwards; a graph captured in eval mode replays
        eval mode whatever the model's mode is later), without autograd, and outside inference
        mode whatever the caller's: the runner's tensors, updated in place by every step, must
        not become inference tensors."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(False), torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def block_seconds(self, repeats=5):
        """Measured seconds of one step of each block (and its exit head and decision) at the
        runner's batch size: the mean of ``repeats`` after one warm-up (and capture) each."""
        times = []
        with self.eval_mode(), self.sandbox():
            for k in range(self.n_exits):
                self.timed_step(k)  # warm-up, and the capture of every block at this size
            for k in range(self.n_exits):
                synchronize(self.device)
                start = time.perf_counter()
                for _ in range(repeats):
                    self.timed_step(k)
                synchronize(self.device)
                times.append((time.perf_counter() - start) / repeats)
        return times

    def exit_ms(self, repeats=5):
        """Measured milliseconds per image of a prediction at each exit: blocks and heads 0..k
        at the runner's batch size, divided by it."""
        per_image = torch.tensor(self.block_seconds(repeats), dtype=torch.float64)
        return (per_image.cumsum(0) * 1e3 / self.batch_size).tolist()


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
