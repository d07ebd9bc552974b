"""The training loop: epochs of device-resident data, validation, snapshots and exact resume.

A ``Run`` is one training run: its settings, data, model, loss, optimizer, checkpoints and log.
A ``Pack`` trains runs: one alone (``Run.fit``), or several of one network, optimizer and
schedule at once as one fused network (``multiexit.models.fused``), each still a run of its own, with
its own data, loss, validation, checkpoints and log (``train_pack``).
"""
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import data, losses, models, registry, settings
from ..accel import distributed
from ..data import order
from ..errors import (CheckpointWriteError, ConfigError, NonFiniteLossError, PeerLostError,
                      SnapshotError, TrainingInterrupted, UserError, reported_as_one_line)
from ..evaluate.report import GraphedForward, evaluate
from ..metrics import check_tops, default_tops
from ..models import fused
from ..progress import bar
from ..runs import find
from ..settings import plain
from . import checkpoint
from .step import build_step

FUSED = ('SGD', 'Adam', 'AdamW')  # optimizers with a fused CUDA implementation
# The settings of a training config that Run takes (what a resume compares with its parent's).
SETTINGS = ('cf_net', 'cf_loss', 'cf_trn', 'cf_val', 'cf_opt', 'cf_scheduler', 'batch_size',
            'val_batch_size', 'n_epochs', 'save_interval', 'data_dir', 'gpu', 'seed', 'amp',
            'compile', 'channels_last', 'sync_bn', 'cuda_graph', 'cuda_streams', 'deterministic',
            'cudnn_benchmark')
# The settings that the runs of a pack share: one network, optimizer and schedule, one loop.
PACK_SHARED = ('cf_net', 'cf_opt', 'cf_scheduler', 'batch_size', 'val_batch_size', 'n_epochs',
               'gpu', 'amp', 'compile', 'channels_last', 'cuda_graph', 'cuda_streams',
               'deterministic', 'cudnn_benchmark')


def resolve_device(gpu):
    """torch.device for the original's ``gpu`` setting (an ordinal; -1 = CPU); under torchrun,
    this process's device (``distributed.rank_device``)."""
    if isinstance(gpu, (list, tuple)):
        raise ConfigError(f'gpu={list(gpu)}: a process drives one device; train on several '
                          f'GPUs with one process each: torchrun --nproc_per_node={len(gpu)} '
                          'train_cifar.py with ... (README: Several GPUs)')
    if distributed.active():
        return distributed.rank_device(gpu)
    if not isinstance(gpu, int) or isinstance(gpu, bool):
        raise ConfigError(f'gpu must be an int (CUDA ordinal, -1 = CPU), got {gpu!r}')
    if gpu < 0:
        return torch.device('cpu')
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpu >= n:
        raise ConfigError(f'gpu={gpu} but this machine has {n} CUDA device(s); '
                          f'use gpu=-1 for CPU' + (f' or 0..{n - 1}' if n else ''))
    return torch.device(f'cuda:{gpu}')


def rng_state():
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                      'has_gauss': int(has_gauss), 'gauss': float(gauss)},
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(_as_tuple(state['python']))
    npy = state['numpy']
    np.random.set_state(('MT19937', npy['keys'].numpy().astype(np.uint32), npy['pos'],
                         npy['has_gauss'], npy['gauss']))
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _flat(tree, prefix=''):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def changed_settings(old, new, union=False):
    """[(dotted key, old value, new value)] of the settings that differ: of the keys that both
    have, or with ``union`` of either (None where one lacks it)."""
    old, new = _flat(plain(old)), _flat(plain(new))
    keys = sorted(set(old) | set(new)) if union else sorted(set(old) & set(new))
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def _as_text(changes):
    return '; '.join(f'{k} {old!r} -> {new!r}' for k, old, new in changes)


def build_optimizer(cf_opt, params, device):
    """The optimizer of ``cf_opt`` over ``params``; on CUDA, the fused implementation of those
    that have one, unless cf_opt chooses."""
    if device.type == 'cuda' and cf_opt.get('call') in FUSED and not {'fused', 'foreach'} & set(
            cf_opt):
        cf_opt = dict(cf_opt, fused=True)  # one kernel for the whole update
    return registry.build(settings.classes('cf_opt'), cf_opt, 'opt', params)


