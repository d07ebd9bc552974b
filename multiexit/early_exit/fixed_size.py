"""Fixed-shape early-exit steps (block k and exit head k on a batch of a fixed size, and the
decision of which images leave), replayed as CUDA graphs on a GPU and run eagerly elsewhere.

A step reads and writes only tensors that outlive it (queues, counters, outputs, thresholds),
so a graph captured once replays it for any images and thresholds. What the host has to read
back (queue lengths, whether to go on) goes through ``FixedSizeRunner.host_value``, which counts
the syncs.
"""
import contextlib
import time

import torch

from ..accel.cuda_graph import CaptureFailed, CudaGraphs, warn_eager
from .rule import checked_thresholds


class FixedSizeRunner:
    """What the streaming and latency runners share: the model in eval mode, thresholds in a
    device tensor read by the steps, steps of fixed sizes captured lazily (all blocks of a size
    at once, inside ``sandbox``) and the count of host syncs. The graphs of a runner
    (``accel.cuda_graph.CudaGraphs``, or ``graphs``, a stand-in for tests) share one memory
    pool: they replay one after another, and the runner keeps only their outputs referenced.

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

    def drop_graphs(self):
        """Forget the captured steps (their buffers are replaced); the next captures start a
        new memory pool."""
        self.replays = {}
        if self.graphs is not None:
            self.graphs.new_pool()

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
                    self.replays[(k, size)], _ = self.graphs.capture(step)
                    self.captures += 1
            except CaptureFailed as e:
                warn_eager('an early-exit step', e, 'running it eagerly')
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
