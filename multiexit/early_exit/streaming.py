"""Streaming (throughput) early exit: a queue of pending images in front of every block; a block
runs when its queue holds a full batch, so the time per image follows the MACs it needs.

Queue k holds block k's pending inputs (queue 0: the images) as ring buffers on the device, with
each image's position in the stream. A step of block k takes the oldest ``size`` entries of queue
k, runs block k and exit head k, writes the prediction, exit and confidence of the images that
leave, and appends the others to queue k + 1. All of it runs on the device (a CUDA graph per
block and batch size on a GPU); the queues' lengths live in a device tensor, which the host reads
once per round of steps to plan the next round.
"""
import math

import torch

from .fixed_size import FixedSizeRunner
from .rule import exit_step, step, tree_map

HEAD, LENGTH = 0, 1  # columns of the queue counters: position of the oldest entry, entries


def block_inputs(model, input_size, device):
    """Per block, its step's input for one image (block 0: the image; block k: what step k-1
    leaves, ``rule.step``); call without autograd."""
    state = torch.zeros(1, *input_size, device=device)
    inputs = [state]
    for k in range(len(model.blocks) - 1):
        state, _ = step(model, k, state)
        inputs.append(state)
    return inputs


def default_tail_sizes(batch_size):
    """Batch sizes captured for what is left at the end of a stream: batch/4, batch/16, ..., 1
    (a partial batch runs padded to the smallest that holds it, so padding at most quadruples
    the tail's computation)."""
    sizes, size = {1}, batch_size // 4
    while size > 1:
        sizes.add(size)
        size //= 4
    return sorted(s for s in sizes if s < batch_size)


class _Queue:
    """A ring buffer of ``capacity`` entries and one dump row (index ``capacity``) that receives
    the writes of rows that go nowhere, so that a step never needs a data-dependent shape."""

    def __init__(self, template, capacity, device):
        self.capacity = capacity
        self.state = tree_map(lambda t: torch.zeros(capacity + 1, *t.shape[1:], dtype=t.dtype,
                                                    device=device), template)
        self.ids = torch.zeros(capacity + 1, dtype=torch.int64, device=device)


