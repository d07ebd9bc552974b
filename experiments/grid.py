"""The paper's study as one command: training methods x training-set sizes x seeds, every cell
an ordinary train_cifar.py (or, with ``--data imagenet``, train_imagenet.py) run whose best
snapshot eval.py tests, summarised as a table and a figure.

    python3 -m experiments.grid                  # 3 methods x 5 sizes x 3 seeds, 300 epochs each
    python3 -m experiments.grid --semisup        # and DBT with unlabelled images
    python3 -m experiments.grid --quick          # the whole pipeline on generated data, CPU
    python3 -m experiments.grid --dry-run        # which cells are done and what would run
    python3 -m experiments.grid -- gpu=1         # config updates after -- go to every training run
    python3 -m experiments.grid --data imagenet  # standard and DBT on all of ImageNet (MSDNet's)
    python3 -m experiments.grid --jobs 8         # 8 cells at a time, one per GPU of this machine
    python3 -m experiments.grid --pack auto      # on a GPU: the 9 cells of each size as one
                                                 #   fused network (train_pack.py)
    python3 -m experiments.grid --quick --pack 2  # packs of 2 cells, here on the CPU
    python3 -m experiments.grid --cluster slurm --partition gpu   # a SLURM job array; the plain
                                                 #   command collects later

A cell trains on ``size`` images per class plus ``nval`` validation images per class
(``cf_trn.n_per_class = size + nval``; ``cf_val`` follows ``cf_trn``); size ``all``: every
training image but the validation ones (``cf_trn.n_per_class=None``). Grid seed s sets both
``cf_trn.seed`` (the class permutation and which images form the subset) and sacred's ``seed``
(initialisation, data order, augmentation): seeds repeat the experiment on other data subsets,
and the methods of one seed share subset and initialisation, so their differences are paired.
The semi-supervised cells (``--semisup``: the ``semisup`` named config) leave the rest of each
class's training images unlabelled.

Each cell is a run named ``<prefix>/<method>/n<size>/s<seed>`` in the snapshots folder, done,
resumed or tested as far as it is missing (``cells.run_unit``), so an interrupted grid continues
where it stopped when started again. Cells run one after another with their output on the
terminal; with ``--jobs N``, up to N at once, each with its log in ``<out>/logs/``
(``local.py``); with ``--cluster``, as tasks of a job array (``cluster.py``). With ``--pack K``,
up to K cells that differ only in method and seed (one size, network and settings) train
together as one pack (``cells.Pack``: one train_pack.py process, one fused network whose every
kernel does the K runs' work, each cell still a training run of its own); ``--pack auto``: all
such cells in one pack where the training runs on a GPU, none on the CPU (which gains nothing:
it is bound by the arithmetic, not by kernel launches). A pack is a unit of ``--jobs`` (one per
GPU) and a task of ``--cluster``. Grids that share a snapshots folder at the same time must have
disjoint cells.

Writes to ``--out`` (results/), after every cell that ran and at the end, ``<name>.md`` (test
top-1 per exit in %, mean ± std over seeds, and the difference of every method to standard
training, paired by seed), ``<name>.csv`` (one row per run and exit, accuracies as fractions)
and ``<name>.png`` (accuracy per exit, one panel per training-set size, one line per method),
each saying what it covers (data set, network, epochs, seeds). The name tells the grids apart
(``output_name``: results/grid.md for the full CIFAR-100 grid, results/grid-quick.md for
--quick, results/grid_standard+dbt_n25+50.md for ``--methods standard dbt --sizes 25 50``, ...),
so that no grid overwrites another's results. It leaves the seeds out: the rows are every
finished cell of the snapshots folder with these methods, sizes and settings, whatever the
seeds asked for, so that ``--seeds 1`` after ``--seeds 0`` writes one table of both.

An error that every cell would repeat (the data set missing, a wrong setting after --) stops
the grid at once with that line (``schedule.py``).
"""
import argparse
import hashlib
import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # python3 experiments/grid.py: the repository is not on the module path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from experiments import cluster, local, tables  # noqa: E402
from experiments.cells import (DEVICE_KEYS, Cell, Stop, cell_error, load, log_path,  # noqa: E402
                               packed, run_unit, state)
