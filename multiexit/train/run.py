"""One training run, built from its settings: data, model, loss, optimizer, schedule, loaders,
checkpoints and log, resumed where its settings say so (``train.resume``).

A Run holds state and ends epochs; ``train.loop.fit`` trains it, alone (``Solo``) or with
others of one network as a pack (``train.pack.PackedRuns``).
"""
import os
import re
import warnings
from pathlib import Path

import torch

from .. import data, losses, models, registry
from ..accel import distributed
from ..checks import classes
from ..data.order import check_divisible
from ..errors import CheckpointWriteError, ConfigError, NonFiniteLossError
from ..metrics import check_tops, default_tops
from . import regime, resume
from .checkpoint import Checkpointer, model_snapshot
from .log import EpochLog
from .rng import rng_state

FUSED = ('SGD', 'Adam', 'AdamW')  # optimizers with a fused CUDA implementation


class Run:
    """One training run of ``cfg`` (a ``config.TrainConfig``) into ``run_dir``: ``epoch`` is how
    many it has trained, ``error`` what stopped its last training, if anything did.

    The data come from the data set that ``cf_trn['call']`` names (``multiexit.data``), in
    ``data_dir``; ``cf_net['out_dim']=None`` takes its number of classes. Under
    torch.distributed every rank builds a Run with the same settings and trains the same model
    on its part of every batch (DDP, ``Solo``); rank 0's seed and ``run_dir`` are used by all
    (``run_dir`` may be None elsewhere), and only rank 0 logs and writes checkpoints. A parent
    snapshot (``cfg.parent_snapshot``, found in ``snapshot_dir``) is resumed with this run's
    settings (``train.resume``). ``records()`` writes the run's log and metrics to its files
    (``train.log.EpochLog``). ``cfg.cf_regime`` says which parameters train in which epochs
    (``train.regime``): ``scheduler`` enters its phases, and ``train_loss``, what the step
    trains on, is ``loss_fn`` but in a phase that trains the backbone alone."""

    def __init__(self, cfg, run_dir, snapshot_dir='snapshots', log=print, log_scalar=None,
                 records=None):
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        check_divisible(cfg.batch_size, self.world_size)
        # rank 0's for all: a seed sacred drew differs per process; only rank 0 has a run dir
        seed, run_dir = distributed.from_main((cfg.seed, str(run_dir)))
        self.n_epochs, self.run_dir = cfg.n_epochs, Path(run_dir)
        self.log = log if self.is_main else (lambda *a: None)
        self.device = resolve_device(cfg.gpu)
        self._set_up_device(cfg)
        # Configuration first, data last: a bad value is reported before any work is done.
        trn_data, val_data = data.build(cfg.cf_trn, 'trn'), data.build(cfg.cf_val, 'val')
        if cfg.cf_val.get('call') != cfg.cf_trn.get('call'):
            raise ConfigError(f"cf_val call={cfg.cf_val.get('call')!r} differs from cf_trn "
                              f"call={cfg.cf_trn.get('call')!r}: validation is carved from the "
                              'training set')
        n_classes = trn_data.n_classes(cfg.data_dir)
        out_dim = cfg.cf_net.get('out_dim')
        if out_dim is not None and out_dim != n_classes:
            raise ConfigError(f"cf_net out_dim={out_dim} but {cfg.cf_trn['call']} has "
                              f'{n_classes} classes')
        self.cf_net = dict(cfg.cf_net, out_dim=n_classes)  # None: as many as the data set has
        self.cfg, self.seed = cfg, seed  # the settings as given (what a resume compares)
        torch.manual_seed(seed)
        self.model = models.build(self.cf_net).to(self.device)
        in_shape = getattr(self.model, 'in_shape', trn_data.input_size)
        if in_shape != trn_data.input_size:
            raise ConfigError(f'cf_net in_shape={in_shape} but cf_trn gives images of '
                              f'{trn_data.input_size}x{trn_data.input_size}')
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.n_exits = len(self.model.exits)
        self.loss_fn = self._build_loss(cfg, n_classes)
        self.acc_tops = tuple(self.loss_fn.acc_tops)
        self.optimizer = build_optimizer(cfg.cf_opt, self.model.parameters(), self.device)
        parent = (resume.Parent(cfg.parent_snapshot, snapshot_dir, self.cf_net)
                  if cfg.parent_snapshot else None)
        self.parent_path = parent.path if parent else None  # the checkpoint it resumed from
        if self.rank:
            torch.manual_seed(seed + self.rank)  # dropout: other masks than rank 0's
        self.epoch, self.error = 0, None
        self.checkpointer = Checkpointer(self.run_dir, cfg.save_interval, writes=self.is_main)
        if parent:
            resume.restore(self, parent)
        self.scheduler, self.train_loss = phased_schedule(cfg, self.model, self.optimizer,
                                                          self.loss_fn, self.epoch)
        self.epoch_log = EpochLog(self.log, log_scalar if self.is_main else None, self.n_exits,
                                  first_epoch=self.epoch + 1 if parent else 1,
                                  records=records if self.is_main else None)
        self._build_loaders(cfg, trn_data, val_data)
        # the RNG states after the build: what a member of a pack saves, which draws no random
        # numbers but its loaders' (no dropout) while the live states are another member's
        self.rng_at_build = rng_state()

    def _set_up_device(self, cfg):
        cuda = self.device.type == 'cuda'
        if cfg.deterministic:  # bit-exact reruns and resumes on one GPU, at some cost in speed
            os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = cuda and cfg.cudnn_benchmark and not cfg.deterministic
        # CUDA only: on the CPU, fp32 eager is both the faithful and the fastest path.
        self.amp, self.channels_last = cfg.amp and cuda, cfg.channels_last and cuda
        self.compile, self.cuda_graph = cfg.compile if cuda else False, cfg.cuda_graph and cuda
        # parallel streams in one process (DDP's gradient hooks are left on one stream)
        self.cuda_streams = cfg.cuda_streams and cuda and self.world_size == 1

    def _build_loss(self, cfg, n_classes):
        cf_loss = dict(cfg.cf_loss)
        if cf_loss.get('n_exits') is None:  # None: as many as the model has
            cf_loss['n_exits'] = self.n_exits
        if cf_loss.get('acc_tops') is None:
            cf_loss['acc_tops'] = default_tops(n_classes)
        loss_fn = losses.build(cf_loss).to(self.device)
        check_tops(tuple(loss_fn.acc_tops), n_classes, cfg.cf_trn['call'])
        if loss_fn.n_exits != self.n_exits:
            raise ConfigError(f'cf_loss n_exits={loss_fn.n_exits} but the model has '
                              f'{self.n_exits} exits (cf_net)')
        return loss_fn

    def _build_loaders(self, cfg, trn_data, val_data):
        shard = dict(rank=self.rank, world_size=self.world_size,
                     channels_last=self.channels_last)
        with distributed.local_main_first():  # one download per machine
            self.train_loader = trn_data.loader('train', cfg.data_dir, cfg.batch_size,
                                                self.device, seed=self.seed, **shard)
        self.val_loader = val_data.loader('val', cfg.data_dir, cfg.val_batch_size, self.device,
                                          **shard)
        if len(self.train_loader) == 0:
            raise ConfigError(f'batch_size={cfg.batch_size} exceeds the '
                              f'{len(self.train_loader.labels)} training examples: no full '
                              'batch per epoch')

    @property
    def training(self):
        """Whether the run has epochs left to train and nothing stopped it."""
        return self.error is None and self.epoch < self.n_epochs

    def training_state(self, rng, rng_ranks=None):
        """Everything to continue exactly, ``rng`` the RNG states to continue from;
        ``rng_ranks``: every rank's under DDP. The model's keys have no DDP ``module.`` prefix."""
        return {'format': 'multiexit-train-1', 'epoch': self.epoch, 'cf_net': self.cf_net,
                'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scheduler': self.scheduler.state_dict(), 'loss': self.loss_fn.state_dict(),
                'seed': self.seed, 'best_val': self.checkpointer.best_val,
                'best_epoch': self.checkpointer.best_epoch, 'rng': rng,
                **({'rng_ranks': rng_ranks} if rng_ranks else {})}

    def end_epoch(self, loss, trn, val, lr, seconds, rng, rng_ranks=None):
        """The log, then the checkpoints, of the epoch the run just finished (``epoch``), or
        ``error`` if a checkpoint could not be written. In this order, the run's records
        (metrics.json, cout.txt) hold every epoch that a checkpoint holds, whenever the process
        is killed: at worst one more, which a resume trains again."""
        annealed = isinstance(self.loss_fn, losses.DistillationBasedLoss)
        if annealed:
            trn['temperature'] = val['temperature'] = self.loss_fn.T
        self.epoch_log.epoch(self.epoch, lr, loss, trn, val, seconds,
                             T=getattr(self.loss_fn, 'T', None), annealed=annealed)
        try:
            self.checkpointer.save(
                self.epoch, val, lambda: self.training_state(rng, rng_ranks),
                lambda: model_snapshot(self.model, self.cf_net, self.epoch, val))
        except CheckpointWriteError as e:
            self.error = e

    def non_finite(self, bad_step):
        """The error of a training loss that turned non-finite at ``bad_step`` of this epoch."""
        return NonFiniteLossError(
            f'non-finite training loss at epoch {self.epoch + 1}, step {bad_step + 1}; '
            'nothing of this epoch was saved and ', *self.checkpointer.resume_parts(),
            ': lower the learning rate or check the data')


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


