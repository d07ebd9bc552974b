"""The paper's study as one command: training methods x training-set sizes x seeds, every cell
an ordinary train_cifar.py run whose best snapshot eval.py tests, summarised as a table and a
figure.

    python3 -m experiments.grid                  # 3 methods x 5 sizes x 3 seeds, 300 epochs each
    python3 -m experiments.grid --semisup        # and DBT with unlabelled images
    python3 -m experiments.grid --quick          # the whole pipeline on generated data, CPU
    python3 -m experiments.grid --dry-run        # which cells are done and what would run
    python3 -m experiments.grid -- gpu=1         # config updates after -- go to every training run

A cell trains on ``size`` images per class plus ``nval`` validation images per class
(``cf_trn.n_per_class = size + nval``; ``cf_val`` follows ``cf_trn``). Grid seed s sets both
``cf_trn.seed`` (the class permutation and which images form the subset) and sacred's ``seed``
(initialisation, data order, augmentation): seeds repeat the experiment on other data subsets,
and the methods of one seed share subset and initialisation, so their differences are paired.
The semi-supervised cells (``--semisup``: the ``semisup`` named config) leave the rest of each
class's training images unlabelled.

Each cell is a run named ``<prefix>/<method>/n<size>/s<seed>`` in the snapshots folder. A
training run with that name, the same named configs and the same settings that COMPLETED is not
repeated; an unfinished one with a last.pt is resumed (a new run with ``parent_snapshot``); each
cell's run is evaluated once (``eval.py with snapshot_name=<run id>``, its best snapshot). So an
interrupted grid continues where it stopped when started again. Grids that share a snapshots
folder at the same time must have disjoint cells (e.g. ``--seeds 0 -- gpu=0`` and
``--seeds 1 -- gpu=1``).

Writes to ``--out`` (results/), after every cell that ran and at the end: grid.md (test top-1
per exit, mean ± std over seeds, and the difference of every method to standard training,
paired by seed), grid.csv (one row per run and exit) and grid.png (accuracy per exit, one panel
per training-set size, one line per method).
"""
import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from multiexit import runs
from multiexit.checkpoints import LAST
from multiexit.errors import ConfigError, reported_as_one_line

ROOT = Path(__file__).resolve().parents[1]
EXIT_CELLS_FAILED = 1
# Updates that change where a run trains, not what it computes: a cell done on another GPU is done.
DEVICE_KEYS = {'gpu'}


@dataclass(frozen=True)
class Method:
    label: str  # in the table and the figure
    settings: tuple  # train_cifar.py config updates
    named_configs: tuple = ()
    unlabelled: bool = False  # the rest of each class's training images, without labels


METHODS = {
    'standard': Method('standard', ('cf_loss.call=ClassificationOnlyLoss',)),
    'dbt': Method('DBT', ('cf_loss.call=DistillationBasedLoss',)),
    'const_t4': Method('distillation, T=4',
                       ('cf_loss.call=DistillationLossConstTemp', 'cf_loss.T=4.0')),
    'semisup': Method('DBT + unlabelled', ('cf_loss.call=DistillationBasedLoss',), ('semisup',),
                      unlabelled=True),
}


@dataclass(frozen=True)
class Preset:
    named_configs: tuple
    methods: tuple
    sizes: tuple  # training images per class
    nval: int  # validation images per class
    images_per_class: int  # in the training file
    seeds: tuple
    epochs: int
    prefix: str  # of the snapshot names


PRESETS = {
    'full': Preset((), ('standard', 'dbt', 'const_t4'), (25, 50, 100, 250, 450), 50, 500,
                   (0, 1, 2), 300, 'grid'),
    # the smoke network on the generated data set, which has 30 training images per class
    'quick': Preset(('smoke',), ('standard', 'dbt'), (10, 20), 5, 30, (0,), 1, 'grid-quick'),
}


@dataclass(frozen=True)
class Cell:
    method: str
    size: int
    seed: int
    name: str  # the training run's snapshot_name
    named_configs: tuple
    settings: tuple  # config updates 'key=value': the cell's own, then those given after --

    @property
    def updates(self):
        return [*self.named_configs, *self.settings]

    @property
    def identity(self):
        """Filters that a training run of this cell matches (multiexit.runs.select)."""
        return ([('experiment', 'train_cifar'), ('named_configs', ','.join(self.named_configs))]
                + [f for f in map(runs.parse_filter, self.settings) if f[0] not in DEVICE_KEYS])


