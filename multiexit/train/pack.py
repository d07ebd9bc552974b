"""A pack: runs of one network, optimizer and schedule trained at once as one fused network
(``models.fused``) on one device, whose every kernel does all the runs' work.

Each run keeps its own data (subset, order and augmentation, from its seed and cf_trn), loss
(method, C, global_scale, temperature), validation, best snapshot, checkpoints and log, and
trains as it would alone, up to the order of floating-point sums: its model, optimizer,
scheduler and loss hold its part of the pack's after every epoch (``PackedRuns.scatter``), so
its files are those of a solo run. The runs start at the same epoch. A pack trains in one
process, without DDP, and without dropout (``models.fused.fuse`` refuses it).
"""
import torch
from torch import nn

from ..config import PACK_SHARED, as_text, changed_settings
from ..errors import ConfigError
from ..evaluate.passes import evaluate
from ..losses import (ClassificationOnlyLoss, DistillationBasedLoss, DistillationLossConstTemp,
                      distillation_loss, over_classes, teacher_confidence)
from ..models.fused import fuse, load_members, member_part, stack_members
from .loop import set_loss_epoch, train_epoch
from .run import build_optimizer, phased_schedule, step_without_optimizer
from .solo import build_steps, phase_changed, trainable

# the losses that are distillation_loss with some C, global_scale and T, which a pack computes
# for all their members at once (exactly these classes: a subclass may compute otherwise)
VECTORISED = (ClassificationOnlyLoss, DistillationLossConstTemp, DistillationBasedLoss)


class PackedRuns:
    """The runs of a pack (``check_packable``) as one job of ``train.loop.fit``: the fused
    network, its loss, optimizer, schedule and batches (every member's, side by side).
    ``PackedRuns([run])`` is the fused network of one run (what benchmarks/pack_throughput.py
    times as a pack of 1); ``train.solo.Solo`` trains a run alone."""

    def __init__(self, runs):
        self.runs = list(runs)
        lead = self.runs[0]
        check_packable(self.runs)
        self.model = fuse([run.model for run in self.runs], always=True)
        if lead.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = PackLoss([run.loss_fn for run in self.runs]).to(lead.device)
        self.T = self.loss_fn.temperature
        self.optimizer = build_optimizer(lead.cfg.cf_opt, self.model.parameters(), lead.device)
        optimizer_states_from_members(self.optimizer, self.model,
                                      [run.optimizer for run in self.runs],
                                      [run.model for run in self.runs])
        self.scheduler, self.train_loss = phased_schedule(lead.cfg, self.model, self.optimizer,
                                                          self.loss_fn, lead.epoch)
        self.train_loader = MemberBatches([run.train_loader for run in self.runs], 'training')
        self.val_loader = MemberBatches([run.val_loader for run in self.runs], 'validation')
        self.train_loader.check()
        self.val_loader.check()
        self._build_steps()

    def _build_steps(self):
        self.trains = trainable(self.model)
        self.step, self.eval_forward = build_steps(self.runs[0], self.model, self.train_loss,
                                                   self.optimizer, members=len(self.runs))

    def lr(self):
        return self.optimizer.param_groups[0]['lr']

    def train_epoch(self, progress=None):
        """([mean loss], [metrics], [first non-finite step or None]), one of each per run."""
        losses, trn, bad = train_epoch(self.step, self.train_loader, progress)
        return losses, self._own(trn), bad

    def next_epoch(self, active):
        self.scheduler.step()
        for run in active:  # the lr that its own optimizer's state records
            step_without_optimizer(run.scheduler)
        if phase_changed(self.model, self.trains):
            self._build_steps()

    def validate(self, progress=None):
        lead = self.runs[0]
        return self._own(evaluate(self.model, self.val_loader, lead.n_exits, lead.acc_tops,
                                  self.T, progress, amp=lead.amp,
                                  forward=self.eval_forward, members=len(self.runs)))

    def _own(self, metrics):
        """Each run's metrics as it would have them alone: adj_maxprob only where its loss has a
        temperature (the pack's loss gives every member one)."""
        for run, m in zip(self.runs, metrics):
            if not hasattr(run.loss_fn, 'temperature'):
                m.pop('adj_maxprob', None)
        return metrics

    def scatter(self):
        """Every run's part of the fused weights, buffers, optimizer state and temperature into
        its own model, optimizer and loss."""
        models = [run.model for run in self.runs]
        load_members(self.model, models)
        optimizer_states_to_members(self.optimizer, self.model,
                                    [run.optimizer for run in self.runs], models)
        self.loss_fn.scatter([run.loss_fn for run in self.runs])

    def rng_states(self):
        """Each run's RNG states after its build: a member draws no random numbers but its
        loaders' (no dropout), so those are what it would save alone."""
        return [(run.rng_at_build, None) for run in self.runs]


