"""Training regimes (``cf_regime``): which parameters train in which epochs, after Kubaty et al.,
ICML 2025 (github.com/kamadforge/early-exit-benchmark, commit 52ff524c887fcfe7bdeeb5b4c658ba368
eb5f689).

- ``joint``: every exit from the first epoch (the paper's training, and this repository's);
- ``disjoint``: ``backbone_epochs`` epochs of the backbone and its last exit alone, then the
  early exits alone on the frozen backbone;
- ``mixed``: the same first phase, then everything.

The authors' phase 1 is a plain network trained with cross-entropy (train.py: ``training_loop``,
``criterion(output, y)``); their phase 2 is a new run of methods/early_exit.py on its weights
(``setup_model`` with ``base_on``), whose early-exit heads are fresh modules: ``with_backbone``
picks ``model.train('all')`` (mixed) or ``model.train('without_backbone')`` (disjoint), which
(architectures/early_exits/base.py, ``EarlyExitingBase.train``) sets ``requires_grad=False`` on
the backbone and its final classifier (``_core_modules``: the base model) and puts them in eval
mode, so that their BatchNorm statistics no longer move; its optimizer is built over the
parameters that train (train.py, ``setup_optimization``: ``unfrozen_parameters``), with a
schedule of its own over phase 2's epochs (scripts/resnet50cifar10_*.py: ``epochs`` = N of phase
1, then 200 - N with a fresh SGD and cosine schedule).

Here both phases are one run of ``n_epochs`` (``Phase``): in phase 1 the training loss is the
cross-entropy of the last exit alone (``PhasedLoss``) and the early exits are frozen; at the
boundary the optimizer's state is dropped and ``cf_scheduler`` starts again from cf_opt's lr
(``PhasedSchedule``). Each phase runs the whole cf_scheduler compressed to its length: the keys
that count epochs (``EPOCH_KEYS``) are scaled by its share of ``n_epochs`` (as the authors'
cosine schedule spans each phase). "The backbone" is every parameter but the early exits'
(``model.exits[:-1]``, the contract of ``multiexit.models``), for every model family and for a
pack's fused network alike.
"""
from torch import nn

from .. import registry
from ..losses.terms import cross_entropy

# the cf_scheduler keys that count epochs, scaled to a phase's length
EPOCH_KEYS = ('milestones', 'step_size', 'T_max')


class Joint:
    """Every exit trains from the first epoch to the last."""

    def phases(self, n_epochs):
        return [Phase(0, n_epochs, 'all')]


class Disjoint:
    """``backbone_epochs`` epochs of the backbone and last exit, then the early exits alone.
    ``backbone_epochs``: a number of epochs (an integer), or a share of n_epochs (in (0, 1),
    rounded half up to an epoch)."""
    later = 'heads'

    def __init__(self, backbone_epochs):
        if backbone_epochs is None:
            raise ValueError('backbone_epochs=None: give the epochs of phase 1 (an integer) or '
                             'their share of n_epochs (in (0, 1))')
        self.backbone_epochs = backbone_epochs

    def phases(self, n_epochs):
        n = self.backbone_epochs
        first = n if isinstance(n, int) else int(n * n_epochs + 0.5)  # rounded half up
        return [Phase(0, first, 'backbone'), Phase(first, n_epochs, self.later)]


class Mixed(Disjoint):
    """``backbone_epochs`` epochs of the backbone and last exit, then everything."""
    later = 'all'


REGISTRY = {'joint': Joint, 'disjoint': Disjoint, 'mixed': Mixed}


class Phase:
    """Epochs ``start`` to ``end`` (excluded) training ``part``: 'all', 'backbone' (with the
    last exit) or 'heads' (the early exits)."""

    def __init__(self, start, end, part):
        self.start, self.end, self.part = start, end, part
        self.cf_scheduler = None  # the run's, compressed to this phase (``scaled``)

    def scaled(self, cf_scheduler, n_epochs):
        """``cf_scheduler`` (written for ``n_epochs``) compressed to this phase's length."""
        share = (self.end - self.start) / n_epochs
        scale = lambda n: int(n * share + 0.5)  # rounded half up
        scaled = lambda v: [scale(x) for x in v] if isinstance(v, list) else max(scale(v), 1)
        return {k: scaled(v) if k in EPOCH_KEYS else v for k, v in cf_scheduler.items()}


