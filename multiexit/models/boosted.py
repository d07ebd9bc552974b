"""Boosted training's prediction rule (Yu et al., "Boosted Dynamic Neural Networks", AAAI 2023):
exit i predicts with the weighted running ensemble of exits 0..i, and learns on top of the
detached ensemble of the exits before it. ``cf_net.boost_reweight`` switches it on for any
registered model (``models.build``), so that training, validation, eval.py, the anytime and
budgeted figures and real early exit all see the boosted logits.

As in SHI-Labs/Boosted-Dynamic-Networks at commit 17995bbfaed78594d8c360e7da852aa72d8a7525,
with o_i exit i's own logits and w_i the reweight of exit i:

- evaluation (``DynamicNet.forward``, models/dynamic_net.py; what eval_cifar100.py and
  adaptive_inference.py predict and decide the exits with): F_0 = o_0,
  F_i = o_i + F_{i-1} * w_i;
- training (``DynamicNet.forward_all`` and the loss of ``train``, train_cifar100.py):
  T_i = o_i + detach(P_{i-1}), with P_{-1} = 0 and P_i = (o_i + P_{i-1}) * w_i, so that the
  summed cross-entropy over the exits (``losses.ClassificationOnlyLoss``) is their loss
  sum_i CE(T_i, y), and each exit's gradient reaches only its own head and the backbone.

T_i = o_i + w_{i-1} T_{i-1} while F_i = o_i + w_i F_{i-1}: with one reweight for every exit (the
authors' scripts: 0.5) they are the same logits; with a linspace the two rules shift the weights
by one exit, and each is kept where the authors use it (training forward, evaluation forward).
``boost_reweight`` is parsed as args.py parses ``--ensemble_reweight``: one value for every exit,
two for a linspace from the first exit's to the last's, or one per exit. With every weight 0 the
rule is plain multi-exit training.

Any loss composes with it: it sees the T_i. Distillation from the last exit (DBT) then distills
the last exit's boosted prediction T_M (teacher, detached) into each earlier T_m, whose gradient
reaches only exit m's own logits o_m (and, through them, the backbone).
"""
import functools

from .. import registry
from ..errors import ConfigError


def exit_weights(reweight, n_exits):
    """The per-exit weights of ``boost_reweight`` (a number, or a list of 1, 2 or ``n_exits``
    numbers), as floats, two values spread as numpy's linspace spreads them (args.py)."""
    values = [reweight] if isinstance(reweight, (int, float)) else list(reweight)
    values = [float(w) for w in values]
    if len(values) == 1:
        return tuple(values * n_exits)
    if len(values) == 2:
        start, stop = values
        if n_exits == 1:
            return (start,)
        step = (stop - start) / (n_exits - 1)
        return tuple(i * step + start for i in range(n_exits - 1)) + (stop,)
    if len(values) != n_exits:
        raise ConfigError(f'cf_net.boost_reweight={list(values)}: {len(values)} weights for '
                          f'{n_exits} exits; give one, two (a linspace from the first exit to '
                          f'the last) or one per exit')
    return tuple(values)


def evaluation_logits(outs, weights):
    """F_i = o_i + F_{i-1} * w_i (F_0 = o_0): every exit's boosted prediction."""
    logits = [outs[0]]
    for o, w in zip(outs[1:], weights[1:]):
        logits.append(o + logits[-1] * w)
    return logits


def training_logits(outs, weights):
    """T_i = o_i + detach(P_{i-1}), P_i = (o_i + P_{i-1}) * w_i (P_{-1} = 0): what each exit
    learns with, on top of the detached ensemble of the exits before it."""
    logits, ensemble = [], None
    for o, w in zip(outs, weights):
        logits.append(o if ensemble is None else o + ensemble)
        ensemble = (o.detach() if ensemble is None else o.detach() + ensemble) * w
    return logits


class BoostedExits:
    """Mixed in before a registered model's class (``boosted_class``): its ``forward`` returns
    the boosted logits (``training_logits`` in train mode, ``evaluation_logits`` in eval mode),
    and ``exit_step`` runs the early-exit rule's step on them. Its weights, parameters, buffers
    and state dict are the model's own (``boost_weights`` is a tuple of floats, not state)."""

    boost_weights = ()
    combines_exits = True  # exit k's prediction needs heads 0..k (``evaluate.flops``)

    def forward(self, x):
        outs = super().forward(x)
        rule = training_logits if self.training else evaluation_logits
        return rule(outs, self.boost_weights)

    def exit_step(self, k, state):
        """(the state after block k, exit k's boosted logits F_k) from ``state``, block k's
        input: the image for k = 0, else (block k-1's output, F_{k-1}), what the early-exit
        runners carry from step to step (``early_exit.rule.exit_step``)."""
        h, previous = (state, None) if k == 0 else state
        h = self.blocks[k](h)
        logits = self.exits[k](self.exit_features(h))
        if previous is not None:
            logits = logits + previous * self.boost_weights[k]
        return (h, logits), logits


@functools.cache
def boosted_class(cls):
    """``cls`` with ``BoostedExits`` mixed in (one class per model class; same constructor)."""
    return type(f'Boosted{cls.__name__}', (BoostedExits, cls),
                {'__module__': __name__, '__doc__': f'{cls.__name__} with boosted exits '
                                                    f'(``multiexit.models.boosted``).'})


def build(classes, cf_net, reweight):
    """The model of ``classes`` (a registry) that ``cf_net`` names, of its boosted class, with
    the per-exit weights of ``reweight``."""
    boosted = {name: boosted_class(cls) for name, cls in classes.items()}
    model = registry.build(boosted, cf_net, 'net')
    model.boost_weights = exit_weights(reweight, len(model.exits))
    return model