from experiments.schedule import Schedule  # noqa: E402
from multiexit.errors import EXIT_CODE_INTERRUPTED, ConfigError, reported_as_one_line  # noqa: E402

EXIT_CELLS_FAILED = 1


@dataclass(frozen=True)
class Method:
    label: str  # in the table and the figure
    settings: tuple  # config updates of the training script
    named_configs: tuple = ()
    unlabelled: bool = False  # the rest of each class's training images, without labels
    min_epochs: int = 1  # a regime's phases need an epoch each


METHODS = {
    'standard': Method('standard', ('cf_loss.call=ClassificationOnlyLoss',)),
    'dbt': Method('DBT', ('cf_loss.call=DistillationBasedLoss',)),
    'const_t4': Method('distillation, T=4',
                       ('cf_loss.call=DistillationLossConstTemp', 'cf_loss.T=4.0')),
    'semisup': Method('DBT + unlabelled', ('cf_loss.call=DistillationBasedLoss',), ('semisup',),
                      unlabelled=True),
    # Kubaty et al.'s baselines
    'distill_later': Method('distillation from later exits',
                            ('cf_loss.call=DistillationFromLaterExits',)),
    'distill_next': Method('distillation from the next exit',
                           ('cf_loss.call=DistillationFromNextExit',)),
    # Li et al.: Gradient Equilibrium with the exits' cross-entropies (their main_GE.py), and
    # IMTA in one run, GE with their distillation
    'ge': Method('Gradient Equilibrium', ('cf_net.gradient_equilibrium=True',
                                          'cf_loss.call=ClassificationOnlyLoss')),
    'imta': Method('IMTA (GE + one-for-all distillation)',
                   ('cf_net.gradient_equilibrium=True', 'cf_loss.call=IMTADistillation')),
    # Yu et al.'s boosted exits (models.boosted) on a GE MsdNet, as their CIFAR-100 scripts
    'boosted': Method('boosted', ('cf_loss.call=ClassificationOnlyLoss',
                                  'cf_net.boost_reweight=0.5',
                                  'cf_net.gradient_equilibrium=True')),
    # Kaya et al.'s weighted cross-entropy, its weights growing over the epochs
    'sdn': Method('SDN weighted cross-entropy', ('cf_loss.call=SdnWeightedLoss',)),
    # Kubaty et al.'s training regimes, with standard training's loss: the first half of the
    # epochs trains the backbone and last exit, the second the early exits on the frozen
    # backbone (disjoint) or everything (mixed)
    'disjoint': Method('disjoint (backbone, then early exits)', (
        'cf_loss.call=ClassificationOnlyLoss', 'cf_regime.call=disjoint',
        'cf_regime.backbone_epochs=0.5'), min_epochs=2),
    'mixed': Method('mixed (backbone, then all)', (
        'cf_loss.call=ClassificationOnlyLoss', 'cf_regime.call=mixed',
        'cf_regime.backbone_epochs=0.5'), min_epochs=2),
}


ALL = tables.ALL


@dataclass(frozen=True)
class Preset:
    named_configs: tuple
    methods: tuple
    sizes: tuple  # training images per class, or ALL
    nval: int  # validation images per class
    images_per_class: int  # in the training set; None: it varies (ImageNet: 732 to 1300)
    seeds: tuple
    epochs: int
    prefix: str  # of the snapshot names
    script: str = 'train_cifar.py'


