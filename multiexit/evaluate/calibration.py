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
Their fit can also diverge (an L-BFGS step takes T below 0, seen on a smoke network's exits);
where it does, the NLL's minimum over T in [0.05, 20] is found by a golden-section search on
log T instead, with one warning line, rather than reporting a T <= 0 or stopping the evaluation.
"""
import math
import sys

import torch
from torch.nn import functional as F

from ..losses import IGNORE

INITIAL_T, LR, MAX_ITER = 1.5, 0.01, 200
SEARCHED = (0.05, 20.0)  # where the fallback looks for T, when the authors' fit diverged


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
    if fitted > 0 and math.isfinite(fitted):
        return fitted
    # a T <= 0 would reverse or void the ranking: never report it
    searched = _searched(lambda t: F.cross_entropy(logits / t, labels, ignore_index=IGNORE))
    print(f'warning: temperature scaling diverged (T={fitted:.4g}); T={searched:.4g}, the '
          f'NLL minimum in {list(SEARCHED)}, is used instead', file=sys.stderr, flush=True)
    return searched


def _searched(nll, steps=60):
    """The T in SEARCHED that minimises ``nll(T)``: a golden-section search on log T."""
    lo, hi = map(math.log, SEARCHED)
    ratio = (math.sqrt(5) - 1) / 2
    with torch.no_grad():
        for _ in range(steps):
            a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            if nll(math.exp(a)) <= nll(math.exp(b)):
                hi = b
            else:
                lo = a
    return math.exp((lo + hi) / 2)


def fit_temperatures(logits, labels):
    """One temperature per exit of ``logits`` (exits, N, C), fitted independently."""
    return [fit_temperature(z, labels) for z in logits]


def scaled(logits, temperatures):
    """``logits`` (exits, N, C) with exit k divided by ``temperatures[k]``."""
    t = torch.tensor(temperatures, dtype=logits.dtype, device=logits.device)
    return logits / t[:, None, None]