def plan(preset, methods, sizes, seeds, epochs, extra=()):
    """The cells, method by method, size by size, seed by seed. ``extra``: what was given after
    -- (named configs and key=value updates), added to every cell."""
    for size in sizes:
        if size <= 0 or size + preset.nval > preset.images_per_class:
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
            n_unl = preset.images_per_class - size - preset.nval if m.unlabelled else 0
            if m.unlabelled and n_unl == 0:
                print(f'{method} at size {size}: no training images left to leave unlabelled; '
                      f'skipped')
                continue
            for seed in seeds:
                name = f'{preset.prefix}/{method}/n{size}/s{seed}'
                settings = (f'snapshot_name={name}', f'seed={seed}', f'cf_trn.seed={seed}',
                            f'cf_trn.n_per_class={size + preset.nval}',
                            f'cf_trn.nval_per_class={preset.nval}',
                            f'cf_trn.n_unl_per_class={n_unl}', *m.settings, f'n_epochs={epochs}')
                own = {u.partition('=')[0] for u in settings}
                for update in extra_updates:
                    if update.partition('=')[0] in own:
                        raise ConfigError(f'{update!r} after --: the grid sets that itself (use '
                                          f'--epochs, --sizes, --seeds or --methods)')
                cells.append(Cell(method, size, seed, name,
                                  preset.named_configs + m.named_configs + extra_named,
                                  settings + extra_updates))
    return cells


def _newest(frame):
    return None if frame.empty else frame.iloc[-1]


def state(table, cell, snapshots):
    """(completed training run, resumable training run, evaluation run) of a cell, or None."""
    trained = runs.select(table, cell.identity, strict=False)
    done = _newest(trained[trained['status'] == 'COMPLETED'])
    resumable = trained['run'].map(lambda r: (snapshots / r / LAST).is_file()).astype(bool)
    unfinished = trained[(trained['status'] != 'COMPLETED') & resumable]
    if done is not None:
        return done, None, evaluation(table, done['run'])
    return None, _newest(unfinished), None


def evaluation(table, run_id):
    """The newest COMPLETED test evaluation of a training run's best snapshot, or None."""
    filters = [('experiment', 'eval'), ('status', 'COMPLETED'), ('snapshot_name', run_id)]
    found = runs.select(table, filters, strict=False)
    if 'checkpoint' in found.columns:  # eval.py's default, None, is its best snapshot
        found = found[found['checkpoint'].isna() | (found['checkpoint'] == 'best')]
    return _newest(found)


def call(script, updates, snapshots):
    """Run a script of the repository as a user would; returns its exit code."""
    cmd = [sys.executable, str(ROOT / script), 'with', *updates]
    print(f'$ MULTIEXIT_SNAPSHOTS={shlex.quote(str(snapshots))} {shlex.join(cmd)}', flush=True)
    proc = subprocess.Popen(cmd, env=dict(os.environ, MULTIEXIT_SNAPSHOTS=str(snapshots)))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # it got the same SIGINT: let it record how to resume
        raise


def cell_rows(cell, train, test):
    """One row per exit: the cell's test top-1 (%) from the evaluation's sacred result."""
    exits = sorted(int(k.rsplit('clf', 1)[1]) for k in test.index
                   if k.startswith('result.acc1_clf') and pd.notna(test[k]))
    return [dict(method=cell.method, size=cell.size, seed=cell.seed, exit=k,
                 acc1=round(100 * test[f'result.acc1_clf{k}'], 6), train_run=train['run'],
                 eval_run=test['run']) for k in exits]


def _mean_std(stats, signed=False):
    mean = stats['mean'].map('{:+.1f}'.format if signed else '{:.1f}'.format)
    std = stats['std'].map(' ± {:.1f}'.format).where(stats['count'] > 1, '')
    return mean + std


