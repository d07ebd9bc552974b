"""The early-exit rule, one for every way of running it: a sample leaves at the first exit k
whose max-softmax reaches ``thresholds[k]``; the last exit takes the rest. ``exit_indices``
decides it on the full forward pass's confidences (a simulation); ``exit_step`` runs one block
and its exit head, as the runners (shrinking, streaming, latency) do.

Uses the model contract of ``multiexit.models``: ``h = model.blocks[k](h)`` and
``model.exits[k](model.exit_features(h))``, or the model's ``exit_step`` where its exits
combine the earlier exits' logits (boosted exits: the state carries their running ensemble, and
an image leaves on the boosted logits' confidence, as the full forward pass decides).
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


def step(model, k, state):
    """(the state that step k + 1 reads, exit k's logits) from ``state``, step k's input: block
    k's input (the image for k = 0), or what the model's own ``exit_step`` carries (a model
    whose exits combine the earlier exits' logits, ``models.boosted``)."""
    if hasattr(model, 'exit_step'):
        return model.exit_step(k, state)
    h = model.blocks[k](state)
    return h, model.exits[k](model.exit_features(h))


def exit_step(model, k, state):
    """(the state after step k, confidence and prediction of exit k) for step k's input
    ``state`` (``step``)."""
    state, logits = step(model, k, state)
    conf, pred = confidences(logits)
    return state, conf, pred
