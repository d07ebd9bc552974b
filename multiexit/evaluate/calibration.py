"""Post-hoc temperature scaling per exit (Guo et al., "On Calibration of Modern Neural
Networks", ICML 2017): one temperature T_k per exit, fitted on held-out logits to minimise the
NLL of softmax(z / T_k). Dividing by T_k > 0 keeps every argmax, so accuracy is unchanged.

The fit follows the authors' code, ``gpleiss/temperature_scaling``, temperature_scaling.py,
``ModelWithTemperature.set_temperature`` at commit ce1154ec7d5235eee046f28875c3dd8421f11d45:
T starts at 1.5, and L-BFGS with lr=0.01 and max_iter=200 (50 before their commit e888e9e,
raised "for convergence") minimises the mean cross-entropy of the float32 logits divided by T,
in one ``step``. Their small lr makes each step a hundredth of L-BFGS's, so T may stop short of
the optimum when it lies far from 1.5; kept, as theirs (their fitted values are in
tests/data/temperature_scaling_reference.json). Here each exit gets its own fit, unlabelled
examples (IGNORE) are left out of the NLL, and the logits are taken as given (no forward pass).
"""
import torch
from torch.nn import functional as F

from ..losses import IGNORE

INITIAL_T, LR, MAX_ITER = 1.5, 0.01, 200


def fit_temperature(logits, labels):
    """The temperature (a float) of one exit's ``logits`` (N, C) on ``labels`` (N,)."""
    # copies: autograd refuses the inference-mode tensors of ``passes.exit_logits``
    logits, labels = logits.detach().float().clone(), labels.clone()
    temperature = torch.full((), INITIAL_T, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([temperature], lr=LR, max_iter=MAX_ITER)

    def nll():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / temperature, labels, ignore_index=IGNORE)
        loss.backward()
        return loss

    optimizer.step(nll)
    fitted = temperature.item()
    if not fitted > 0:  # a T <= 0 would reverse or void the ranking: never report it
        raise ValueError(f'temperature scaling diverged to T={fitted}')
    return fitted


def fit_temperatures(logits, labels):
    """One temperature per exit of ``logits`` (exits, N, C), fitted independently."""
    return [fit_temperature(z, labels) for z in logits]


def scaled(logits, temperatures):
    """``logits`` (exits, N, C) with exit k divided by ``temperatures[k]``."""
    t = torch.tensor(temperatures, dtype=logits.dtype, device=logits.device)
    return logits / t[:, None, None]