PRESETS = {  # (--data, --quick) -> Preset
    ('cifar100', False): Preset((), ('standard', 'dbt', 'const_t4'), (25, 50, 100, 250, 450),
                                50, 500, (0, 1, 2), 300, 'grid'),
    # the smoke network on the generated data set, which has 30 training images per class
    ('cifar100', True): Preset(('smoke',), ('standard', 'dbt'), (10, 20), 5, 30, (0,), 1,
                               'grid-quick'),
    # not in the paper's grid, which is CIFAR-100's: its ImageNet comparison (standard and DBT
    # on the whole training set) with train_imagenet.py's defaults (MSDNet step 4, 90 epochs)
    ('imagenet', False): Preset((), ('standard', 'dbt'), (ALL,), 50, None, (0,), 90,
                                'grid-imagenet', 'train_imagenet.py'),
    # the tiny MSDNet on train_imagenet.py's generated JPEGs: 10 training images per class
    ('imagenet', True): Preset(('smoke',), ('standard', 'dbt'), (4, 8), 2, 10, (0,), 1,
                               'grid-imagenet-quick', 'train_imagenet.py'),
}


def size_arg(text):
    """--sizes: a positive number of images per class, or all."""
    if text == ALL:
        return ALL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: a number of images per class, or '
                                         f'{ALL}') from None


def plan(preset, methods, sizes, seeds, epochs, extra=()):
    """The cells, method by method, size by size, seed by seed. ``extra``: what was given after
    -- (named configs and key=value updates), added to every cell."""
    for size in sizes:
        if size != ALL and (size <= 0 or preset.images_per_class is not None
                            and size + preset.nval > preset.images_per_class):
            raise ConfigError(f'size {size}: need 0 < size and size + {preset.nval} validation '
                              f'images <= the {preset.images_per_class} training images per class')
    if any(seed < 0 for seed in seeds) or epochs <= 0:
        raise ConfigError(f'seeds must be >= 0 and epochs > 0, got seeds={list(seeds)}, '
                          f'epochs={epochs}')
    extra_named = tuple(u for u in extra if '=' not in u)
    extra_updates = tuple(u for u in extra if '=' in u)
    cells = []
    for method in methods:
        m = METHODS[method]
        for size in sizes:
            n_unl = (preset.images_per_class - size - preset.nval
                     if m.unlabelled and size != ALL else 0)
            if m.unlabelled and n_unl == 0:
                print(f'{method} at size {size}: no training images left to leave unlabelled; '
                      f'skipped')
                continue
            n_per_class = None if size == ALL else size + preset.nval
            for seed in seeds:
                name = f'{preset.prefix}/{method}/n{size}/s{seed}'
                settings = (f'snapshot_name={name}', f'seed={seed}', f'cf_trn.seed={seed}',
                            f'cf_trn.n_per_class={n_per_class}',
                            f'cf_trn.nval_per_class={preset.nval}',
                            f'cf_trn.n_unl_per_class={n_unl}', *m.settings, f'n_epochs={epochs}')
                own = {u.partition('=')[0] for u in settings}
                for update in extra_updates:
                    if update.partition('=')[0] in own:
                        raise ConfigError(f'{update!r} after --: the grid sets that itself (use '
                                          f'--epochs, --sizes, --seeds or --methods)')
                cells.append(Cell(method, size, seed, name,
                                  preset.named_configs + m.named_configs + extra_named,
                                  settings + extra_updates, preset.script))
    return cells


def grid_epochs(epochs, preset, methods):
    """The epochs of every cell: ``epochs`` (--epochs), else the preset's, raised to what the
    methods need (--quick's 1 epoch cannot hold a regime's two phases: its grid trains every
    cell 2, so that the methods compare at the same length)."""
    need = max(METHODS[m].min_epochs for m in methods)
    short = [m for m in methods if METHODS[m].min_epochs > (epochs or preset.epochs)]
    if epochs is not None and short:
        raise ConfigError(f'--epochs {epochs}: {" and ".join(short)} train in two phases of at '
                          f'least an epoch each; give --epochs {need} or more')
    if epochs is None and short:
        print(f'{" and ".join(short)} train in two phases: {need} epochs for every cell, not '
              f'{preset.epochs}', flush=True)
    return epochs if epochs is not None else max(preset.epochs, need)


