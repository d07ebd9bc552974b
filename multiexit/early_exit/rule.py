"""The early-exit rule, one for every way of running it: a sample leaves at the first exit k
whose max-softmax reaches ``thresholds[k]``; the last exit takes the rest. ``exit_indices``
decides it on the full forward pass's confidences (a simulation); ``exit_step`` runs one block
and its exit head, as the runners (shrinking, streaming, latency) do.

Uses the model contract of ``multiexit.models``: ``h = model.blocks[k](h)`` and
``model.exits[k](model.exit_features(h))``.
"""
import torch


def confidences(logits):
    """(max-softmax, argmax) over the classes (last dimension): (exits, N) from (exits, N, C)."""
    return torch.softmax(logits.float(), dim=-1).max(dim=-1)


def exit_indices(conf, thresholds):
    """Exit of each sample: the first k with ``conf[k] >= thresholds[k]``, else the last."""
    stays = conf < torch.as_tensor(thresholds, dtype=conf.dtype, device=conf.device)[:, None]
    stays[-1] = False
    return stays.int().cumprod(dim=0).sum(dim=0)


def checked_thresholds(model, thresholds):
    """``thresholds`` as float32 on the CPU, the precision in which ``exit_indices`` compares
    them, whatever precision compares them here."""
    n_exits = len(model.exits)
    if len(thresholds) != n_exits:
        raise ValueError(f'{len(thresholds)} thresholds for {n_exits} exits')
    return torch.as_tensor(thresholds, dtype=torch.float32).cpu()


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