def _wide(stats, label, signed=False):
    """(size, method, exit) stats -> one row per size and method, one column per exit."""
    cells = _mean_std(stats, signed).unstack('exit').fillna('-')
    cells.columns = [f'exit {k}' for k in cells.columns]
    seeds = stats['count'].groupby(['size', 'method'], observed=True).max().rename('seeds')
    frame = pd.concat([seeds, cells], axis=1).reset_index()
    return frame.assign(method=frame['method'].map(label))


def _markdown(frame):
    lines = ['| ' + ' | '.join(map(str, frame.columns)) + ' |', '|' + '---|' * frame.shape[1]]
    lines += ['| ' + ' | '.join(map(str, row)) + ' |' for row in frame.itertuples(index=False)]
    return '\n'.join(lines)


def tables(results, methods):
    """(mean ± std test top-1 per method, paired difference of every method to standard)."""
    results = results.assign(method=pd.Categorical(results['method'], methods))
    stats = results.groupby(['size', 'method', 'exit'], observed=True)['acc1'].agg(
        ['mean', 'std', 'count'])
    accuracy = _wide(stats, lambda m: METHODS[m].label)
    if 'standard' not in set(results['method']):
        return accuracy, None
    paired = results.pivot_table(index=['size', 'seed', 'exit'], columns='method', values='acc1',
                                 observed=True)
    diff = paired.sub(paired['standard'], axis=0).drop(columns='standard')
    diff = diff.stack().rename('diff').reset_index()  # NaN (a method missing a seed) dropped
    if diff.empty:
        return accuracy, None
    diff['method'] = pd.Categorical(diff['method'], methods)
    stats = diff.groupby(['size', 'method', 'exit'], observed=True)['diff'].agg(
        ['mean', 'std', 'count'])
    return accuracy, _wide(stats, lambda m: f'{METHODS[m].label} − standard', signed=True)


def write_markdown(results, methods, path, description):
    accuracy, difference = tables(results, methods)
    text = ['# Test top-1 accuracy per exit (%)', '', description, '',
            'Mean ± standard deviation over seeds of each run\'s best-validation snapshot on the '
            'test split; `size`: training images per class.', '', _markdown(accuracy), '']
    if difference is not None:
        text += ['## Difference to standard training (percentage points)', '',
                 'Per seed (same data subset and initialisation), method minus standard; mean ± '
                 'standard deviation over seeds.', '', _markdown(difference), '']
    path.write_text('\n'.join(text))