def output_name(preset, methods, sizes, epochs, extra=()):
    """The name of a grid's table, CSV and figure (<out>/<name>.md, .csv, .png): the prefix of
    its snapshot names (the data set and --quick), then its methods, sizes and epochs where they
    are not the preset's, and the config updates given after -- (gpu= aside). Not its seeds:
    a grid over more seeds of the same cells writes the same files, with every seed."""
    parts = [preset.prefix]
    methods = [m for m in METHODS if m in methods]
    if methods != [m for m in METHODS if m in preset.methods]:
        parts.append('+'.join(methods))
    sizes = sorted(sizes, key=tables.size_key)
    if sizes != sorted(preset.sizes, key=tables.size_key):
        parts.append('n' + '+'.join(map(str, sizes)))
    if epochs != preset.epochs:
        parts.append(f'{epochs}ep')
    updates = '+'.join(u for u in extra if u.partition('=')[0] not in DEVICE_KEYS)
    if updates:
        slug = re.sub(r'[^\w.=+-]', '-', updates)
        parts.append(slug if len(slug) <= 60 else
                     f'{slug[:40]}-{hashlib.sha1(updates.encode()).hexdigest()[:8]}')
    return '_'.join(parts)


def seeds_done(table, preset, methods, sizes):
    """The seeds of the training runs of the snapshots folder named as cells of these methods
    and sizes (whether they are this grid's cells, ``state`` tells)."""
    train = table[table['experiment'] == Path(preset.script).stem] if len(table) else table
    names = {f'{preset.prefix}/{m}/n{size}' for m in methods for size in sizes}
    seeds = set()
    for name in train.get('snapshot_name', pd.Series(dtype=object)).dropna().astype(str):
        cell, _, seed = name.rpartition('/s')
        if cell in names and seed.isdigit():
            seeds.add(int(seed))
    return seeds


def pack_arg(text):
    """--pack: a number of cells per pack, or auto."""
    if text == 'auto':
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: a number of cells per pack, or '
                                         'auto') from None


def pack_size(pack, extra, gpus):
    """Cells per pack: ``pack`` (--pack), where auto is all that can share one when the runs
    train on a GPU (``gpus``) and 1 on the CPU (None: all)."""
    if pack != 'auto':
        return pack
    return None if gpus and not any(u in ('gpu=-1', 'gpu=None') for u in extra) else 1