def scheduler_at(cf_scheduler, optimizer, epoch):
    """The scheduler of ``cf_scheduler`` stepped through ``epoch`` epochs from cf_opt's lr:
    the learning rate these settings give the epoch that a run starts or resumes at."""
    scheduler = registry.build(settings.classes('cf_scheduler'), cf_scheduler, 'scheduler',
                               optimizer)
    for _ in range(epoch):
        step_without_optimizer(scheduler)
    return scheduler


def step_without_optimizer(scheduler):
    """``scheduler.step()`` of an optimizer that did not step (yet)."""
    with warnings.catch_warnings():  # torch warns of scheduler steps without optimizer steps
        warnings.filterwarnings('ignore', re.escape('Detected call of `lr_scheduler.step()`'))
        scheduler.step()


def train_epoch(step, loader, progress=None):
    """One epoch of ``step`` (a ``step.TrainStep``) over ``loader``; returns (mean loss,
    metrics dict, index of the first step whose loss was not finite or None). With a sharded
    ``loader`` (each rank its part of every batch, the step's model wrapped in DDP), the results
    are those of the global batches, the same on every rank."""
    step.start_epoch()
    for x, y in (progress(loader) if progress else loader):
        step(x, y)
    return step.finish_epoch(loader.world_size)  # host sync, once per epoch


