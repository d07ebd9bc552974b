"""Run inspection: the sacred runs of a snapshots folder as one pandas table, and training curves.

    python -m multiexit.runs [snapshots/] [--filter key=value ...] [--csv runs.csv] [--plot RUN ...]

One row per run folder: ``run`` (its id), ``experiment`` (train_cifar or eval), ``status``,
``start_time``, ``stop_time``, ``duration_s``, ``named_configs``; the configuration flattened to
dotted keys (``cf_loss.call``, ``cf_trn.n_per_class``, ``seed``, ...; lists as JSON text); for
training runs ``final_epoch`` and ``final.<metric>`` (the last logged value of every metric of
metrics.json), ``best_epoch`` and ``best.<metric>`` (the epoch with the highest ``val.acc1_avg``,
the first one on a tie, as training keeps it); and ``result.<key>``, the sacred result (for an
evaluation, the test metrics such as ``result.acc1_clf0``). A resumed run's metrics.json holds only
the epochs that run trained.

The JSON files that sacred's FileStorageObserver writes are read directly: the library never
imports sacred. Folders that are not readable runs (no or garbled config.json / run.json /
metrics.json) are skipped with a warning; sacred's ``_sources`` is not a run and is passed over.
"""
import argparse
import ast
import fnmatch
import json
import os
import sys
from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import ConfigError, SnapshotError, reported_as_one_line

META = ['run', 'experiment', 'status', 'start_time', 'stop_time', 'duration_s', 'named_configs']
# What `python -m multiexit.runs` prints (where present); the CSV has every column.
SUMMARY = ['run', 'experiment', 'status', 'start_time', 'duration_s', 'snapshot_name',
           'named_configs', 'cf_loss.call', 'cf_trn.n_per_class', 'cf_trn.n_unl_per_class', 'seed',
           'final_epoch', 'best_epoch', 'best.val.acc1_avg', 'result.acc1_avg']


class MalformedRun(SnapshotError):
    """A folder of the snapshots directory is not a readable sacred run."""


def _warn(message):
    print(f'warning: {message}', file=sys.stderr, flush=True)


def _read_json(run_dir, name, required=True):
    path = run_dir / name
    if not path.is_file():
        if required:
            raise MalformedRun(f'no {name} (not a sacred run, or it has not started)')
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise MalformedRun(f'cannot read {name} ({e})') from None
    except ValueError as e:
        raise MalformedRun(f'{name} is not valid JSON ({e})') from None
    if not isinstance(value, dict):
        raise MalformedRun(f'{name} is not a JSON object')
    return value


def flatten(tree, prefix=''):
    """{'cf_loss': {'C': 0.5}} -> {'cf_loss.C': 0.5}; lists become JSON text (one cell each)."""
    out = {}
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict) and value:
            out.update(flatten(value, f'{name}.'))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


def read_metrics(run_dir):
    """metrics.json as a frame: one row per epoch (sacred's step), one column per metric."""
    raw = _read_json(Path(run_dir), 'metrics.json', required=False)
    try:
        series = {name: pd.Series(m['values'], index=m['steps'], dtype=float)
                  for name, m in raw.items()}
        frame = pd.DataFrame(series)
    except (KeyError, TypeError, ValueError) as e:
        raise MalformedRun(f'metrics.json is not sacred\'s {{name: {{steps, values}}}} '
                           f'({type(e).__name__}: {e})') from None
    frame.index.name = 'epoch'
    return frame.sort_index()


def metric_summary(frame):
    """final_epoch, best_epoch and the final.* and best.* values of a metrics frame."""
    if frame.empty:
        return {}
    out = {'final_epoch': int(frame.index.max())}
    out.update({f'final.{k}': v for k, v in frame.ffill().iloc[-1].items()})
    score = frame.get('val.acc1_avg', pd.Series(dtype=float)).dropna()
    if len(score):
        best = score.idxmax()
        out['best_epoch'] = int(best)
        out.update({f'best.{k}': v for k, v in frame.loc[best].items()})
    return out


