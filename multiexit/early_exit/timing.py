"""Measured time per image of a prediction at each exit, in both early-exit modes, on the
device the model is on (the time counterpart of ``flops.exit_costs``).

The time of an exit is the architecture's, not the weights': two snapshots of one network run
the same kernels. ``PerArchitecture`` times each architecture once, so that snapshots compared in
one figure share one measurement, and a difference between them is never the noise of two.
"""
import json

from .latency import LatencyExit
from .streaming import StreamingExit

LATENCY_BATCH = 1  # one image at a time
TIME_COLUMNS = ('ms_streaming', 'ms_latency')  # the keys of exit_ms


def exit_ms(model, input_size, streaming_batch, repeats=5, latency_batch=LATENCY_BATCH):
    """{'ms_streaming': per exit, 'ms_latency': per exit}: milliseconds per image of blocks and
    heads 0..k, each block timed ``repeats`` times as it runs in that mode: streaming at
    ``streaming_batch`` (the time per image of a stream whose images all leave at exit k), and
    latency at ``latency_batch`` with its host sync per block (one image's latency)."""
    # queues of two batches (the least a stream needs) suffice to time the steps
    runners = (StreamingExit(model, streaming_batch, input_size, wave_batches=1),
               LatencyExit(model, latency_batch, input_size))
    return {name: runner.exit_ms(repeats) for name, runner in zip(TIME_COLUMNS, runners)}


class PerArchitecture:
    """``exit_ms`` of each architecture once: snapshots whose ``cf_net`` (as built) and input
    size are the same share the first one's measurement. ``measured``: {architecture: times}."""

    def __init__(self, streaming_batch, repeats):
        self.streaming_batch, self.repeats = streaming_batch, repeats
        self.measured = {}

    def exit_ms(self, model, cf_net, input_size):
        key = json.dumps([cf_net, list(input_size)], sort_keys=True, default=str)
        if key not in self.measured:
            self.measured[key] = exit_ms(model, input_size, self.streaming_batch, self.repeats)
        return self.measured[key]
