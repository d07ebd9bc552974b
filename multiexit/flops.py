"""Cost per exit (parameters, multiply-accumulates), counted by ``torch.utils.flop_counter``.

What is counted is what FlopCounterMode counts: convolutions and matrix products (Conv2d and
Linear here), without biases, normalisation, activations or pooling; MACs = FLOPs / 2.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode


def _count(module):
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def exit_costs(model, input_size=(3, 32, 32)):
    """Per exit k: ``params`` and ``macs`` of blocks 0..k + head k, and ``macs_all_heads`` of
    blocks 0..k + heads 0..k (what an anytime prediction that evaluates every exit costs).

    Works for any model with ``blocks`` and ``exits`` where exit k reads blocks[k]'s output.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    model.train(was_training)
    per_module = counter.get_flop_counts()
    root = type(model).__name__

    def macs(kind, k):
        return sum(per_module.get(f'{root}.{kind}.{k}', {}).values()) // 2

    out, blocks_macs, heads_macs, blocks_params = [], 0, 0, 0
    for k in range(len(model.exits)):
        blocks_macs += macs('blocks', k)
        heads_macs += macs('exits', k)
        blocks_params += _count(model.blocks[k])
        out.append({'exit': k, 'params': blocks_params + _count(model.exits[k]),
                    'macs': blocks_macs + macs('exits', k),
                    'macs_all_heads': blocks_macs + heads_macs})
    return out