def parse_args(argv):
    """(options, config updates given after --)."""
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(
        prog='python3 -m experiments.grid',
        description='Train and test the paper\'s grid of methods x training-set sizes x seeds; '
                    'cells already done are skipped. Config updates after -- go to every '
                    'training run (e.g. -- gpu=1).')
    parser.add_argument('--data', choices=('cifar100', 'imagenet'), default='cifar100',
                        help='cifar100 (default): the paper\'s grid with train_cifar.py; '
                             'imagenet: standard and DBT on all of it with train_imagenet.py')
    parser.add_argument('--quick', action='store_true',
                        help='the smoke network on generated data, 1 epoch (CIFAR: sizes 10 '
                             'and 20; ImageNet: 4 and 8)')
    parser.add_argument('--semisup', action='store_true',
                        help='add DBT with the rest of the training images unlabelled')
    parser.add_argument('--methods', nargs='+', choices=sorted(METHODS),
                        help='instead of the preset\'s (full: standard dbt const_t4)')
    parser.add_argument('--sizes', nargs='+', type=size_arg,
                        help='training images per class, or all (CIFAR-100: 25 50 100 250 450; '
                             'ImageNet: all)')
    parser.add_argument('--seeds', nargs='+', type=int, help='(full: 0 1 2)')
    parser.add_argument('--epochs', type=int,
                        help='training epochs (CIFAR-100: 300, ImageNet: 90, --quick: 1)')
    parser.add_argument('--snapshots', type=Path,
                        default=Path(os.environ.get('MULTIEXIT_SNAPSHOTS', 'snapshots')),
                        help='runs folder (default: $MULTIEXIT_SNAPSHOTS or snapshots)')
    parser.add_argument('--out', type=Path, default=Path('results'),
                        help='folder for the table, the CSV, the figure and the logs (default: '
                             'results); their name says which grid they hold, e.g. '
                             'results/grid-quick.md')
    parser.add_argument('--dry-run', action='store_true',
                        help='list the cells and what would run, run nothing')
    parser.add_argument('--jobs', type=int, default=1, metavar='N',
                        help='cells at the same time, one process each, with their output in '
                             '<out>/logs/ (default 1: one after another, output on the terminal)')
    parser.add_argument('--pack', type=pack_arg, default=1, metavar='K',
                        help='train up to K cells of one size (their methods and seeds) as one '
                             'fused network (train_pack.py); auto: all of them on a GPU, 1 on the '
                             'CPU (default 1: every cell alone)')
    parser.add_argument('--gpus', metavar='LIST',
                        help='GPUs to spread the cells over, as CUDA_VISIBLE_DEVICES names them, '
                             'e.g. 0,1,2,3, or none for CPU cells (default: every visible GPU)')
    cluster.add_arguments(parser)
    return parser.parse_args(argv), extra


def check(args, extra):
    """One line for options that do not go together."""
    if args.jobs < 1:
        raise ConfigError(f'--jobs must be >= 1, got {args.jobs}')
    if args.pack != 'auto' and args.pack < 1:
        raise ConfigError(f'--pack must be >= 1 or auto, got {args.pack}')
    if args.cluster and (args.jobs > 1 or args.gpus is not None):
        raise ConfigError('--jobs and --gpus run cells on this machine; on a cluster, choose '
                          'the GPUs per task with --gpus-per-task')
    if (args.jobs > 1 or args.gpus is not None) and any(u.startswith('gpu=') for u in extra):
        raise ConfigError('gpu= after --: with --jobs or --gpus the grid gives every cell its '
                          'GPU; choose them with --gpus (--gpus none: the CPU)')
    if args.gpus is not None and args.gpus != 'none' and not all(args.gpus.split(',')):
        raise ConfigError(f'--gpus {args.gpus!r}: list GPUs like 0,1,2 (or none)')
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f'--out {args.out}: a file, not a folder')


class Results:
    """The rows of the finished cells, written in the cells' order whatever order they came in,
    to <out>/<name>.md, .csv and .png; ``description``: what the grid is, besides what its rows
    tell (data set, network, epochs, seeds)."""

    def __init__(self, cells, methods, out, name, description):
        self.order = {cell.name: i for i, cell in enumerate(cells)}
        self.methods, self.out, self.name, self.description = methods, out, name, description
        self.rows = {}

    def add(self, cell, train, test):
        self.rows[cell.name] = tables.cell_rows(cell, train, test)

    def gather(self, table, cells, snapshots):
        """Adds those of ``cells`` that are done in the snapshots folder (of seeds not asked
        for this time); returns them."""
        done = []
        for cell in cells:
            train, _, test = state(table, cell, snapshots)
            if test is not None:
                self.add(cell, train, test)
                done.append(cell)
        return done

    def write(self):
        rows = [row for name in sorted(self.rows, key=self.order.get) for row in self.rows[name]]
        labels = {m: METHODS[m].label for m in self.methods}
        tables.write_results(pd.DataFrame(rows), self.methods, labels, self.out, self.name,
                             self.description)

    def show(self):
        if self.rows:
            self.write()
            print((self.out / f'{self.name}.md').read_text())
            print(f'wrote {self.name}.md, {self.name}.csv and {self.name}.png to {self.out}')


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    command = shlex.join(['python3', '-m', 'experiments.grid', *argv])  # to say: run it again
    try:
        with reported_as_one_line():
            run(args, extra, command)
    except KeyboardInterrupt:  # before the cells started or after they finished
        print(f'interrupted: SIGINT; to continue, run the same command again: {command}',
              file=sys.stderr)
        raise SystemExit(EXIT_CODE_INTERRUPTED) from None


