"""Parallel CUDA streams (multiexit.accel.streams), checked on the CPU: the CPU forward is
unchanged, and with recording stand-ins for streams, every op that reads a tensor made on another
stream runs after a wait for it (a vector clock per stream)."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from helpers import TINY
from multiexit import losses, models
from multiexit.accel import streams
from multiexit.train.step import build_step


def tiny(name='MsdNet'):
    torch.manual_seed(0)
    return models.build(TINY[name])


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_the_cpu_training_step_is_the_same_with_streams_on(name):
    """On the CPU ``cuda_streams`` changes nothing: two steps, bit for bit."""
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    states = []
    for on in (False, True):
        torch.manual_seed(1)
        model = tiny(name)
        loss_fn = losses.build(dict(call='ClassificationOnlyLoss', n_exits=len(model.exits)))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step = build_step(model, loss_fn, opt, len(model.exits), (1,), 'cpu',
                                cuda_streams=on)
        step.start_epoch()
        for _ in range(2):
            step(x, y)
        [loss], _, _ = step.finish_epoch()
        states.append((loss, model.state_dict()))
    (loss_off, off), (loss_on, on) = states
    assert loss_on == loss_off
    assert all(torch.equal(off[k], on[k]) for k in off)


class Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.waits(self, other)


class RecordingStreams(TorchDispatchMode):
    """Stands in for CudaStreams on the CPU: tracks which stand-in stream each op runs on and,
    with a vector clock per stream, fails when an op reads a tensor that another stream made
    without having waited for that stream since."""

    def __init__(self):
        super().__init__()
        self.main = Stream('main', self)
        self.stack, self.sides = [self.main], {}
        self.clock = {'main': {'main': 0}}  # stream -> {stream: time seen}
        self.made = WeakIdKeyDictionary()  # tensor -> (stream name, time)
        self.used = set()  # side streams that ran ops
        self.unsafe = []

    def current(self):
        return self.stack[-1]

    def side(self, key):
        if key not in self.sides:
            self.sides[key] = Stream(repr(key), self)
            self.clock[repr(key)] = {repr(key): 0}
        return self.sides[key]

    @contextlib.contextmanager
    def use(self, stream):
        self.stack.append(stream)
        try:
            yield
        finally:
            self.stack.pop()

    @staticmethod
    def record(tensors, stream):
        pass

    def waits(self, waiter, other):
        clock = self.clock[waiter.name]
        for k, t in self.clock[other.name].items():
            clock[k] = max(clock.get(k, 0), t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        here = self.current().name
        clock = self.clock[here]
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)]
        for t in inputs:
            if t in self.made:
                stream, time = self.made[t]
                if clock.get(stream, 0) < time:
                    self.unsafe.append(f'{func} on {here} reads a tensor of {stream}')
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # the data are the input's
            tag = next((self.made[t] for t in inputs if t in self.made), None)
        else:
            clock[here] += 1
            tag = (here, clock[here])
            if here != 'main':
                self.used.add(here)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and tag is not None:
                self.made[t] = tag
        return out


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_branches_fork_from_and_join_to_the_current_stream(name):
    model = tiny(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        recorder = RecordingStreams()
        with streams.parallel('cpu', streams=recorder), recorder:
            forked = model(x)
            joined = [z + 0 for z in forked]  # the caller's ops on the current stream
    assert not recorder.unsafe, recorder.unsafe[:5]
    assert all(torch.equal(a, b) for a, b in zip(plain, joined))
    assert "'exits'" in recorder.used  # the exit heads ran aside
    if name == 'MsdNet':  # the scales of a layer, each path on a stream of its own
        assert {"('branch', 1)", "('branch', 2)", "('branch', 3)"} <= recorder.used