def check_packable(runs):
    """ConfigError unless ``runs`` can train as one pack: one process, and the same settings of
    ``config.PACK_SHARED``, top-k accuracies and epoch."""
    lead = runs[0]
    if lead.world_size > 1:
        raise ConfigError('a pack trains its runs in one process: not under torchrun')
    for i, run in enumerate(runs[1:], 2):
        for key in PACK_SHARED:
            mine, theirs = getattr(run.cfg, key), getattr(lead.cfg, key)
            if mine != theirs:
                differ = as_text(changed_settings({key: theirs}, {key: mine}, union=True))
                raise ConfigError(f'the runs of a pack share {key}, but run {i} differs from run '
                                  f'1 in {differ}; train them in separate packs')
        for what, mine, theirs in (('acc_tops', run.acc_tops, lead.acc_tops),
                                   ('epoch', run.epoch, lead.epoch)):
            if mine != theirs:
                raise ConfigError(f'the runs of a pack share {what}, but run {i} has {mine} and '
                                  f'run 1 {theirs}; train them in separate packs')


class PackLoss(nn.Module):
    """The losses of a pack's K members as one: ``loss(logits_list, y)`` with every exit's logits
    (K, B, classes) and y (K, B) returns each member's loss (K,), as its own loss module would
    (``member_losses``, in order) up to the order of floating-point sums, with the same
    gradients. The members may differ in method.

    The original's three losses (``VECTORISED``) are ``distillation_loss`` with per-member C,
    global_scale and T, computed for all of them at once: ClassificationOnlyLoss is C = 0 and
    global_scale = 1, DistillationLossConstTemp keeps its T, and DBT members raise theirs by
    their Tmult after a training call while their teacher's mean max-probability exceeds their
    maxprob. ``temperature`` (K,) float64 is each member's T; ``scatter`` copies it back into
    their losses. Every other loss (distillation from later exits, SDN's, ...) is its member's
    own module, called on that member's part of the logits (K, B, classes) -> (B, classes) and
    labels: its state stays in it, ``set_epoch`` reaches it, and its entry of ``temperature``
    follows its own T after each call where it has one (1 where it has none). A pack of
    vectorised members only runs one ``distillation_loss``, the same kernels for any K; each
    member of another method adds its own loss's.
    """

    def __init__(self, member_losses):
        super().__init__()
        first = member_losses[0]
        self.n_exits, self.acc_tops = first.n_exits, first.acc_tops
        self.n_members = len(member_losses)
        self.vectorised = [k for k, m in enumerate(member_losses) if type(m) in VECTORISED]
        self.own = [k for k, m in enumerate(member_losses) if type(m) not in VECTORISED]
        self.own_losses = nn.ModuleList(member_losses[k] for k in self.own)
        # the vectorised members' positions, to pick theirs out of a mixed pack's logits
        self.register_buffer('picked', torch.tensor(self.vectorised, dtype=torch.int64),
                             persistent=False)
        vectorised = [member_losses[k] for k in self.vectorised]
        per_member = lambda get, dtype=torch.float64: torch.tensor(
            [get(m) for m in vectorised], dtype=dtype)
        distils = lambda m: isinstance(m, DistillationLossConstTemp)
        anneals = lambda m: isinstance(m, DistillationBasedLoss)
        self.register_buffer('C', per_member(lambda m: m.C if distils(m) else 0.0))
        self.register_buffer('global_scale', per_member(
            lambda m: m.global_scale if distils(m) else 1.0))
        self.register_buffer('temperature', torch.tensor(
            [_temperature(m) for m in member_losses], dtype=torch.float64))
        # float32, as a solo DBT compares its float32 confidence with the float maxprob; 1 for
        # the members that keep their T, which no confidence exceeds
        self.register_buffer('maxprob', per_member(lambda m: m.maxprob if anneals(m) else 1.0,
                                                   torch.float32))
        self.register_buffer('Tmult', per_member(lambda m: m.Tmult if anneals(m) else 1.0))

    def forward(self, logits_list, y):
        if not self.own:
            return self._distillation(logits_list, y)
        losses = [None] * self.n_members
        if self.vectorised:
            picked = self.picked
            part = self._distillation([z.index_select(0, picked) for z in logits_list],
                                      y.index_select(0, picked), picked)
            for k, loss in zip(self.vectorised, part.unbind()):
                losses[k] = loss
        for k, loss_fn in zip(self.own, self.own_losses):
            losses[k] = loss_fn([z[k] for z in logits_list], y[k])
            if torch.is_tensor(getattr(loss_fn, 'temperature', None)):
                self.temperature[k].copy_(loss_fn.temperature)
        return torch.stack(losses)

    def _distillation(self, logits_list, y, picked=None):
        """``distillation_loss`` of the vectorised members (all K, or those ``picked``)."""
        T = self.temperature if picked is None else self.temperature.index_select(0, picked)
        loss = distillation_loss(logits_list, y, T, self.C, self.global_scale)
        if self.training:
            confidence = teacher_confidence(logits_list[-1], over_classes(T.float()))
            T = torch.where(confidence > self.maxprob, T * self.Tmult, T)
            if picked is None:
                self.temperature.copy_(T)
            else:
                self.temperature.index_copy_(0, picked, T)
        return loss

    def set_epoch(self, epoch, n_epochs):
        """``set_epoch`` of every member's own loss that has one (``train.loop.set_loss_epoch``)."""
        for loss_fn in self.own_losses:
            set_loss_epoch(loss_fn, epoch, n_epochs)

    def scatter(self, member_losses):
        """Each vectorised member's temperature into its own loss (the others trained in
        theirs)."""
        temperatures = self.temperature.tolist()  # host sync, once per epoch
        for k in self.vectorised:
            if hasattr(member_losses[k], 'temperature'):
                member_losses[k].temperature.fill_(temperatures[k])