def split(model):
    """(backbone modules, early-exit heads) of a multi-exit ``model``: the heads are
    ``exits[:-1]``; the backbone is every other child of the model, and the last exit."""
    heads = list(model.exits[:-1])
    backbone = [m for name, m in model.named_children() if name != 'exits'] + [model.exits[-1]]
    return backbone, heads


def freeze(model, part):
    """Let ``part`` of ``model`` ('all', 'backbone', 'heads') train and freeze the rest: no
    gradient (``requires_grad=False``, so that no optimizer updates it, not even by weight decay
    or momentum) and eval mode in training (its BatchNorm normalises with, and keeps, its
    running statistics), as the authors' ``train('without_backbone')``. The training step sets
    the whole model to train mode each epoch: a forward pre-hook puts the frozen parts back in
    eval mode before a training pass (in a CUDA graph: before the capture). The hook reads the
    parts' ``requires_grad``, so that a copy of the model (a pack's fused network) keeps it."""
    backbone, heads = split(model)
    frozen = {'all': [], 'backbone': heads, 'heads': backbone}[part]
    for m in backbone + heads:
        m.requires_grad_(all(m is not f for f in frozen))
    if _frozen_in_eval not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_frozen_in_eval)


def _frozen_in_eval(model, args):
    if model.training:
        for m in sum(split(model), []):
            first = next(m.parameters(), None)
            if m.training and first is not None and not first.requires_grad:
                m.eval()


class PhasedLoss(nn.Module):
    """``loss`` in the phases that train the early exits; in phase 1, the cross-entropy of the
    last exit alone (of each member of a pack: its (K,) losses), as the authors train their
    plain network; unlabelled examples (-100) add nothing to it."""

    def __init__(self, loss):
        super().__init__()
        self.loss, self.last_exit_only = loss, False

    @property
    def temperature(self):
        return self.loss.temperature

    def forward(self, logits_list, y):
        if self.last_exit_only:
            return cross_entropy(logits_list[-1].float()[None], y)
        return self.loss(logits_list, y)


class PhasedSchedule:
    """The scheduler of a regime of several phases, at ``epoch``: stepped once per epoch like
    torch's, it enters each phase at its first epoch: ``model`` and ``loss`` (a PhasedLoss)
    set to what the phase trains (``freeze``) and its loss, the optimizer's state dropped (a
    fresh optimizer, as the authors' phase 2 builds), its lr back to cf_opt's and a scheduler
    of the phase (``make``: cf_scheduler, optimizer, epoch -> scheduler) from there. At a
    resume (``epoch`` inside a phase), the restored optimizer state is kept and the phase's
    scheduler stepped to the epoch."""

    def __init__(self, phases, make, optimizer, model, loss, epoch):
        self.phases, self.make, self.optimizer = phases, make, optimizer
        self.model, self.loss, self.epoch = model, loss, epoch
        self._enter(self._phase(epoch), epoch - self._phase(epoch).start)

    def _phase(self, epoch):
        return next(p for p in self.phases if p.start <= epoch < p.end or p is self.phases[-1])

    def _enter(self, phase, into):
        freeze(self.model, phase.part)
        self.loss.last_exit_only = phase.part == 'backbone'
        for group in self.optimizer.param_groups:
            group['lr'] = group.get('initial_lr', group['lr'])
        self.scheduler = self.make(phase.cf_scheduler, self.optimizer, into)

    def step(self):
        self.epoch += 1
        phase = self._phase(self.epoch)
        if phase.start == self.epoch and phase is not self.phases[0]:
            self.optimizer.state.clear()
            self._enter(phase, 0)
        else:
            self.scheduler.step()

    def state_dict(self):
        return {'epoch': self.epoch, 'scheduler': self.scheduler.state_dict()}


def phased(cf_regime, n_epochs, cf_scheduler, make, model, optimizer, loss, epoch):
    """(scheduler, training loss) of ``cf_regime`` for ``model`` (a multi-exit model or a pack's
    fused one), ``optimizer`` (over all its parameters) and ``loss``, at ``epoch``: those of
    ``make`` and ``loss`` themselves for a regime of one phase (joint)."""
    phases = build(cf_regime).phases(n_epochs)
    if len(phases) == 1:
        return make(cf_scheduler, optimizer, epoch), loss
    for phase in phases:
        phase.cf_scheduler = phase.scaled(cf_scheduler, n_epochs)
    loss = PhasedLoss(loss)
    return PhasedSchedule(phases, make, optimizer, model, loss, epoch), loss


def build(cf_regime):
    """The regime that ``cf_regime['call']`` names."""
    return registry.build(REGISTRY, cf_regime, 'regime')