def run(args, extra, command):
    """Plans the cells; runs them on this machine, or submits or collects them on a cluster."""
    check(args, extra)
    preset = PRESETS[args.data, args.quick]
    methods = list(args.methods or preset.methods)
    if args.semisup and 'semisup' not in methods:
        methods.append('semisup')
    epochs = grid_epochs(args.epochs, preset, methods)
    sizes, seeds = args.sizes or preset.sizes, args.seeds or preset.seeds
    if 'semisup' in methods and preset.script != 'train_cifar.py':
        raise ConfigError('semisup: the semi-supervised cells are train_cifar.py\'s (its '
                          'semisup named config); not with --data imagenet')
    warn = warn_once()
    table = load(args.snapshots, warn)
    every = plan(preset, methods, sizes,
                 sorted(set(seeds) | seeds_done(table, preset, methods, sizes)), epochs, extra)
    cells = [c for c in every if c.seed in seeds]
    named = [f'with {" ".join(preset.named_configs)}'] * bool(preset.named_configs)
    print('; '.join([f'{len(cells)} training runs: methods {" ".join(methods)}',
                     f'sizes {" ".join(map(str, sizes))}', f'seeds {" ".join(map(str, seeds))}',
                     f'{epochs} epochs'] + named + [f'-- {" ".join(extra)}'] * bool(extra)),
          flush=True)
    updates = [u for u in extra if u.partition('=')[0] not in DEVICE_KEYS]
    results = Results(every, methods, args.out, output_name(preset, methods, sizes, epochs, extra),
                      '; '.join([f'methods {" ".join(methods)}',
                                 f'sizes {" ".join(map(str, sizes))}'] + named
                                + [f'-- {" ".join(updates)}'] * bool(updates)))
    gathered = results.gather(table, [c for c in every if c.seed not in seeds], args.snapshots)
    if gathered:
        print(f'and {plural(len(gathered), "finished cell")} of seed'
              f'{"s" * (len({c.seed for c in gathered}) > 1)} '
              f'{" ".join(map(str, sorted({c.seed for c in gathered})))} in {args.snapshots}, '
              f'which the table gathers too', flush=True)
    record = cluster.read_record(args.out)
    if args.resubmit and record is None:
        raise ConfigError(f'--resubmit: no submission recorded in {args.out / cluster.RECORD};'
                          f' submit with --cluster slurm')
    submitted = record is not None and any(c.name in record['tasks'] for c in cells)
    if args.cluster or args.resubmit or submitted:
        if args.jobs > 1 or args.gpus is not None:
            raise ConfigError(f'these cells were submitted to a cluster '
                              f'({args.out / cluster.RECORD}): collect them with the plain '
                              f'command, or remove that file to run them here')
        on_cluster(args, cells, record, results, preset.prefix, grid_command(args, extra),
                   table)
    else:
        on_this_machine(args, cells, results, command, table, warn, extra)


def grid_command(args, extra):
    """The command that plans the same cells, without the options of how to run them: the one
    that collects a cluster's results."""
    words = ['python3', '-m', 'experiments.grid']
    words += ['--data', args.data] * (args.data != 'cifar100') + ['--quick'] * args.quick
    words += ['--semisup'] * args.semisup
    for option, values in (('--methods', args.methods), ('--sizes', args.sizes),
                           ('--seeds', args.seeds), ('--epochs', args.epochs and [args.epochs]),
                           ('--snapshots', [args.snapshots]), ('--out', [args.out])):
        words += [option, *map(str, values)] if values else []
    return shlex.join(words + (['--', *extra] if extra else []))