def build_optimizer(cf_opt, params, device):
    """The optimizer of ``cf_opt`` over ``params``; on CUDA, the fused implementation of those
    that have one, unless cf_opt chooses."""
    if device.type == 'cuda' and cf_opt.get('call') in FUSED and not {'fused', 'foreach'} & set(
            cf_opt):
        cf_opt = dict(cf_opt, fused=True)  # one kernel for the whole update
    return registry.build(classes('cf_opt'), cf_opt, 'opt', params)


def phased_schedule(cfg, model, optimizer, loss_fn, epoch):
    """(scheduler, training loss) of ``cfg``'s regime (``train.regime``) at ``epoch``, for
    ``model`` (a run's, or a pack's fused one), ``optimizer`` over its parameters and
    ``loss_fn``: ``scheduler_at`` and ``loss_fn`` themselves for the joint regime."""
    return regime.phased(cfg.cf_regime, cfg.n_epochs, cfg.cf_scheduler, scheduler_at, model,
                         optimizer, loss_fn, epoch)


def scheduler_at(cf_scheduler, optimizer, epoch):
    """The scheduler of ``cf_scheduler`` stepped through ``epoch`` epochs from cf_opt's lr:
    the learning rate these settings give the epoch that a run starts or resumes at."""
    scheduler = registry.build(classes('cf_scheduler'), cf_scheduler, 'scheduler', optimizer)
    for _ in range(epoch):
        step_without_optimizer(scheduler)
    return scheduler


def step_without_optimizer(scheduler):
    """``scheduler.step()`` of an optimizer that did not step (yet)."""
    with warnings.catch_warnings():  # torch warns of scheduler steps without optimizer steps
        warnings.filterwarnings('ignore', re.escape('Detected call of `lr_scheduler.step()`'))
        scheduler.step()
