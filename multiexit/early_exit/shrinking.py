"""Early-exit inference: a sample leaves at the first exit k whose max-softmax is >=
``thresholds[k]`` (the last exit takes the rest) and is no longer computed after it. Every way of
running it decides as ``budgeted.exit_indices`` does on the full forward pass's confidences:

- ``early_exit_predict`` (here): one batch that shrinks as samples leave, one host sync per block;
- ``streaming.StreamingExit``: throughput; a queue of pending images in front of every block, which
  only ever runs on full batches (CUDA graphs on a GPU);
- ``latency.LatencyExit``: one image, or a small fixed batch, at a time (CUDA graphs on a GPU).

Uses the model contract of ``multiexit.models``: ``h = model.blocks[k](h)`` and
``model.exits[k](model.exit_features(h))``.
"""
import torch

from .budgeted import confidences


def tree_map(fn, h, *others):
    """``fn`` applied to every tensor of a block's output, a tensor or a list of per-scale tensors
    in which a pruned scale is None (MsdNet), with the matching parts of ``others``."""
    if h is None:
        return None
    if isinstance(h, (list, tuple)):
        return type(h)(tree_map(fn, *parts) for parts in zip(h, *others))
    return fn(h, *others)


def exit_step(model, k, h):
    """(block k's output, confidence and prediction of exit k) for block k's input ``h``."""
    h = model.blocks[k](h)
    conf, pred = confidences(model.exits[k](model.exit_features(h)))
    return h, conf, pred


def checked_thresholds(model, thresholds):
    """``thresholds`` as float32 on the CPU, the precision in which ``budgeted.exit_indices``
    compares them, whatever precision compares them here."""
    n_exits = len(model.exits)
    if len(thresholds) != n_exits:
        raise ValueError(f'{len(thresholds)} thresholds for {n_exits} exits')
    return torch.as_tensor(thresholds, dtype=torch.float32).cpu()


@torch.inference_mode()
def early_exit_predict(model, x, thresholds):
    """(predictions, exit index) per sample of ``x``, both int64 on ``x``'s device.

    The model runs in eval mode (restored afterwards): in train mode BatchNorm would mix the
    statistics of whichever samples remain.
    """
    thresholds = checked_thresholds(model, thresholds).tolist()
    n_exits = len(thresholds)
    was_training = model.training
    model.eval()
    try:
        pred = torch.empty(len(x), dtype=torch.int64, device=x.device)
        exit_of = torch.empty_like(pred)
        rows = torch.arange(len(x), device=x.device)  # positions in x of the samples still running
        h = x
        for k in range(n_exits):
            h, conf, p = exit_step(model, k, h)
            last = k == n_exits - 1
            leave = torch.ones_like(p, dtype=torch.bool) if last else conf >= thresholds[k]
            pred[rows[leave]] = p[leave]
            exit_of[rows[leave]] = k
            stay = ~leave
            if not stay.any():  # host sync, once per block
                break
            rows, h = rows[stay], tree_map(lambda t: t[stay], h)
        return pred, exit_of
    finally:
        model.train(was_training)
