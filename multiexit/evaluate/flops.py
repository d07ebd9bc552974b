"""Cost per exit (parameters, multiply-accumulates) of one image's forward pass.

What is counted is what ``torch.utils.flop_counter.FlopCounterMode`` counts for these models
(a test checks it for every registered model): convolutions and matrix products (Conv2d and
Linear), without biases, normalisation, activations or pooling; MACs = FLOPs / 2. The count is
taken by forward hooks rather than by FlopCounterMode, whose first use imports torch._dynamo
(~2.5 s added to every start of eval.py).
"""
import torch
from torch import nn


def _layer_macs(module, output):
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    return output.numel() * module.in_features  # nn.Linear


def module_macs(model, x):
    """{qualified name of each Conv2d and Linear: its MACs in ``model(x)``}."""
    macs = {}

    def counter(name):
        def hook(module, inputs, output):
            macs[name] = macs.get(name, 0) + _layer_macs(module, output)
        return hook

    hooks = [module.register_forward_hook(counter(name))
             for name, module in model.named_modules()
             if isinstance(module, (nn.Conv2d, nn.Linear))]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return macs


def _count(module):
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def exit_costs(model, input_size=(3, 32, 32)):
    """Per exit k: ``params`` and ``macs`` of blocks 0..k + head k (heads 0..k where the model's
    exits combine the earlier ones, boosted exits), and ``macs_all_heads`` of blocks 0..k +
    heads 0..k (what an anytime prediction that evaluates every exit costs).

    Works for any model with ``blocks`` and ``exits`` where exit k reads blocks[k]'s output.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    per_layer = module_macs(model, torch.zeros(1, *input_size, device=param.device,
                                                dtype=param.dtype))
    model.train(was_training)

    def macs(kind, k):
        own = f'{kind}.{k}'
        return sum(n for name, n in per_layer.items()
                   if name == own or name.startswith(own + '.'))

    # boosted exits (models.boosted): exit k's prediction is made of heads 0..k
    combined = getattr(model, 'combines_exits', False)
    out, blocks_macs, heads_macs, blocks_params, heads_params = [], 0, 0, 0, 0
    for k in range(len(model.exits)):
        blocks_macs += macs('blocks', k)
        heads_macs += macs('exits', k)
        blocks_params += _count(model.blocks[k])
        heads_params += _count(model.exits[k])
        out.append({'exit': k,
                    'params': blocks_params + (heads_params if combined
                                               else _count(model.exits[k])),
                    'macs': blocks_macs + (heads_macs if combined else macs('exits', k)),
                    'macs_all_heads': blocks_macs + heads_macs})
    return out
