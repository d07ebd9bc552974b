"""Training curves of a run: the metrics of its whole parent_snapshot chain and their plot
(``python3 -m multiexit.runs --plot``)."""
from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import SnapshotError
from .lineage import Lineage, history
from .table import flatten, load_runs, print_warning, read_json, read_metrics


def run_history(snapshot_dir, run):
    """(metrics frame of run ``run``'s whole parent_snapshot chain, the chain's run ids)."""
    snapshot_dir = Path(snapshot_dir)
    table = load_runs(snapshot_dir, with_metrics=False, warn=lambda message: None)
    rows = {row['run']: row for row in table.to_dict('records')}
    if run not in rows:
        raise SnapshotError(f'no run {run} in {snapshot_dir}/ (python3 -m multiexit.runs lists '
                            f'the runs)')
    chain = Lineage(snapshot_dir, rows).chain(run)
    return history(chain, lambda r: read_metrics(snapshot_dir / r)), [r for r, _ in chain]


def plot_curves(run_dir, path, warn=print_warning):
    """Training curves of a run to a PNG, from the first run of its parent_snapshot chain:
    train and validation top-1 of every exit, the temperature (DBT's as logged, a constant one
    from the config) and the learning rate, per epoch, whole epochs on every axis, the epochs
    where a resumed run took over marked. ``warn``: called with a line for each parent whose
    metrics.json is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SnapshotError(f'no run folder {run_dir}')
    frame, chain = run_history(run_dir.parent, run_dir.name)
    missing = [run_dir.parent / run / 'metrics.json' for run in chain
               if not (run_dir.parent / run / 'metrics.json').is_file()]
    if run_dir / 'metrics.json' in missing:
        raise SnapshotError(f'{run_dir / "metrics.json"} is missing (deleted, or never written): '
                            f'no training curves to plot')
    for lost in missing:  # a parent's: the curves lack its epochs
        warn(f'{lost} is missing: the curves lack the epochs of run {lost.parent.name}')
    exits = sorted(int(c.rsplit('clf', 1)[1]) for c in frame.columns
                   if c.startswith('val.acc1_clf'))
    if not exits:
        raise SnapshotError(f'{run_dir} has no per-exit metrics to plot (metrics.json has no '
                            f'val.acc1_clf<k>): not a training run, or no epoch finished')
    config = flatten(read_json(run_dir, 'config.json', required=False))
    fig = Figure(figsize=(11, 8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colors = colormaps['viridis']
    for ax, split in zip(axes[0], ('train', 'val')):
        for k in exits:
            ax.plot(frame.index, 100 * frame[f'{split}.acc1_clf{k}'], marker='.',
                    color=colors(k / max(len(exits) - 1, 1)), label=f'exit {k}')
        ax.set(title=f'{split} top-1 per exit', ylabel='top-1 accuracy (%)')
    _temperature(axes[1, 0], frame, config)
    if 'lr' in frame:
        axes[1, 1].plot(frame.index, frame['lr'], marker='.')
        axes[1, 1].set_yscale('log')
    else:
        axes[1, 1].text(0.5, 0.5, 'no lr logged', ha='center', transform=axes[1, 1].transAxes)
    axes[1, 1].set(title='learning rate', ylabel='learning rate')
    starts = [read_metrics(run_dir.parent / resumed).index.min() for resumed in chain[1:]]
    for ax in axes.flat:
        ax.set(xlabel='epoch', xlim=(frame.index.min() - 0.5, frame.index.max() + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        marked = [first for first in starts if pd.notna(first)]
        for i, first in enumerate(marked):  # where each resumed run took over
            ax.axvline(first - 0.5, color='0.6', linestyle=':', linewidth=1,
                       label='a resumed run takes over' if i == 0 else None)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize='small', ncol=2 if ax in axes[0] else 1)
    runs = ' <- '.join(reversed(chain)) if len(chain) > 1 else run_dir.name
    fig.suptitle(f'run {runs} {config.get("snapshot_name", "")}'.strip())
    fig.tight_layout()
    fig.savefig(path)


def _temperature(ax, frame, config):
    """The distillation temperature: DBT's per epoch as logged; a constant one (cf_loss.T, which
    is not logged) as the line it is; none for a loss without one."""
    loss = config.get('cf_loss.call')
    if 'temperature' in frame:
        ax.plot(frame.index, frame['temperature'], marker='.')
        title = 'DBT temperature T'
    elif pd.notna(config.get('cf_loss.T')):
        T = config['cf_loss.T']
        ax.plot(frame.index, [T] * len(frame), marker='.', label=f'T = {T:g} (cf_loss.T)')
        title = f'constant temperature T ({loss})'
    else:
        ax.text(0.5, 0.5, f'{loss or "this loss"}: no temperature', ha='center',
                transform=ax.transAxes)
        title = 'distillation temperature T'
    ax.set(title=title, ylabel='T')