class Run:
    """One training run: its settings, data, model, loss, optimizer, checkpoints and log;
    ``fit()`` trains it epoch by epoch (a ``Pack`` of one).

    The data come from the data set that ``cf_trn['call']`` names in ``multiexit.data``
    (``cf_val`` names the same one), in ``data_dir``; ``cf_net['out_dim']=None`` takes its
    number of classes. Under torch.distributed (``distributed.process_group``), every rank
    builds a Run with the same arguments and trains the same model on its part of every batch
    (DDP); rank 0's ``seed`` and ``run_dir`` are used by all (``run_dir`` may be None
    elsewhere), and only rank 0 logs and writes checkpoints. ``script`` is what the messages
    say to run to resume. ``error``: what stopped the last ``fit`` of the run, if anything did.
    """

    def __init__(self, cf_net, cf_loss, cf_trn, cf_val, cf_opt, cf_scheduler, batch_size,
                 val_batch_size, n_epochs, save_interval, data_dir, gpu, seed, run_dir,
                 parent_snapshot=None, snapshot_dir='snapshots', log=print, log_scalar=None,
                 amp=True, compile=False, channels_last=True, sync_bn=False, cuda_graph=True,
                 cuda_streams=True, deterministic=False, cudnn_benchmark=False,
                 script='train_cifar.py'):
        self.settings = plain({k: v for k, v in locals().items() if k in SETTINGS})
        settings.check(self.settings)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        order.check_divisible(batch_size, self.world_size)
        # rank 0's for all: a seed sacred drew differs per process; only rank 0 has a run dir
        seed, run_dir = distributed.from_main((seed, str(run_dir)))
        self.n_epochs, self.save_interval, self.script = n_epochs, save_interval, script
        self.run_dir = Path(run_dir)
        quiet = lambda *a: None
        self.log = log if self.is_main else quiet
        self.log_scalar = (log_scalar or quiet) if self.is_main else quiet
        self.device = resolve_device(gpu)
        cuda = self.device.type == 'cuda'
        if deterministic:  # bit-exact reruns and resumes on one GPU, at some cost in speed
            os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = cuda and cudnn_benchmark and not deterministic
        # CUDA only: on the CPU, fp32 eager is both the faithful and the fastest path.
        self.amp, self.channels_last, self.compile = (amp and cuda, channels_last and cuda,
                                                      compile if cuda else False)
        # parallel streams in one process (DDP's gradient hooks are left on one stream)
        self.cuda_graph, self.sync_bn = cuda_graph and cuda, sync_bn
        self.cuda_streams = cuda_streams and cuda and self.world_size == 1
        self.seed = seed
        # Configuration first, data last: a bad value is reported before any work is done.
        trn_data, val_data = data.build(cf_trn, 'trn'), data.build(cf_val, 'val')
        if cf_val.get('call') != cf_trn.get('call'):
            raise ConfigError(f"cf_val call={cf_val.get('call')!r} differs from cf_trn call="
                              f"{cf_trn.get('call')!r}: validation is carved from the training set")
        n_classes = trn_data.n_classes(data_dir)
        self.cf_net = plain(cf_net)
        if self.cf_net.get('out_dim') is None:  # None: as many as the data set has
            self.cf_net['out_dim'] = n_classes
        if self.cf_net['out_dim'] != n_classes:
            raise ConfigError(f"cf_net out_dim={self.cf_net['out_dim']} but {cf_trn['call']} has "
                              f'{n_classes} classes')
        torch.manual_seed(self.seed)
        self.model = models.build(self.cf_net).to(self.device)
        in_shape = getattr(self.model, 'in_shape', trn_data.input_size)
        if in_shape != trn_data.input_size:
            raise ConfigError(f'cf_net in_shape={in_shape} but cf_trn gives images of '
                              f'{trn_data.input_size}x{trn_data.input_size}')
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.n_exits = len(self.model.exits)
        if cf_loss.get('n_exits') is None:  # None: as many as the model has
            cf_loss = dict(cf_loss, n_exits=self.n_exits)
        if cf_loss.get('acc_tops') is None:
            cf_loss = dict(cf_loss, acc_tops=default_tops(n_classes))
        self.loss_fn = losses.build(cf_loss).to(self.device)
        self.acc_tops = tuple(self.loss_fn.acc_tops)
        check_tops(self.acc_tops, n_classes, cf_trn['call'])
        if self.loss_fn.n_exits != self.n_exits:
            raise ConfigError(f'cf_loss n_exits={self.loss_fn.n_exits} but the model has '
                              f'{self.n_exits} exits (cf_net)')
        self.optimizer = build_optimizer(cf_opt, self.model.parameters(), self.device)
        self.parent = self._parent_checkpoint(parent_snapshot, snapshot_dir)
        if self.rank:
            torch.manual_seed(self.seed + self.rank)  # dropout: other masks than rank 0's
        self.epoch, self.best_val, self.best_epoch = 0, -math.inf, None
        self._saved = None  # (path, epoch) of the newest complete training state
        if self.parent:
            self._restore(self.parent)
        self.scheduler = scheduler_at(cf_scheduler, self.optimizer, self.epoch)

        shard = dict(rank=self.rank, world_size=self.world_size, channels_last=self.channels_last)
        with distributed.local_main_first():  # one download per machine
            self.train_loader = trn_data.loader('train', data_dir, batch_size, self.device,
                                                seed=self.seed, **shard)
        self.val_loader = val_data.loader('val', data_dir, val_batch_size, self.device, **shard)
        if len(self.train_loader) == 0:
            raise ConfigError(f'batch_size={batch_size} exceeds the {len(self.train_loader.labels)} '
                              'training examples: no full batch per epoch')
        self.error, self._pack = None, None
        # A member of a pack draws no random numbers but its loaders' (no dropout), so the RNG
        # states after its build are what it would save alone; the live ones are another's.
        self.in_pack, self.rng_at_build = False, rng_state()

    @classmethod
    def from_config(cls, config, run_dir, snapshot_dir, log_scalar, script, log=print):
        """The Run of a training script's sacred config (its own settings and those that
        training_experiment.py gives every training script)."""
        return cls(**{k: config[k] for k in SETTINGS}, run_dir=run_dir,
                   parent_snapshot=config['parent_snapshot'], snapshot_dir=snapshot_dir,
                   log=log, log_scalar=log_scalar, script=script)

    def _parent_checkpoint(self, parent_snapshot, snapshot_dir):
        """The checkpoint to resume from; ``parent_config``: the settings its run recorded
        (config.json beside it; None where there is none)."""
        if not parent_snapshot:
            return None
        path = find.resolve(parent_snapshot, snapshot_dir)
        self.parent_path = path / checkpoint.LAST if path.is_dir() else path
        self.parent_config = find.run_config(self.parent_path.parent)
        ckpt = checkpoint.load(self.parent_path)
        parent_net = ckpt.get('cf_net') if isinstance(ckpt, dict) else None
        if parent_net is not None and plain(parent_net) != self.cf_net:
            differ = _as_text(changed_settings(parent_net, self.cf_net, union=True))
            raise SnapshotError(f'{self.parent_path} was trained with another cf_net ({differ}); '
                                f'resume with its settings: {self._resume_hint()}')
        return ckpt

    def _resume_hint(self, run_dir=None):
        """The command that resumes the run in ``run_dir`` (default: the parent's) with the
        settings it recorded."""
        return f'{distributed.launch_command(self.script)} with {self.resume_updates(run_dir)}'

    def resume_updates(self, run_dir=None):
        """What follows ``with`` in the command that resumes the run in ``run_dir`` (default: the
        parent's) with the settings it recorded."""
        run_dir = Path(run_dir or self.parent_path.parent)
        config = run_dir / 'config.json'
        return (f'{config} ' if config.is_file() else '') + f'parent_snapshot={run_dir}'

    def _restore(self, ckpt):
        """Continue from ``ckpt`` with this run's settings: its weights and epoch, and from a
        training state (last.pt) the optimizer's state under this run's cf_opt, DBT's
        temperature, the RNG states and the best snapshot so far. The scheduler follows this
        run's cf_scheduler from the restored epoch (``scheduler_at``)."""
        state, _, extra = checkpoint.unpack_model(ckpt, self.parent_path, self.cf_net)
        try:
            models.load_original_state_dict(self.model, state)
        except RuntimeError as e:
            raise SnapshotError(f'{self.parent_path} does not fit cf_net: '
                                f'{str(e).splitlines()[0]}') from None
        self.epoch = int(extra.get('epoch', 0))
        if self.epoch >= self.n_epochs:
            raise ConfigError(f'{self.parent_path} has trained {self.epoch} epochs already and '
                              f'n_epochs={self.n_epochs}: there is nothing to train; to train '
                              f'longer: {self._resume_hint()} n_epochs=<more than {self.epoch}>')
        recorded = dict(self.parent_config or {}, **({'seed': extra['seed']} if 'seed' in extra
                                                     else {}))
        changes = changed_settings(recorded, self.settings)
        changed = (f'; these settings change from epoch {self.epoch + 1} on: {_as_text(changes)}'
                   if changes else '')
        if 'optimizer' not in extra:  # a model snapshot: weights only, as the original did
            self.log(f'resuming from the weights of {self.parent_path} at epoch {self.epoch} '
                     f'(optimizer state and temperature start afresh){changed}')
            return
        optimizer = self.settings['cf_opt'].get('call')
        trained_with = recorded.get('cf_opt', {}).get('call', optimizer)
        if trained_with != optimizer:
            raise ConfigError(f'cf_opt.call={optimizer!r}, but {self.parent_path} holds the state '
                              f'of {trained_with}, which {optimizer} cannot take over; to start '
                              f'{optimizer} afresh from the weights, resume from a model snapshot '
                              f'(parent_snapshot=<run dir>/ep<N>.pt)')
        hyper = [{k: v for k, v in g.items() if k != 'params'} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(extra['optimizer'])
        for group, given in zip(self.optimizer.param_groups, hyper):
            group.pop('initial_lr', None)  # the parent's: the scheduler starts from cf_opt.lr
            group.update(given)
        # DBT's temperature is state to continue; a constant T (or none) is a setting
        dbt = losses.DistillationBasedLoss
        if (isinstance(self.loss_fn, dbt) and 'temperature' in extra['loss']
                and recorded.get('cf_loss', {}).get('call', dbt.__name__) == dbt.__name__):
            self.loss_fn.load_state_dict(extra['loss'])
        per_rank = extra.get('rng_ranks')
        if per_rank and len(per_rank) == self.world_size:
            set_rng_state(per_rank[self.rank])
        else:  # another number of processes: rank 0 continues, the others start their own
            set_rng_state(extra['rng'])
            if self.rank:
                torch.manual_seed(self.seed + self.rank)
        self.best_val, self.best_epoch = extra['best_val'], extra['best_epoch']
        self._saved = (self.parent_path, self.epoch)
        best = self.parent_path.parent / f'ep{self.best_epoch}.pt'
        if (self.is_main and self.best_epoch is not None and best.is_file()
                and not self.save_interval):
            shutil.copy2(best, self.run_dir / best.name)  # the best snapshot so far moves along
        self.log(f'resuming {self.parent_path} at epoch {self.epoch}'
                 + (changed or ' exactly, with the settings it was trained with'))

    def training_state(self, rng_ranks=None):
        """Everything to continue exactly; ``rng_ranks``: every rank's RNG states under DDP
        (rank 0's are ``rng``). The model's keys have no DDP ``module.`` prefix."""
        return {'format': 'multiexit-train-1', 'epoch': self.epoch, 'cf_net': self.cf_net,
                'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scheduler': self.scheduler.state_dict(), 'loss': self.loss_fn.state_dict(),
                'seed': self.seed, 'best_val': self.best_val, 'best_epoch': self.best_epoch,
                'rng': self.rng_at_build if self.in_pack else rng_state(),
                **({'rng_ranks': rng_ranks} if rng_ranks else {})}

    def continuation(self):
        """What follows ``with`` in the command that continues this run from its newest complete
        training state; None where no epoch finished."""
        return self.resume_updates(self._saved[0].parent) if self._saved else None

    def _last_good(self):
        """Where the last complete state is, and how to continue from it."""
        if self._saved is None:
            return 'no epoch had finished, so there is nothing to resume: start the run again'
        path, epoch = self._saved
        return f'{path} holds epoch {epoch}; resume with: {self._resume_hint(path.parent)}'

    def _save(self, val_metrics):
        """Rank 0 writes the checkpoints; every rank keeps the same account of them."""
        rng_ranks = distributed.gathered(rng_state()) if self.world_size > 1 else None  # host sync
        try:
            self._write_checkpoints(val_metrics, rng_ranks)
        except OSError as e:
            raise CheckpointWriteError(
                f'could not write a checkpoint to {self.run_dir} ({e.strerror or e}); '
                f'{self._last_good()} once the problem (disk space?) is fixed') from None
        self._saved = (self.run_dir / checkpoint.LAST, self.epoch)

    def _write_checkpoints(self, val_metrics, rng_ranks):
        ep = self.epoch
        new_best = not self.save_interval and val_metrics['acc1_avg'] > self.best_val
        old_best = self.best_epoch
        if new_best:
            self.best_epoch = ep
        self.best_val = max(self.best_val, val_metrics['acc1_avg'])
        if not self.is_main:
            return
        if new_best or (self.save_interval and ep % self.save_interval == 0):
            checkpoint.save_atomic(checkpoint.model_snapshot(self.model, self.cf_net, ep,
                                                               val_metrics),
                                    self.run_dir / f'ep{ep}.pt')
        checkpoint.save_atomic(self.training_state(rng_ranks), self.run_dir / checkpoint.LAST)
        if new_best and old_best is not None:  # only once last.pt names the new best
            (self.run_dir / f'ep{old_best}.pt').unlink(missing_ok=True)

    def _log_epoch(self, loss, trn, val, lr, seconds):
        T = getattr(self.loss_fn, 'T', None)
        for name, value in [('train.loss', loss), ('lr', lr)] + (
                [('temperature', T)] if isinstance(self.loss_fn, losses.DistillationBasedLoss)
                else []):
            self.log_scalar(name, value, self.epoch)
        for split, metrics in (('train', trn), ('val', val)):
            for name, value in metrics.items():
                self.log_scalar(f'{split}.{name}', value, self.epoch)
        if self.epoch == 1 or self.epoch % 20 == 1 or self.parent and self.epoch == self._first:
            self.log(epoch_header(self.n_exits))
        self.log(epoch_row(self.epoch, lr, T, loss, trn, val, self.n_exits, seconds))

    def non_finite(self, bad_step):
        """The error of a training loss that turned non-finite at ``bad_step`` of this epoch."""
        return NonFiniteLossError(
            f'non-finite training loss at epoch {self.epoch + 1}, step {bad_step + 1}; '
            f'nothing of this epoch was saved and {self._last_good()}: lower the learning rate '
            'or check the data')

    def fit(self):
        """Train up to ``n_epochs`` (a ``Pack`` of this run alone); returns the last validation
        metrics, or raises what stopped it (``Pack.fit``): NonFiniteLossError,
        CheckpointWriteError, TrainingInterrupted (SIGINT, SIGTERM) or PeerLostError (torchrun),
        each saying how to resume from the last finished epoch (saved atomically in last.pt)."""
        self._pack = self._pack or Pack([self])
        val, = self._pack.fit()
        if self.error is not None:
            raise self.error from None
        return val


class Pack:
    """Runs trained together, epoch by epoch: one alone, or several of one network, optimizer,
    schedule, batch size and number of steps per epoch (``PACK_SHARED``) as one fused network
    (``multiexit.models.fused``) on one device, whose every kernel does all the runs' work.

    Each run keeps its own data (subset, order and augmentation, from its seed and cf_trn), loss
    (method, C, global_scale, temperature), validation, best snapshot, checkpoints and log, and
    trains as it would alone, up to the order of floating-point sums: its model, optimizer,
    scheduler and loss hold its part of the pack's after every epoch, so its files are those of
    a solo run. The runs start at the same epoch (``train_pack`` groups them so). Several runs
    train in one process without DDP, and without dropout (``fused.fuse`` refuses it).
    ``fused``: the fused network even for one run (what benchmarks/pack_throughput.py times as a
    pack of 1); by default one run trains as it does alone.
    """

    def __init__(self, runs, fused=False):
        self.runs = list(runs)
        lead = self.runs[0]
        self.members = len(self.runs) if len(self.runs) > 1 or fused else None
        if self.members:
            check_packable(self.runs)
            for run in self.runs:
                run.in_pack = True
            self.model = fused.fuse([run.model for run in self.runs], always=True)
            if lead.channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
            self.loss_fn = losses.PackLoss([run.loss_fn for run in self.runs]).to(lead.device)
            self.optimizer = build_optimizer(lead.settings['cf_opt'], self.model.parameters(),
                                             lead.device)
            fused.optimizer_states_from_members(self.optimizer, self.model,
                                               [run.optimizer for run in self.runs],
                                               [run.model for run in self.runs])
            self.scheduler = scheduler_at(lead.settings['cf_scheduler'], self.optimizer,
                                          lead.epoch)
            self.train_loader = fused.MemberBatches([r.train_loader for r in self.runs], 'training')
            self.val_loader = fused.MemberBatches([r.val_loader for r in self.runs], 'validation')
            self.train_loader.check()
            self.val_loader.check()
            step = self.model
        else:
            self.model, self.loss_fn, self.optimizer = lead.model, lead.loss_fn, lead.optimizer
            self.scheduler, self.train_loader = lead.scheduler, lead.train_loader
            self.val_loader = lead.val_loader
            step = lead.model
            if lead.world_size > 1:  # lead.model stays the plain module: evaluated, saved, restored
                lead.model, step = distributed.wrap(lead.model, lead.device, lead.sync_bn)
                self.model = lead.model
        # Training batches have a fixed size (the last one is dropped), so one captured graph
        # (ours, or torch.compile's with 'reduce-overhead') serves every step of an epoch.
        # DDP's gradient all-reduce is not captured: several processes train eagerly.
        graphed = (lead.cuda_graph and lead.world_size == 1
                   and lead.compile != 'reduce-overhead')
        if lead.cuda_graph and not graphed:
            lead.log('cuda_graph: not used ' + ('under torchrun (DDP)' if lead.world_size > 1 else
                                               "with compile='reduce-overhead' (its own graphs)"))
        self.T = getattr(self.loss_fn, 'temperature', None)
        self.step = build_step(step, self.loss_fn, self.optimizer, lead.n_exits,
                                     lead.acc_tops, lead.device, amp=lead.amp, T=self.T,
                                     cuda_graph=graphed, compile=lead.compile,
                                     cuda_streams=lead.cuda_streams, members=self.members)
        self.val_forward = (GraphedForward(self.model, amp=lead.amp,
                                           cuda_streams=lead.cuda_streams) if graphed else None)

    def _listed(self, result):
        """What the step or the evaluation returns, as one entry per run."""
        return result if self.members else [result]

    def _active(self):
        return [run for run in self.runs if run.error is None and run.epoch < run.n_epochs]

    def fit(self):
        """Train every run up to its ``n_epochs``; returns each run's last validation metrics
        ({} where it trained no epoch). A run whose loss turns non-finite, or whose checkpoint
        cannot be written, stops with that error in its ``error`` (nothing of that epoch saved),
        and the others go on. SIGINT and SIGTERM abandon the epoch in progress: every run still
        training gets a TrainingInterrupted whose message says how to resume it from its last
        finished epoch (saved atomically in last.pt). Under torchrun, a collective that fails
        because another process failed or stopped answering gives PeerLostError, with the same
        instructions."""
        for run in self.runs:
            run.error = None
        self.val, self.stopped_by = [{} for _ in self.runs], None
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if on_main_thread else None
        try:
            self._fit()
        except KeyboardInterrupt as e:
            self.stopped_by = str(e) or 'SIGINT'
            for run in self._active():
                run.error = TrainingInterrupted(f'{self.stopped_by} during epoch '
                                                f'{run.epoch + 1}; {run._last_good()}')
        except RuntimeError as e:
            if not distributed.is_peer_failure(e):
                raise
            for run in self._active():
                run.error = PeerLostError(f'{distributed.peer_failure(e, f" during epoch {run.epoch + 1}")}'
                                          f'; {run._last_good()}')
        finally:
            if on_main_thread:
                signal.signal(signal.SIGTERM, previous)
        return self.val

    def _fit(self):
        for run in self.runs:
            run._first = run.epoch + 1
        lead = self.runs[0]
        progress = lambda desc: (lambda it: bar(it, desc)) if lead.is_main else None
        while active := self._active():
            start = time.time()
            self.train_loader.set_epoch(active[0].epoch)
            lr = self.optimizer.param_groups[0]['lr']
            desc = f'epoch {active[0].epoch + 1}/{lead.n_epochs}'
            loss, trn, bad = map(self._listed, train_epoch(self.step, self.train_loader,
                                                           progress(desc)))
            for run, bad_step in zip(self.runs, bad):
                if run in active and bad_step is not None:
                    run.error = run.non_finite(bad_step)
            active = [run for run in active if run.error is None]
            if not active:
                break
            self.scheduler.step()  # after the epoch: epochs 0..149 at the initial lr (torch 0.4)
            for run in active:
                if self.members:  # the lr that its own optimizer's state records
                    step_without_optimizer(run.scheduler)
                run.epoch += 1
            distributed.broadcast_buffers(self.model)  # evaluate and save rank 0's BN statistics
            val = self._listed(evaluate(self.model, self.val_loader, lead.n_exits,
                                        lead.acc_tops, self.T, progress('validation'),
                                        amp=lead.amp, forward=self.val_forward))
            self._to_runs()
            for i, run in enumerate(self.runs):
                if run in active:
                    self._end_epoch(run, loss[i], trn[i], val[i], lr, time.time() - start)
                    self.val[i] = val[i]

    def _to_runs(self):
        """Every run's part of the fused weights, buffers, optimizer state and temperature into
        its own model, optimizer and loss."""
        if not self.members:
            return
        models = [run.model for run in self.runs]
        fused.load_members(self.model, models)
        fused.optimizer_states_to_members(self.optimizer, self.model,
                                         [run.optimizer for run in self.runs], models)
        for run, T in zip(self.runs, self.loss_fn.temperature.tolist()):  # host sync, per epoch
            if hasattr(run.loss_fn, 'temperature'):
                run.loss_fn.temperature.fill_(T)

    def _end_epoch(self, run, loss, trn, val, lr, seconds):
        """A run's checkpoints and log of the epoch it finished."""
        if not hasattr(run.loss_fn, 'temperature'):  # a pack's metrics have every member's
            trn.pop('adj_maxprob', None)
            val.pop('adj_maxprob', None)
        if isinstance(run.loss_fn, losses.DistillationBasedLoss):
            trn['temperature'] = val['temperature'] = run.loss_fn.T
        try:
            run._save(val)
        except CheckpointWriteError as e:
            run.error = e
            return
        run._log_epoch(loss, trn, val, lr, seconds)


def check_packable(runs):
    """ConfigError unless ``runs`` can train as one pack (``Pack``)."""
    lead = runs[0]
    if lead.world_size > 1:
        raise ConfigError('a pack trains its runs in one process: not under torchrun')
    for i, run in enumerate(runs[1:], 2):
        for key in PACK_SHARED:
            if run.settings[key] != lead.settings[key]:
                differ = _as_text(changed_settings({key: lead.settings[key]},
                                                   {key: run.settings[key]}, union=True))
                raise ConfigError(f'the runs of a pack share {key}, but run {i} differs from run '
                                  f'1 in {differ}; train them in separate packs')
        for what, mine, theirs in (('acc_tops', run.acc_tops, lead.acc_tops),
                                   ('epoch', run.epoch, lead.epoch)):
            if mine != theirs:
                raise ConfigError(f'the runs of a pack share {what}, but run {i} has {mine} and '
                                  f'run 1 {theirs}; train them in separate packs')


def train(config, run_dir, snapshot_dir, log_scalar, script, refused=lambda: None):
    """What a training script's main does with its sacred ``config``: under torchrun, join the
    process group; write the generated data set if asked; train; print a summary line; return
    the sacred result. ``run_dir``: the run folder of sacred's observer (rank 0's is used).
    ``refused`` is called when a UserError stops the run before it trained anything (bad
    input: the run leaves nothing behind)."""
    gpu = config['gpu']
    with reported_as_one_line(), distributed.process_group(gpu, config['ddp_timeout_s']):
        try:
            if isinstance(gpu, (list, tuple)):
                raise ConfigError(f'gpu={list(gpu)}: one process per GPU, under torchrun: '
                                  f'{distributed.torchrun_command(gpu, sys.argv)}')
            if distributed.env_rank() == 0:
                os.makedirs(run_dir, exist_ok=True)
            else:
                run_dir = None  # ranks other than 0 write nothing
            run = _build_run(config, run_dir, snapshot_dir, log_scalar, script)
        except UserError:
            refused()
            raise
        first = run.epoch + 1
        return summary(run, first, run.fit())


def _build_run(config, run_dir, snapshot_dir, log_scalar, script, log=print):
    if config['generate_fake_data']:
        data.build(config['cf_trn']).write_fake(config['data_dir'])
    return Run.from_config(config, run_dir, snapshot_dir, log_scalar, script, log=log)


def summary(run, first, val):
    """The line that a run ends with (to its log) and its sacred result, once it trained from
    epoch ``first`` to the end, ``val`` its last validation metrics."""
    at = f' at epoch {run.best_epoch}' if run.best_epoch is not None else ''
    run.log(f'{run.run_dir}: trained epochs {first} to {run.epoch}; best validation top-1 '
            f'(mean over exits) {100 * run.best_val:.2f} %{at}; evaluate it with: '
            f'python3 eval.py with snapshot_name={run.run_dir}')
    return {'epoch': run.epoch, 'best_epoch': run.best_epoch, 'best_val_acc1_avg': run.best_val,
            **{f'val.{k}': v for k, v in val.items()}}


def train_pack(configs, run_dirs, snapshot_dir, logs, log_scalars, script):
    """What the pack script does with the sacred ``configs`` of its runs (``run_dirs``: their
    run folders; ``logs``, ``log_scalars``: where each one's output and metrics go): build them
    all, then train those at the same epoch as one ``Pack``, one pack after another. Returns
    the Runs, each with its sacred ``result``, or the ``error`` that stopped it. A UserError
    while building (bad input, before anything trained) is raised: the pack does not start.

    SIGINT and SIGTERM stop every run, as they stop a solo run (TrainingInterrupted, with how
    to resume it); a run that had not started is stopped before its next epoch."""
    runs = []
    for config, run_dir, log, log_scalar in zip(configs, run_dirs, logs, log_scalars):
        os.makedirs(run_dir, exist_ok=True)
        runs.append(_build_run(config, run_dir, snapshot_dir, log_scalar, script, log=log))
    first, val = [run.epoch + 1 for run in runs], {}
    packs = [Pack([run for run in runs if run.epoch == epoch])  # all checked before any trains
             for epoch in sorted({run.epoch for run in runs})]
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for group in packs:
            val.update(zip(map(id, group.runs), group.fit()))
            if group.stopped_by:
                raise KeyboardInterrupt(group.stopped_by)
    except KeyboardInterrupt as e:  # the runs that had not started yet
        for run in runs:
            if run.error is None and run.epoch < run.n_epochs:
                run.error = TrainingInterrupted(f'{str(e) or "SIGINT"} before epoch '
                                                f'{run.epoch + 1}; {run._last_good()}')
    finally:
        signal.signal(signal.SIGTERM, previous)
    for run, start in zip(runs, first):
        run.result = None if run.error else summary(run, start, val[id(run)])
    return runs


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def epoch_header(n_exits):
    exits = ' '.join(f'{k:>5}' for k in range(n_exits))
    return ('accuracies in %; trn@1, val@1 and val@5: the mean over the exits\n'
            f"{'ep':>4} {'lr':>7} {'T':>6} {'loss':>8} {'trn@1':>6} {'val@1':>6} {'val@5':>6} | "
            f'val top-1 of exit {exits} | {"s":>5}')


def epoch_row(ep, lr, T, loss, trn, val, n_exits, seconds):
    exits = ' '.join(f"{100 * val[f'acc1_clf{k}']:5.1f}" for k in range(n_exits))
    T = f'{T:6.2f}' if T is not None else f"{'-':>6}"
    return (f"{ep:>4} {lr:7.4f} {T} {loss:8.4f} {100 * trn['acc1_avg']:6.2f} "
            f"{100 * val['acc1_avg']:6.2f} {100 * val.get('acc5_avg', float('nan')):6.2f} | "
            f"{'':17} {exits} | {seconds:5.1f}")