def write_figure(results, methods, path, description):
    sizes = sorted(results['size'].unique())
    stats = results.groupby(['size', 'method', 'exit'])['acc1'].agg(['mean', 'std']).reset_index()
    fig = Figure(figsize=(1 + 3.6 * len(sizes), 4.4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    for ax, size in zip(axes, sizes):
        for i, method in enumerate(methods):
            line = stats[(stats['size'] == size) & (stats['method'] == method)]
            if len(line):
                ax.errorbar(line['exit'], line['mean'], yerr=line['std'].fillna(0), marker='o',
                            capsize=3, color=f'C{i}', label=METHODS[method].label)
        ax.set(title=f'{size} training images per class', xlabel='exit')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('test top-1 accuracy (%)')
    axes[0].legend(fontsize='small')
    fig.suptitle(description, fontsize='medium')
    fig.tight_layout()
    fig.savefig(path)


def write_results(results, methods, out, description):
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / 'grid.csv', index=False)
    write_markdown(results, methods, out / 'grid.md', description)
    write_figure(results, methods, out / 'grid.png', description)


def parse_args(argv):
    """(options, config updates given after --)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(
        prog='python3 -m experiments.grid',
        description='Train and test the paper\'s grid of methods x training-set sizes x seeds; '
                    'cells already done are skipped. Config updates after -- go to every '
                    'training run (e.g. -- gpu=1).')
    parser.add_argument('--quick', action='store_true',
                        help='the smoke network on generated data, sizes 10 and 20, 1 epoch')
    parser.add_argument('--semisup', action='store_true',
                        help='add DBT with the rest of the training images unlabelled')
    parser.add_argument('--methods', nargs='+', choices=sorted(METHODS),
                        help='instead of the preset\'s (full: standard dbt const_t4)')
    parser.add_argument('--sizes', nargs='+', type=int,
                        help='training images per class (full: 25 50 100 250 450)')
    parser.add_argument('--seeds', nargs='+', type=int, help='(full: 0 1 2)')
    parser.add_argument('--epochs', type=int, help='training epochs (full: 300, quick: 1)')
    parser.add_argument('--snapshots', type=Path,
                        default=Path(os.environ.get('MULTIEXIT_SNAPSHOTS', 'snapshots')),
                        help='runs folder (default: $MULTIEXIT_SNAPSHOTS or snapshots)')
    parser.add_argument('--out', type=Path, default=Path('results'),
                        help='folder for grid.md, grid.csv and grid.png (default: results)')
    parser.add_argument('--dry-run', action='store_true',
                        help='list the cells and what would run, run nothing')
    return parser.parse_args(argv), extra


def main(argv=None):
    args, extra = parse_args(argv)
    with reported_as_one_line():
        preset = PRESETS['quick' if args.quick else 'full']
        methods = list(args.methods or preset.methods)
        if args.semisup and 'semisup' not in methods:
            methods.append('semisup')
        epochs = args.epochs if args.epochs is not None else preset.epochs
        sizes, seeds = args.sizes or preset.sizes, args.seeds or preset.seeds
        cells = plan(preset, methods, sizes, seeds, epochs, extra)
        description = '; '.join(
            [f'{len(cells)} training runs: methods {" ".join(methods)}',
             f'sizes {" ".join(map(str, sizes))}', f'seeds {" ".join(map(str, seeds))}',
             f'{epochs} epochs']
            + [f'with {" ".join(preset.named_configs)}'] * bool(preset.named_configs)
            + [f'-- {" ".join(extra)}'] * bool(extra))
        print(description, flush=True)
        def write(results):
            frame = pd.DataFrame([row for rows in results for row in rows])
            write_results(frame, methods, args.out, description)

        failed, results = run_cells(cells, args.snapshots, args.dry_run, write)
        if results:
            write(results)
            print((args.out / 'grid.md').read_text())
            print(f'wrote grid.md, grid.csv and grid.png to {args.out}')
        if failed:
            print(f'error: {len(failed)} of {len(cells)} cells failed: {"; ".join(failed)}',
                  file=sys.stderr)
            raise SystemExit(EXIT_CELLS_FAILED)


def run_cells(cells, snapshots, dry_run=False, progress=lambda results: None):
    """Train, resume and evaluate what is missing; returns (failures, rows per finished cell).

    ``progress(results so far)`` after every cell that ran something: the tables of a grid that
    takes days show the cells done so far."""
    seen = set()

    def warn(message):  # each unreadable run folder once, not at every reload
        if message not in seen:
            seen.add(message)
            print(f'warning: {message}', file=sys.stderr, flush=True)

    def load():
        if not snapshots.is_dir():
            return pd.DataFrame(columns=runs.META)
        return runs.load_runs(snapshots, with_metrics=False, warn=warn)

    failed, results = [], []
    table = load()
    for i, cell in enumerate(cells, 1):
        head = f'[{i}/{len(cells)}] {cell.name}'
        train, parent, test = state(table, cell, snapshots)
        if dry_run:
            todo = ('done' if test is not None else
                    f'to evaluate (run {train["run"]})' if train is not None else
                    f'to resume (run {parent["run"]})' if parent is not None else 'to train')
            print(f'{head}: {todo}')
            continue
        ran = train is None or test is None
        if train is None:
            resume = [] if parent is None else [f'parent_snapshot={parent["run"]}']
            print(f'{head}: ' + ('training' if parent is None else
                                 f'resuming run {parent["run"]}'), flush=True)
            code = call('train_cifar.py', cell.updates + resume, snapshots)
            table = load()
            train, _, test = state(table, cell, snapshots)
            if train is None:
                failed.append(f'{cell.name} (train_cifar.py exit code {code})')
                continue
        if test is None:
            print(f'{head}: testing run {train["run"]}', flush=True)
            code = call('eval.py', [f'snapshot_name={train["run"]}'], snapshots)
            table = load()
            test = evaluation(table, train['run'])
            if test is None:
                failed.append(f'{cell.name} (eval.py exit code {code})')
                continue
        else:
            print(f'{head}: done (training run {train["run"]}, test run {test["run"]})')
        results.append(cell_rows(cell, train, test))
        if ran:
            progress(results)
    return failed, results


if __name__ == '__main__':
    main()
