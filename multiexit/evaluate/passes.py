"""Passes over data with a trained model: its metrics over a loader (eagerly, or its forward
replayed as a CUDA graph), every exit's logits, and loading a snapshot to evaluate."""
import functools

import torch

from .. import models
from ..accel import streams
from ..accel.cuda_graph import GraphedCall
from ..accel.precision import autocast
from ..errors import SnapshotError
from ..metrics import MultiExitAccuracy
from ..train import checkpoint


def logits_of(model, x, amp=False, cuda_streams=False):
    """``model(x)`` with bf16 autocast when ``amp``, its independent branches on parallel CUDA
    streams when ``cuda_streams`` (``multiexit.accel.streams``)."""
    with autocast(x.device, amp), streams.parallel(x.device, cuda_streams):
        return model(x)


class GraphedForward(GraphedCall):
    """``logits_of(model, x)`` in eval mode, replayed as a CUDA graph for batches of one shape
    (``accel.cuda_graph.GraphedCall``).

    The first batch runs eagerly (cuDNN autotuning), the next is captured; later batches of its
    shape are copied into the static input and replayed, other shapes (a last, smaller batch)
    run eagerly. The returned logits are the graph's static outputs: use them before the next
    call. The graph reads the weights and BatchNorm statistics in place, so it stays valid while
    training updates them. A failed capture prints one warning line and leaves the forward pass
    eager. ``cuda_streams``: parallel streams, in the warm-up as in the graph. Off CUDA (without
    ``graphs``, a stand-in for tests) it is the eager forward.
    """

    def __init__(self, model, amp=False, cuda_streams=False, graphs=None):
        super().__init__(functools.partial(logits_of, model, amp=amp, cuda_streams=cuda_streams),
                         'the evaluation forward', 'evaluating eagerly', graphs=graphs)


@torch.inference_mode()
def evaluate(model, loader, n_exits, acc_tops=(1, 5), T=None, progress=None, amp=False,
             forward=None, members=1):
    """Metrics of ``model`` over ``loader``, a list of one dict per member: ``members`` K runs
    fused in ``model`` with their ``loader`` (``train.pack.MemberBatches``), or 1 for a model alone.
    ``T`` (a loss temperature) adds adj_maxprob; ``amp``: bf16 autocast; ``forward``: what
    computes the logits (default: ``model``; a ``GraphedForward`` of it on CUDA). A sharded
    ``loader`` gives every rank the metrics of the whole split (each example counted once)."""
    model.eval()
    metrics = MultiExitAccuracy(n_exits, acc_tops, loader.device, members)
    forward = forward or functools.partial(logits_of, model, amp=amp)
    for x, y in progress(loader) if progress else loader:
        metrics.update(forward(x), y, T)
    if loader.world_size > 1:
        metrics.sum_over_ranks()
    return metrics.compute()  # host sync, once


@torch.inference_mode()
def exit_logits(model, loader, progress=None):
    """(logits (exits, N, classes) float32, labels (N,)) on the CPU, in ``loader``'s order."""
    model.eval()
    logits, labels = [], []
    for x, y in progress(loader) if progress else loader:
        logits.append(torch.stack(model(x)).float())
        labels.append(y)
    return torch.cat(logits, dim=1).cpu(), torch.cat(labels).cpu()  # host sync, once


def load_model(path, device, cf_net_default=None):
    """(model in eval mode, cf_net, checkpoint dict) from a checkpoint file."""
    ckpt = checkpoint.load(path)
    state, cf_net, extra = checkpoint.unpack_model(ckpt, path, cf_net_default)
    model = models.build(cf_net)
    try:
        models.load_original_state_dict(model, state)
    except RuntimeError as e:
        raise SnapshotError(f'{path} does not fit cf_net={dict(cf_net)} (a different '
                            f'architecture?): {str(e).splitlines()[0]}') from None
    return model.to(device).eval(), cf_net, extra
