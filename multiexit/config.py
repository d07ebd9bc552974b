"""Every training setting, written once: its name, its check, and for the settings that every
training script shares, its default and the comment that ``print_config`` shows.

``TrainConfig`` is what a run is built from (``train.run.Run``); it checks itself when made.
What derives from it: the shared settings of the sacred scripts (``shared_defaults``,
``shared_docs``), their check before a run starts (``TrainConfig.check``), the settings a resume
compares with its parent's (``RUN_SETTINGS``) and those the runs of a pack share
(``PACK_SHARED``). The settings without a default here (the network, loss, data, optimizer,
schedule, batch sizes, epochs and data folder) get theirs, and their comments, from each training
script's config: they differ between CIFAR and ImageNet.

The defaults of the CUDA speed switches are what a GPU measured (``accel.cuda_defaults``: on
only where a committed decision names the measurement; otherwise off, opt-in).

``PAPER_NET`` is the paper's MsdNet for CIFAR-100 (reference README section 1).
"""
import dataclasses

import torch

from . import checks
from .accel import cuda_defaults
from .checks import (DATA, LOSS, NET, OPT, PATH, REGIME, SCHEDULER, SWITCH, Section, integer,
                     number, one_of)
from .errors import ConfigError

PAPER_NET = dict(  # the paper's MsdNet (5,067,588 parameters, 11 exits)
    call='MsdNet',
    in_shape=32,  # input size: 32 (CIFAR) or 224 (ImageNet stem, with n_scales=4)
    out_dim=100,  # number of classes
    n_scales=3,  # feature scales: 32x32, 16x16, 8x8
    n_exits=11,  # classifiers, one after each block
    nlayers_to_exit=4,  # layers in the first block
    nlayers_between_exits=2,  # layers in every later block
    nplanes_mulv=[6, 12, 24],  # channel multiplier per scale
    nplanes_addh=1,  # growth of the base width per layer
    nplanes_init=1,  # base width of the first layer
    prune='min',  # scale pruning: 'min' (drop the finest scales at the very end), 'max' or None
    plane_reduction=0.5,  # width factor of the two transition layers (0 = none)
    exit_width=128,  # channels of the exit heads' convs
    btneck_widths=[4, 4, 4],  # bottleneck factor per scale
)


def setting(rule=None, doc=None, default=dataclasses.MISSING, script=False, packed=False):
    """A field of TrainConfig. ``rule``: its check (``multiexit.checks``); ``doc``: its comment
    in print_config, for the settings that every script shares (those with a ``default``);
    ``script``: read by the scripts alone (not part of what a run is built from, nor of what a
    resume compares); ``packed``: the runs of a pack must agree on it (one network, optimizer,
    schedule and loop). A dict ``default`` is copied for each TrainConfig."""
    metadata = dict(rule=rule, doc=doc, script=script, packed=packed)
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


DECIDED = cuda_defaults.load()  # the measured decisions of the CUDA speed switches