def load_run(run_dir, with_metrics=True):
    """One run folder as a flat dict (see the module docstring); raises MalformedRun."""
    run_dir = Path(run_dir)
    run = _read_json(run_dir, 'run.json')
    config = _read_json(run_dir, 'config.json')
    row = flatten(config)
    row.update(run=run_dir.name, experiment=(run.get('experiment') or {}).get('name'),
               status=run.get('status'), start_time=run.get('start_time'),
               stop_time=run.get('stop_time'),
               named_configs=','.join((run.get('meta') or {}).get('named_configs') or []))
    if with_metrics:
        row.update(metric_summary(read_metrics(run_dir)))
    result = run.get('result')
    if isinstance(result, dict):
        row.update(flatten(result, 'result.'))
    elif result is not None:
        row['result'] = result
    return row


def _run_order(path):
    return (0, int(path.name), '') if path.name.isdigit() else (1, 0, path.name)


def load_runs(snapshot_dir, with_metrics=True, warn=_warn):
    """Every run of ``snapshot_dir`` as a DataFrame, in run-id order (see the module docstring).

    ``with_metrics=False`` skips metrics.json (faster where only configs and results matter).
    """
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        raise SnapshotError(f'no snapshots folder {snapshot_dir}')
    rows = []
    for path in sorted(snapshot_dir.iterdir(), key=_run_order):
        if not path.is_dir() or path.name.startswith(('_', '.')):  # _sources: sacred's copies
            continue
        try:
            rows.append(load_run(path, with_metrics))
        except MalformedRun as e:
            warn(f'skipped {path}: {e}')
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=META)
    for column in ('start_time', 'stop_time'):
        frame[column] = pd.to_datetime(frame[column], errors='coerce')
    frame['duration_s'] = (frame['stop_time'] - frame['start_time']).dt.total_seconds()
    return frame[META + [c for c in frame.columns if c not in META]]


def parse_filter(text):
    """'key=value' -> (key, value)."""
    key, sep, value = text.partition('=')
    if not sep or not key.strip():
        raise ConfigError(f'malformed filter {text!r}: use key=value, e.g. '
                          f'cf_loss.call=ClassificationOnlyLoss or snapshot_name=grid/*')
    return key.strip(), value.strip()


def _value(x):
    """The Python value of a cell or of filter text: '4.0', '[1,1]', 'False' compare as values."""
    if not isinstance(x, str):
        return x
    for parse in (ast.literal_eval, json.loads):  # json for true/false/null
        try:
            return parse(x)
        except (ValueError, SyntaxError, TypeError):
            pass
    return x


def matches(cell, wanted):
    """Whether a cell equals the filter text ``wanted`` (as values; globs match the text).

    None (or null) matches a setting that is None, which the table holds as a missing value:
    sacred writes None as null, and pandas cannot tell it from a key that a run does not have."""
    if not isinstance(cell, str) and pd.isna(cell):
        return _value(wanted) is None
    if '*' in wanted or '?' in wanted:
        return fnmatch.fnmatchcase(str(cell), wanted)
    return _value(cell) == _value(wanted)


def select(frame, filters, strict=True):
    """The rows matching every (key, value) filter. A key that is not a column raises
    ConfigError if ``strict``, else is missing from every row (so only None matches it)."""
    for key, wanted in filters:
        if key not in frame.columns:
            if not strict:
                frame = frame if _value(wanted) is None else frame.iloc[:0]
                continue
            known = ', '.join(c for c in SUMMARY if c in frame.columns)
            raise ConfigError(f'no column {key!r} to filter on (e.g. {known}; --csv lists all)')
        frame = frame[frame[key].map(lambda cell: matches(cell, wanted)).astype(bool)]
    return frame