def _temperature(loss_fn):
    """A member's T as the pack starts: 1 for a loss without one."""
    T = getattr(loss_fn, 'temperature', None)
    return float(T) if torch.is_tensor(T) else 1.0


def _state_tensor(value, param):
    return torch.is_tensor(value) and value.shape == param.shape


def optimizer_states_from_members(optimizer, fused, member_optimizers, models):
    """The state of ``optimizer`` (over ``fused.parameters()``) from the members' optimizers
    (each over its model's parameters): a momentum buffer is the stack of theirs. Either every
    member has a state (resumed from a training state) or none does."""
    params = [list(m.parameters()) for m in models]
    for i, p in enumerate(fused.parameters()):
        states = [opt.state.get(ps[i]) for opt, ps in zip(member_optimizers, params)]
        if not any(states):
            continue
        if not all(states):
            raise ConfigError('the members of a pack resume either all from a training state '
                              '(last.pt) or all from weights (ep<N>.pt); train them apart')
        optimizer.state[p] = {
            key: stack_members([s[key] for s in states], p) if _state_tensor(value, params[0][i])
            else value for key, value in states[0].items()}


def optimizer_states_to_members(optimizer, fused, member_optimizers, models):
    """Copy every member's part of ``optimizer``'s state into its own optimizer."""
    for k, (opt, model) in enumerate(zip(member_optimizers, models)):
        for p, own in zip(fused.parameters(), model.parameters()):
            if p in optimizer.state:
                opt.state[own] = {key: member_part(value, k, own.shape).clone()
                                  if torch.is_tensor(value) else value
                                  for key, value in optimizer.state[p].items()}


class MemberBatches:
    """The loaders of K members as one: each step, x (B, K * C, H, W), member k's batch in the
    k-th part of the channels (the fused network's input), and y (K, B). Every member's loader
    must give as many batches, of the same sizes (``check``)."""

    def __init__(self, loaders, what):
        self.loaders, self.what = loaders, what
        self.members, self.world_size = len(loaders), 1
        self.device = loaders[0].device

    def set_epoch(self, epoch):
        for loader in self.loaders:
            loader.set_epoch(epoch)
        self.check()  # zip would silently cut the longer members' epochs

    def check(self):
        """ConfigError unless every member's loader has as many examples in as many batches."""
        sizes = [(len(loader), loader.order.n_examples()) for loader in self.loaders]
        if len(set(sizes)) > 1:
            listed = ', '.join(f'{n} examples in {b} batches' for b, n in sizes)
            raise ConfigError(f'the members of a pack need the same number of {self.what} '
                              f'examples and batches; they have {listed}')

    def __len__(self):
        return len(self.loaders[0])

    def __iter__(self):
        for batches in zip(*self.loaders):
            xs, ys = zip(*batches)
            yield torch.cat(xs, dim=1), torch.stack(ys)