def plural(n, word):
    return f'{n} {word}' + 's' * (n != 1)


def warn_once():
    seen = set()

    def warn(message):  # each unreadable run folder once, not at every reload
        if message not in seen:
            seen.add(message)
            print(f'warning: {message}', file=sys.stderr, flush=True)
    return warn


def on_this_machine(args, cells, results, command, table, warn, extra=()):
    """Trains, resumes and tests what is missing, one unit (a cell or a pack) after another or
    --jobs at once."""
    todo, heads = [], {c.name: f'[{i}/{len(cells)}] {c.name}' for i, c in enumerate(cells, 1)}
    for cell in cells:
        head = heads[cell.name]
        train, parent, test = state(table, cell, args.snapshots)
        if test is not None:
            print(f'{head}: done (training run {train["run"]}, test run {test["run"]})')
            results.add(cell, train, test)
        elif args.dry_run:
            print(f'{head}: ' + (f'to evaluate (run {train["run"]})' if train is not None else
                                 f'to resume (run {parent["run"]})' if parent is not None else
                                 'to train'))
        else:
            todo.append(cell)
    if cells and all(c.name in results.rows for c in cells):  # --pack, --jobs: nothing to do
        print(f'{plural(len(cells), "cell")} already done, nothing to train', flush=True)
    if args.dry_run:
        return
    gpus = (local.visible_gpus() if args.gpus is None else
            [] if args.gpus == 'none' else args.gpus.split(','))
    devices = None  # one cell after another, without --gpus: as a single run would run
    if args.jobs > 1 or args.gpus is not None:
        devices = local.Devices(gpus, args.jobs)
    units = packed(todo, pack_size(args.pack, extra, gpus))  # --pack 1: the cells alone
    logs = {cell.name: log_path(args.out, unit) for unit in units for cell in unit.cells}
    for unit in units:
        if len(unit.cells) > 1:
            heads[unit.name] = (f'[{",".join(heads[c.name][1:].split("/")[0] for c in unit.cells)}'
                                f'/{len(cells)}] {unit.name}')
    stop, schedule = Stop(), Schedule(units)
    failed, stopped = [], []
    with stop.handling_signals():
        if args.jobs == 1:
            finished = one_after_another(schedule, heads, args.snapshots, stop, devices, warn)
        else:
            finished = local.run_parallel(schedule, args.snapshots, args.out, args.jobs, devices,
                                          stop)
        try:
            for cell, outcome in finished:
                if outcome is None:
                    continue
                if outcome.status in ('ran', 'done'):
                    results.add(cell, outcome.train, outcome.test)
                    results.write()
                elif outcome.status == 'failed':
                    log = f'; log {logs[cell.name]}' if args.jobs > 1 else ''
                    failed.append(f'{cell.name} ({outcome.reason}{log})')
                else:
                    stopped.append(outcome)
        except Exception:  # e.g. the tables cannot be written: the running cells stop too
            stop.request(signal.SIGTERM)
            raise
        if stop.signum is not None:
            if results.rows:
                results.write()
            print(f'interrupted: {stop.name}: {stopped_cells(stopped)}; to continue, run the '
                  f'same command again: {command}', file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CODE_INTERRUPTED)
        if schedule.repeated:
            if results.rows:
                results.write()
            raise ConfigError(schedule.repeated_error())
        results.show()
    if failed:
        print(f'error: {len(failed)} of {len(cells)} cells failed: {"; ".join(failed)}',
              file=sys.stderr)
        raise SystemExit(EXIT_CELLS_FAILED)