def measured(name, rule, doc):
    """A CUDA speed switch of TrainConfig (shared, packed): its default is the measured decision
    on ``name`` (off, False, where there is none or it says off), and its comment says where
    that comes from."""
    return setting(rule, f'{doc}; {cuda_defaults.where_from(DECIDED, name)}',
                   cuda_defaults.default(DECIDED, name), packed=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of one training run, checked when made (``check``)."""
    # each training script's own, with its defaults and comments
    cf_net: dict = setting(Section(NET), packed=True)
    cf_loss: dict = setting(Section(LOSS))
    cf_trn: dict = setting(Section(DATA))
    cf_val: dict = setting(Section(DATA))
    cf_opt: dict = setting(Section(OPT), packed=True)
    cf_scheduler: dict = setting(Section(SCHEDULER), packed=True)
    batch_size: int = setting(integer(1), packed=True)
    val_batch_size: int = setting(integer(1), packed=True)
    n_epochs: int = setting(integer(1), packed=True)
    data_dir: str = setting(PATH)
    seed: int = setting()  # sacred's: drawn for each run unless given
    # every training script's, with these defaults and comments
    gpu: int = setting(
        None, 'CUDA device ordinal; -1 = CPU (torchrun: 0 or -1)',
        0 if torch.cuda.is_available() else -1, packed=True)
    snapshot_name: str = setting(
        None, 'a name for this run; eval.py finds its snapshots by it', 'test:0', script=True)
    parent_snapshot: str = setting(
        None, 'resume from a run id, snapshot name or checkpoint path (None: fresh)', None,
        script=True)
    generate_fake_data: bool = setting(
        SWITCH, "write a small generated data set of cf_trn's kind to data_dir if absent", False,
        script=True)
    cf_regime: dict = setting(
        Section(REGIME),
        "which parameters train when (Kubaty et al.): 'joint' (all, always); 'disjoint' or "
        "'mixed' with backbone_epochs=N (epochs, or a share of n_epochs, e.g. 0.5): the first N "
        'of n_epochs train the backbone and last exit alone (cross-entropy of the last exit), '
        'the rest the early exits alone on the frozen backbone (disjoint) or all (mixed); each '
        'phase starts a fresh optimizer state and runs cf_scheduler from cf_opt.lr, its epoch '
        'counts (milestones, step_size, T_max) scaled by its share of n_epochs',
        dict(call='joint', backbone_epochs=None), packed=True)
    save_interval: int = setting(
        integer(0), '0: keep the snapshot with the best validation acc1_avg; N: every N epochs', 0)
    amp: bool = measured(
        'amp', SWITCH,
        'CUDA: bf16 autocast of forward and loss (weights stay fp32); ignored on CPU')
    channels_last: bool = measured(
        'channels_last', SWITCH,
        'CUDA: NHWC memory format for model and batches; ignored on CPU')
    compile: object = measured(
        'compile', one_of(*checks.COMPILE_MODES),
        "CUDA: torch.compile mode ('default', 'max-autotune', 'reduce-overhead')")
    cuda_graph: bool = measured(
        'cuda_graph', SWITCH, 'CUDA: replay the whole training step as one captured CUDA graph')
    cuda_streams: bool = measured(
        'cuda_streams', SWITCH,
        "CUDA, one process: MsdNet's scales and exit heads on parallel streams")
    deterministic: bool = setting(
        SWITCH, 'CUDA: deterministic algorithms, for bit-exact reruns (slower)', False,
        packed=True)
    cudnn_benchmark: bool = measured(
        'cudnn_benchmark', SWITCH,
        "CUDA: time cuDNN's algorithms per conv shape (MsdNet has ~100 shapes)")
    sync_bn: bool = setting(
        SWITCH, "torchrun: BatchNorm statistics of the global batch, not each process's part",
        False)
    ddp_timeout_s: float = setting(
        number(0, low_open=True),
        'torchrun: a process waiting this long for the others fails the job', 600, script=True)

    def __post_init__(self):
        for name, value in vars(self).items():
            object.__setattr__(self, name, checks.plain(value))
        self.check(vars(self))

    @classmethod
    def of(cls, config):
        """The TrainConfig of a training script's sacred ``config`` (which has more keys)."""
        return cls(**{f.name: config[f.name] for f in FIELDS})

    @staticmethod
    def check(config):
        """ConfigError for the first bad value of the settings that ``config`` (a dict, perhaps
        with only some of them) holds, then for the values that must agree with each other."""
        for f in FIELDS:
            if f.name in config and f.metadata['rule'] is not None:
                checks.check_value(f.name, config[f.name], f.metadata['rule'])
        if 'cf_regime' in config and 'n_epochs' in config:
            checks.check_phases(config['cf_regime'], config['n_epochs'])
        trn = config.get('cf_trn', {})
        if (trn.get('n_per_class') is not None
                and trn.get('nval_per_class', 0) >= trn['n_per_class']):
            raise ConfigError(f"cf_trn.nval_per_class={trn['nval_per_class']} must be below "
                              f"cf_trn.n_per_class={trn['n_per_class']}: the validation images "
                              'are drawn from those of each class, the rest are for training')
        if trn.get('n_unl_per_class') and not any(trn.get('lab_unl_ratio') or ()):
            raise ConfigError(f"cf_trn.n_unl_per_class={trn['n_unl_per_class']} needs "
                              "cf_trn.lab_unl_ratio=[r_lab, r_unl], e.g. '[1, 1]': how many "
                              'labelled and unlabelled images an epoch interleaves')

    def run_settings(self):
        """{name: value} of what the run is built from: what a resume compares."""
        return {name: getattr(self, name) for name in RUN_SETTINGS}


FIELDS = dataclasses.fields(TrainConfig)
RUN_SETTINGS = tuple(f.name for f in FIELDS if not f.metadata['script'])
PACK_SHARED = tuple(f.name for f in FIELDS if f.metadata['packed'])
SHARED = tuple(f.name for f in FIELDS if f.default is not dataclasses.MISSING
               or f.default_factory is not dataclasses.MISSING)


def shared_defaults():
    """{name: default} of the settings that every training script has."""
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in FIELDS if f.name in SHARED}


def shared_docs():
    """{name: comment} of the settings that every training script has."""
    return {f.name: f.metadata['doc'] for f in FIELDS if f.name in SHARED}


def changed_settings(old, new, union=False):
    """[(dotted key, old value, new value)] of the settings that differ: of the keys that both
    have, or with ``union`` of either (None where one lacks it)."""
    old, new = _flat(checks.plain(old)), _flat(checks.plain(new))
    keys = sorted(set(old) | set(new)) if union else sorted(set(old) & set(new))
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def as_text(changes):
    """``changed_settings`` as one line."""
    return '; '.join(f'{k} {old!r} -> {new!r}' for k, old, new in changes)


def _flat(tree, prefix=''):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out