def summary(frame):
    """The readable subset of columns that ``python -m multiexit.runs`` prints, as text."""
    out = frame[[c for c in SUMMARY if c in frame.columns]].copy()
    out['start_time'] = out['start_time'].dt.strftime('%Y-%m-%d %H:%M')
    out['duration_s'] = out['duration_s'].round()
    for column in out.columns:
        values = out[column].dropna()
        if pd.api.types.is_float_dtype(out[column]):
            # ints with a gap (NaN) somewhere come as floats
            form = '{:.0f}' if (values == values.round()).all() else '{:.4f}'
            out[column] = out[column].map(form.format)
        out[column] = out[column].where(frame[column].notna(), '-').astype(str)
    return out


def plot_curves(run_dir, path):
    """Training curves of a run to a PNG: train and validation top-1 of every exit, the
    temperature and the learning rate, per epoch."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SnapshotError(f'no run folder {run_dir}')
    frame = read_metrics(run_dir)
    exits = sorted(int(c.rsplit('clf', 1)[1]) for c in frame.columns
                   if c.startswith('val.acc1_clf'))
    if not exits:
        raise SnapshotError(f'{run_dir} has no per-exit metrics to plot (metrics.json has no '
                            f'val.acc1_clf<k>): not a training run, or no epoch finished')
    name = flatten(_read_json(run_dir, 'config.json', required=False)).get('snapshot_name', '')
    fig = Figure(figsize=(11, 8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colors = colormaps['viridis']
    for ax, split in zip(axes[0], ('train', 'val')):
        for k in exits:
            ax.plot(frame.index, 100 * frame[f'{split}.acc1_clf{k}'], marker='.',
                    color=colors(k / max(len(exits) - 1, 1)), label=f'exit {k}')
        ax.set(title=f'{split} top-1 per exit', xlabel='epoch', ylabel='top-1 accuracy (%)')
        ax.legend(fontsize='small', ncol=2)
    for ax, column, title in ((axes[1, 0], 'temperature', 'DBT temperature T'),
                              (axes[1, 1], 'lr', 'learning rate')):
        if column in frame:
            ax.plot(frame.index, frame[column], marker='.')
        else:
            ax.text(0.5, 0.5, f'no {column} logged', ha='center', transform=ax.transAxes)
        ax.set(title=title, xlabel='epoch')
    if 'lr' in frame:
        axes[1, 1].set_yscale('log')
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f'run {run_dir.name} {name}')
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m multiexit.runs',
        description='List the sacred runs of a snapshots folder (a readable subset of columns; '
                    '--csv writes all of them).')
    parser.add_argument('snapshots', nargs='?',
                        default=os.environ.get('MULTIEXIT_SNAPSHOTS', 'snapshots'),
                        help='snapshots folder (default: $MULTIEXIT_SNAPSHOTS or snapshots)')
    parser.add_argument('--filter', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                        help='keep runs whose column KEY equals VALUE (compared as values: 4 '
                             'matches 4.0; * and ? glob the text), e.g. experiment=eval '
                             'status=COMPLETED cf_loss.call=ClassificationOnlyLoss')
    parser.add_argument('--csv', metavar='PATH', help='write every column of the listed runs')
    parser.add_argument('--plot', nargs='+', default=[], metavar='RUN',
                        help='write training curves to <snapshots>/<RUN>/curves.png')
    args = parser.parse_args(argv)
    with reported_as_one_line():
        filters = [parse_filter(f) for f in args.filter]
        runs = select(load_runs(args.snapshots), filters)
        if runs.empty:
            print(f'no runs in {args.snapshots}' + (' match the filters' if filters else ''))
        else:
            with pd.option_context('display.width', 250, 'display.max_columns', None):
                print(summary(runs).to_string(index=False))
        if args.csv:
            runs.to_csv(args.csv, index=False)
            print(f'wrote {len(runs)} runs x {runs.shape[1]} columns to {args.csv}')
        for run in args.plot:
            run_dir = Path(args.snapshots) / run
            plot_curves(run_dir, run_dir / 'curves.png')
            print(f'wrote {run_dir / "curves.png"}')


if __name__ == '__main__':
    main()