def stopped_cells(outcomes):
    """What the interrupted cells keep, e.g. '2 cells stopped (1 with its last finished epoch
    in last.pt, 1 before its first epoch finished: it starts afresh)'."""
    counts = [(sum(o.train is not None for o in outcomes), 'trained, to be tested'),
              (sum(o.train is None and o.kept for o in outcomes),
               'with {its} last finished epoch in last.pt'),
              (sum(o.train is None and not o.kept for o in outcomes),
               'before {its} first epoch finished: {it} starts afresh')]
    kept = ', '.join(f'{n} ' + what.format(its='its' if n == 1 else 'their',
                                           it='it' if n == 1 else 'they')
                     for n, what in counts if n)
    return f'{plural(len(outcomes), "cell")} stopped' + (f' ({kept})' if kept else '')


def one_after_another(schedule, heads, snapshots, stop, devices, warn):
    """Yields (cell, Outcome) of each cell of each unit in turn, its processes' output on the
    terminal."""
    while stop.signum is None and (unit := schedule.take()) is not None:
        head = heads[unit.name]
        gpu = devices.take() if devices else None
        env = devices.env(gpu) if devices else None
        outcomes = run_unit(unit, snapshots, stop, env=env, warn=warn,
                            say=lambda message: print(f'{head}: {message}', flush=True))
        if devices:
            devices.give(gpu)
        for cell, outcome in outcomes:
            if outcome.status == 'failed':
                print(f'{heads[cell.name]}: failed: {outcome.reason}', flush=True)
            schedule.ended(cell, outcome)
            yield cell, outcome


def on_cluster(args, cells, record, results, name, collect, table):
    """Submits the cells that are neither done nor queued or running (--cluster, --resubmit);
    says where every cell is; writes the tables of the done ones."""
    submit = bool(args.cluster or args.resubmit)
    opts = cluster.options(args) if args.cluster else record['options']
    todo = []
    for cell in cells:
        train, _, test = state(table, cell, args.snapshots)
        if test is not None:
            results.add(cell, train, test)
        else:
            todo.append(cell)
    states = cluster.task_states(record, [c.name for c in todo]) if record else {}
    active = [c for c in todo if states.get(c.name, (None, None))[1] == 'active']
    missing = [c for c in todo if c not in active]
    submitted = {}
    if submit and missing and not args.dry_run:
        units = packed(missing, pack_size(opts.get('pack', 1), (), opts['gpus_per_task'] > 0))
        logs = [log_path(args.out, unit) for unit in units]
        ids = cluster.submit(units, opts, args.snapshots, logs, args.out, name, record)
        submitted = {c.name: i for unit, i in zip(units, ids) for c in unit.cells}
        record = cluster.read_record(args.out)
    for i, cell in enumerate(cells, 1):
        job_id, task = states.get(cell.name, (None, None))
        log = Path((record or {}).get('logs', {}).get(cell.name) or log_path(args.out, cell))
        error = cell_error(log, cell.name)
        print(f'[{i}/{len(cells)}] {cell.name}: ' + (
            'done' if cell.name in results.rows else
            f'submitted (task {submitted[cell.name]})' if cell.name in submitted else
            f'queued or running (task {job_id})' if task == 'active' else
            'not submitted' if job_id is None else
            f'failed (task {job_id}, {task}' + (f': {error}' if error else '') + f'); log {log}'))
    if args.dry_run:
        if submit:
            print(f'would submit {plural(len(missing), "cell")} to {opts["cluster"]}')
        return
    results.show()
    if submitted:
        print(f'submitted {plural(len(submitted), "cell")} to {opts["cluster"]} (task ids '
              f'above); collect the results later with: {collect}')
    elif active:
        print(f'{plural(len(active), "cell")} queued or running; collect again later with: '
              f'{collect}')
    if missing and not submit:
        print(f'error: {len(missing)} of {len(cells)} cells are not done and have no task '
              f'queued or running: {", ".join(c.name for c in missing)}; submit them again with: '
              f'{collect} --resubmit', file=sys.stderr)
        raise SystemExit(EXIT_CELLS_FAILED)

if __name__ == '__main__':
    main()