class StreamingExit(FixedSizeRunner):
    """Early exit over a stream of images, every block at ``batch_size``.

    ``run(x, thresholds)`` returns, per image of ``x``, the prediction, the exit it left at and
    its confidence there (max-softmax), as ``rule.exit_indices`` decides them on the full
    forward pass. Rounds of steps: in each, every block (deepest first) runs on the full batches
    its queue held at the round's start (block 0 on at most ``wave_batches`` of them, which bounds
    every queue at ``(wave_batches + 1) * batch_size`` entries); a block whose queue holds less
    than a batch runs on it once all queues before it are empty (the end of the stream), padded
    on a graph to the smallest of ``tail_sizes`` that holds it (``tail_sizes=None``: at its exact
    size, the default without graphs).

    Host syncs: one per round (the queues' lengths), and the captures. Graphs are captured the
    first time a size is needed; a stream longer than any before allocates its buffers anew
    and captures again.
    """

    def __init__(self, model, batch_size, input_size=(3, 32, 32), wave_batches=None,
                 tail_sizes='auto', graphs=None):
        super().__init__(model, batch_size, graphs)
        b = self.batch_size
        self.wave_batches = wave_batches or max(2, 128 // b)
        if tail_sizes == 'auto':
            tail_sizes = default_tail_sizes(b) if self.graphed else None
        self.tail_sizes = None if tail_sizes is None else sorted(tail_sizes)
        if self.tail_sizes and not 1 <= self.tail_sizes[0] <= self.tail_sizes[-1] <= b:
            raise ValueError(f'tail_sizes must lie in 1..{b} (batch_size), got {tail_sizes}')
        self.input_size = tuple(input_size)
        with self.eval_mode():
            templates = block_inputs(model, self.input_size, self.device)
            self.image_template = templates[0]
            capacity = (self.wave_batches + 1) * b
            self.queues = [None] + [_Queue(t, capacity, self.device) for t in templates[1:]]
            self.counters = torch.zeros(self.n_exits, 2, dtype=torch.int64, device=self.device)
            self.pending = self.counters  # zeros: every queue empty, steps write dump rows only
            self.arange = torch.arange(b, device=self.device)
            self._allocate_stream(b)

    def _allocate_stream(self, n):
        """Queue 0 (the images of a stream of up to ``n``) and the outputs, each with a dump slot
        at index ``n``; the graphs captured for smaller buffers are dropped."""
        self.stream_capacity = n
        self.queues[0] = _Queue(self.image_template, n, self.device)
        self.queues[0].ids = torch.arange(n + 1, device=self.device)
        self.pred = torch.zeros(n + 1, dtype=torch.int64, device=self.device)
        self.exit = torch.zeros_like(self.pred)
        self.conf = torch.zeros(n + 1, dtype=torch.float32, device=self.device)
        self.drop_graphs()

    def _step(self, k, size):
        q, count = self.queues[k], self.counters[k]
        positions = self.arange[:size]
        taken = count[LENGTH].clamp(max=size)  # a full batch, or at the end what is left
        rows = (count[HEAD] + positions) % q.capacity
        valid = positions < taken  # the rest pads the batch to its captured size
        h, conf, pred = exit_step(self.model, k, tree_map(lambda t: t[rows], q.state))
        ids = q.ids[rows]
        last = k == self.n_exits - 1
        leave = valid if last else valid & (conf >= self.thresholds[k])
        out = torch.where(leave, ids, self.stream_capacity)
        self.pred.index_copy_(0, out, pred)
        self.exit.index_fill_(0, out, k)
        self.conf.index_copy_(0, out, conf)
        count[HEAD] = (count[HEAD] + taken) % q.capacity
        count[LENGTH] -= taken
        if last:
            return
        nq, ncount = self.queues[k + 1], self.counters[k + 1]
        stay = valid & ~leave
        dest = (ncount[HEAD] + ncount[LENGTH] + stay.cumsum(0) - 1) % nq.capacity
        dest = torch.where(stay, dest, nq.capacity)
        tree_map(lambda store, t: store.index_copy_(0, dest, t), nq.state, h)
        nq.ids.index_copy_(0, dest, ids)
        ncount[LENGTH] += stay.sum()

    def _round(self, lengths):
        """One round of steps planned on the queues' lengths at its start."""
        b = self.batch_size
        for k in reversed(range(self.n_exits)):  # deepest first: what a step appends waits
            n = lengths[k]
            if n >= b:
                for _ in range(n // b if k else min(n // b, self.wave_batches)):
                    self.run_step(k, b)
            elif n and not any(lengths[:k]):
                self.run_step(k, self._tail_size(n))

    def _tail_size(self, n):
        if self.tail_sizes is None:
            return n
        return next((s for s in self.tail_sizes if s >= n), self.batch_size)

    def run(self, x, thresholds):
        """(predictions int64, exit indices int64, confidences float32) per image of ``x``, in
        its order; ``x`` on the model's device (a copy from elsewhere may sync)."""
        n = len(x)
        with self.eval_mode():
            if n > self.stream_capacity:
                self._allocate_stream(n)
            self.set_thresholds(thresholds)
            self.queues[0].state[:n].copy_(x)
            for out in (self.pred, self.exit):
                out.fill_(-1)  # an image that never left would show
            self.counters.zero_()
            self.counters[0, LENGTH] = n
            lengths = [n] + [0] * (self.n_exits - 1)
            while any(lengths):
                self._round(lengths)
                # host sync, once per round: how many images each queue holds is decided on
                # the device, and the next round's plan needs it
                lengths = self.host_value(self.counters[:, LENGTH])
            return self.pred[:n].clone(), self.exit[:n].clone(), self.conf[:n].clone()

    def rounds_bound(self, n):
        """At most this many rounds (host syncs) for a stream of ``n`` images: the stream in
        rounds of ``wave_batches`` batches, the depth of the pipeline, and up to two rounds per
        block for the end of the stream."""
        return math.ceil(n / (self.wave_batches * self.batch_size)) + 3 * self.n_exits
