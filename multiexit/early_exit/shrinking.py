"""Early exit on one batch that shrinks as samples leave (one host sync per block), deciding
as ``rule.exit_indices`` does on the full forward pass's confidences. The other ways of running
the rule keep fixed sizes (``fixed_size``): ``streaming.StreamingExit`` (throughput) and
``latency.LatencyExit`` (one image, or a small fixed batch, at a time).
"""
import torch

from .rule import checked_thresholds, exit_step, tree_map


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
