"""Early-exit inference: the network runs block by block and stops computing for the samples
that are confident enough, so the batch shrinks as samples leave.

Uses the model contract of ``multiexit.models``: ``h = model.blocks[k](h)`` and
``model.exits[k](model.exit_features(h))``. Its decisions are those of
``budgeted.exit_indices`` on the full forward pass's confidences, at the same thresholds.
"""
import torch

from .budgeted import confidences


def _rows(h, keep):
    """Rows ``keep`` of a block's output: a tensor, or a list of per-scale tensors in which a
    pruned scale is None (MsdNet)."""
    if h is None:
        return None
    if isinstance(h, (list, tuple)):
        return type(h)(_rows(t, keep) for t in h)
    return h[keep]


@torch.inference_mode()
def early_exit_predict(model, x, thresholds):
    """(predictions, exit index) per sample of ``x``, both int64 on ``x``'s device.

    A sample leaves at the first exit k whose max-softmax is >= ``thresholds[k]`` (the last exit
    takes the rest) and is no longer computed after it. The model runs in eval mode (restored
    afterwards): in train mode BatchNorm would mix the statistics of whichever samples remain.
    """
    n_exits = len(model.exits)
    if len(thresholds) != n_exits:
        raise ValueError(f'{len(thresholds)} thresholds for {n_exits} exits')
    # float32 values, as budgeted.exit_indices compares them, whatever precision compares here
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32).tolist()
    was_training = model.training
    model.eval()
    try:
        pred = torch.empty(len(x), dtype=torch.int64, device=x.device)
        exit_of = torch.empty_like(pred)
        rows = torch.arange(len(x), device=x.device)  # positions in x of the samples still running
        h = x
        for k in range(n_exits):
            h = model.blocks[k](h)
            conf, p = confidences(model.exits[k](model.exit_features(h)))
            last = k == n_exits - 1
            leave = torch.ones_like(p, dtype=torch.bool) if last else conf >= thresholds[k]
            pred[rows[leave]] = p[leave]
            exit_of[rows[leave]] = k
            stay = ~leave
            if not stay.any():
                break
            rows, h = rows[stay], _rows(h, stay)
        return pred, exit_of
    finally:
        model.train(was_training)
