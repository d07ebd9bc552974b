"""Run inspection: the sacred runs of a snapshots folder as one pandas table, and training curves.

    python3 -m multiexit.runs [snapshots/] [--filter key=value ...] [--wide] [--csv runs.csv]
    python3 -m multiexit.runs --plot RUN ...          # RUN: a run id or a snapshot_name

One row per run folder: ``run`` (its id), ``experiment`` (train_cifar or eval), ``status``,
``start_time``, ``stop_time``, ``duration_s``, ``named_configs``; the configuration flattened to
dotted keys (``cf_loss.call``, ``cf_trn.n_per_class``, ``seed``, ...; lists as JSON text);
``network`` and ``method`` (of a training run, or of the runs an evaluation tested); for
training runs ``final_epoch`` and ``final.<metric>`` (the last logged value of every metric of
metrics.json), ``best_epoch`` and ``best.<metric>`` (the epoch with the highest ``val.acc1_avg``,
the first one on a tie, as training keeps it); and ``result.<key>``, the sacred result (for an
evaluation, the test metrics such as ``result.acc1_clf0``). Metrics are fractions (0.25 is
25 %), as in every file the runs write; the printed table gives percent and says so.

A resumed run (``parent_snapshot``) has a folder of its own whose metrics.json holds only the
epochs it trained. Its row follows the chain of parents back to the first run: the metric
columns are those of the whole history (the parent's epochs up to the one resumed from, then
its own), ``parent_run`` and ``first_run`` are the run ids of its parent and of the first run,
and ``total_duration_s`` sums the durations along the chain. ``--plot`` draws the whole history.
A parent named by snapshot_name is found as ``multiexit.runs.find.resolve`` finds it, among
the runs that started before.

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

from ..errors import ConfigError, SnapshotError, reported_as_one_line
from . import find

META = ['run', 'experiment', 'status', 'start_time', 'stop_time', 'duration_s', 'named_configs']
# Columns named when a filter names none (``--csv`` lists them all).
KNOWN = ['run', 'experiment', 'status', 'snapshot_name', 'network', 'method', 'named_configs',
         'cf_loss.call', 'cf_trn.n_per_class', 'seed', 'final_epoch', 'best.val.acc1_avg',
         'result.acc1_avg']
WIDTH = 120  # of the table printed without --wide
METHODS = {'ClassificationOnlyLoss': 'standard', 'DistillationBasedLoss': 'DBT',
           'DistillationLossConstTemp': 'distillation, T={T}'}  # cf_loss.call -> method


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


def _run_order(name):
    return (0, int(name), '') if name.isdigit() else (1, 0, name)


def _given(value):
    return value is not None and str(value).strip() not in ('', 'nan')


def method_label(row):
    """The training method of a run's flat config: standard, DBT, distillation, T=4, ... with
    ' + unlabelled' for semi-supervised training; None without cf_loss.call."""
    call = row.get('cf_loss.call')
    if not isinstance(call, str):
        return None
    T = row.get('cf_loss.T')
    label = METHODS.get(call, call).format(T=f'{T:g}' if isinstance(T, (int, float)) else '?')
    unlabelled = row.get('cf_trn.n_unl_per_class')
    if isinstance(unlabelled, (int, float)) and unlabelled > 0:
        label += ' + unlabelled'
    return label


def network_label(row):
    """cf_net.call of a run's flat config, with its depth where it has one (ResNet-56)."""
    call, depth = row.get('cf_net.call'), row.get('cf_net.depth')
    if not isinstance(call, str):
        return None
    return f'{call}-{depth:g}' if isinstance(depth, (int, float)) else call


class Lineage:
    """What each run of a snapshots folder continued (a training run's parent_snapshot) or
    tested (an evaluation's snapshot_name), found as multiexit.runs.find.resolve found it
    when the run started. ``rows``: {run id: flat row} of the folder's runs."""

    def __init__(self, snapshot_dir, rows):
        self.dir, self.rows, self._named = Path(snapshot_dir), rows, {}

    def source(self, name, run):
        """(run id, epoch of the checkpoint file named, or None) of the run that ``name`` names
        for run ``run``: a path, a run id, else the first of the training runs with that
        snapshot_name that started before ``run`` (find.named_runs' order); None where
        it names no run of this folder."""
        name = str(name).strip()
        for path in (Path(name), self.dir / name):
            if path.exists():
                folder = path if path.is_dir() else path.parent
                if folder.resolve().parent != self.dir.resolve() or folder.name not in self.rows:
                    return None
                epoch = find.EPOCH_FILE.match(path.name) if path.is_file() else None
                return folder.name, int(epoch[1]) if epoch else None
        if name not in self._named:
            self._named[name] = [r.name for r, _ in find.named_runs(name, self.dir)
                                 if find.is_run_dir(r)]
        before = [r for r in self._named[name]
                  if r in self.rows and _run_order(r) < _run_order(run)]
        return (before[0], None) if before else None

    def chain(self, run):
        """[(run id, epoch its child resumed from: None for ``run`` or where the child took
        the last one)], from the first run of ``run``'s parent_snapshot chain to ``run``."""
        chain = [(run, None)]
        while True:
            parent = self.rows[chain[0][0]].get('parent_snapshot')
            found = self.source(parent, chain[0][0]) if _given(parent) else None
            if found is None or found[0] in {r for r, _ in chain}:
                return chain
            chain.insert(0, found)

    def tested(self, run):
        """The run ids that an evaluation tested (its snapshot_name: one or a list)."""
        name = self.rows[run].get('snapshot_name')
        names = json.loads(name) if isinstance(name, str) and name.startswith('[') else [name]
        found = [self.source(n if _given(n) else find.DEFAULT_NAME, run) for n in names]
        return [f[0] for f in found if f is not None]


def history(chain, metrics_of):
    """The metrics frame of a parent_snapshot chain (``Lineage.chain``): each run's epochs,
    those of a parent up to the epoch its child resumed from. ``metrics_of``: run id -> its own
    metrics frame."""
    frames, end = [], float('inf')
    for run, resumed_at in reversed(chain):
        limit = end if resumed_at is None else min(end, resumed_at)
        frame = metrics_of(run)
        frame = frame[frame.index <= limit]
        frames.insert(0, frame)
        end = frame.index.min() - 1 if len(frame) else limit
    frames = [f for f in frames if len(f)]
    return pd.concat(frames) if frames else pd.DataFrame(index=pd.Index([], name='epoch'))


def load_runs(snapshot_dir, with_metrics=True, warn=_warn):
    """Every run of ``snapshot_dir`` as a DataFrame, in run-id order (see the module docstring).

    ``with_metrics=False`` skips metrics.json (faster where only configs and results matter).
    """
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        raise SnapshotError(f'no snapshots folder {snapshot_dir}')
    rows, metrics = {}, {}
    for path in sorted(snapshot_dir.iterdir(), key=lambda p: _run_order(p.name)):
        if not path.is_dir() or path.name.startswith(('_', '.')):  # _sources: sacred's copies
            continue
        try:
            rows[path.name] = load_run(path, with_metrics=False)
            if with_metrics:
                metrics[path.name] = read_metrics(path)
        except MalformedRun as e:
            rows.pop(path.name, None)
            warn(f'skipped {path}: {e}')
    if not rows:
        return pd.DataFrame(columns=META)
    lineage, chains = Lineage(snapshot_dir, rows), {}
    for run, row in rows.items():
        if row['experiment'] == 'eval':
            tested = [rows[r] for r in lineage.tested(run)]
            row['tested_run'] = ','.join(r['run'] for r in tested) or None
            for column, label in (('network', network_label), ('method', method_label)):
                labels = dict.fromkeys(label(r) for r in tested if label(r) is not None)
                row[column] = ', '.join(labels) or None
            continue
        chains[run] = lineage.chain(run)
        row.update(network=network_label(row), method=method_label(row),
                   first_run=chains[run][0][0],
                   parent_run=chains[run][-2][0] if len(chains[run]) > 1 else None)
        if with_metrics:
            row.update(metric_summary(history(chains[run], metrics.get)))
    frame = pd.DataFrame(list(rows.values()))
    for column in ('start_time', 'stop_time'):
        frame[column] = pd.to_datetime(frame[column], errors='coerce')
    frame['duration_s'] = (frame['stop_time'] - frame['start_time']).dt.total_seconds()
    duration = dict(zip(frame['run'], frame['duration_s']))
    frame['total_duration_s'] = frame['run'].map(
        lambda run: sum(duration[r] for r, _ in chains[run]) if run in chains else duration[run])
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
            known = ', '.join(c for c in KNOWN if c in frame.columns)
            raise ConfigError(f'no column {key!r} to filter on (e.g. {known}; --csv lists all)')
        frame = frame[frame[key].map(lambda cell: matches(cell, wanted)).astype(bool)]
    return frame


def _percent(value):
    return f'{100 * value:.2f}' if isinstance(value, (int, float)) and pd.notna(value) else None


def _epochs(row):
    if row.get('experiment') == 'eval' or not _given(row.get('n_epochs')):
        return None
    done = row.get('final_epoch')
    return f'{0 if pd.isna(done) else int(done)}/{int(row["n_epochs"])}'


def _tested_top1(row):
    """An evaluation's test top-1 (mean over exits), one per snapshot it tested."""
    name = row.get('snapshot_name')
    names = json.loads(name) if isinstance(name, str) and name.startswith('[') else None
    keys = ['result.acc1_avg'] if names is None else [f'result.{n}.acc1_avg' for n in names]
    values = [_percent(row.get(k)) for k in keys]
    return ' '.join(v or '-' for v in values) if any(values) else None


def _duration(seconds):
    if not isinstance(seconds, (int, float)) or pd.isna(seconds):
        return None
    minutes, s = divmod(round(seconds), 60)
    return f'{minutes // 60}:{minutes % 60:02d}:{s:02d}'


def _text(value):
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, float) and value == round(value):
        return str(int(value))  # ints with a gap (NaN) somewhere come as floats
    return str(value)


def _name(row):
    name = row.get('snapshot_name')
    if isinstance(name, str) and name.startswith('['):
        return ', '.join(map(str, json.loads(name)))
    return _text(name)


# (header, value of a row, right-aligned) of the printed table: what fits 120 columns, then
# what --wide adds. Top-1 in percent (the files hold fractions), the mean over the exits.
COLUMNS = [
    ('run', lambda r: r['run'], False), ('name', _name, False),
    ('experiment', lambda r: _text(r.get('experiment')), False),
    ('status', lambda r: _text(r.get('status')), False),
    ('network', lambda r: _text(r.get('network')), False),
    ('method', lambda r: _text(r.get('method')), False), ('epochs', _epochs, True),
    ('val top-1 %', lambda r: _percent(r.get('best.val.acc1_avg')), True),
    ('test top-1 %', _tested_top1, True),
]
WIDE = [
    ('started', lambda r: r['start_time'].strftime('%Y-%m-%d %H:%M')
     if pd.notna(r.get('start_time')) else None, False),
    ('duration', lambda r: _duration(r.get('total_duration_s')), True),
    ('parent', lambda r: _text(r.get('parent_run')), True),
    ('tested', lambda r: _text(r.get('tested_run')), True),
    ('named configs', lambda r: _text(r.get('named_configs')) or None, False),
    ('cf_loss.call', lambda r: _text(r.get('cf_loss.call'))
     if r.get('experiment') != 'eval' else None, False),
    ('n/class', lambda r: _text(r.get('cf_trn.n_per_class')), True),
    ('unlabelled/class', lambda r: _text(r.get('cf_trn.n_unl_per_class')), True),
    ('seed', lambda r: _text(r.get('seed')), True),
    ('best epoch', lambda r: _text(r.get('best_epoch')), True),
    ('final val top-1 %', lambda r: _percent(r.get('final.val.acc1_avg')), True),
]
LEGEND = ('top-1 in %, the mean over the exits: val = best epoch of a training run (and of the '
          'runs it resumed), test = evaluation')


def _shorten(text, width):
    """``text`` in ``width`` characters, its middle replaced by '…' where it is longer."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + '…' + text[len(text) - (width - 1 - head):]


def summary(frame, wide=False, width=WIDTH):
    """The table that ``python3 -m multiexit.runs`` prints, as text: the columns of
    ``COLUMNS`` (and ``WIDE``), '-' where a run has no value; without ``wide``, names,
    methods and networks are shortened in the middle so that a line fits ``width``."""
    columns = COLUMNS + WIDE * wide
    rows = [[(value(row) or '-') for _, value, _ in columns]
            for row in frame.to_dict('records')]
    heads = [head for head, _, _ in columns]
    widths = [max(len(x) for x in [head] + [r[i] for r in rows]) for i, head in enumerate(heads)]
    excess = 0 if wide else sum(widths) + 2 * (len(widths) - 1) - width
    shrinkable = [heads.index(h) for h in ('name', 'method', 'network')]
    while excess > 0:  # the widest of them loses a character, down to 10
        i = max(shrinkable, key=lambda k: widths[k])
        if widths[i] <= 10:
            break
        widths[i] -= 1
        excess -= 1
    lines = []
    for cells in [heads] + rows:
        lines.append('  '.join(_shorten(c, w).rjust(w) if right else _shorten(c, w).ljust(w)
                               for c, w, (_, _, right) in zip(cells, widths, columns)).rstrip())
    return '\n'.join(lines)


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


def plot_curves(run_dir, path):
    """Training curves of a run to a PNG, from the first run of its parent_snapshot chain:
    train and validation top-1 of every exit, the temperature and the learning rate, per
    epoch."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SnapshotError(f'no run folder {run_dir}')
    frame, chain = run_history(run_dir.parent, run_dir.name)
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
        for resumed in chain[1:]:  # where each resumed run took over
            first = read_metrics(run_dir.parent / resumed).index.min()
            if pd.notna(first):
                ax.axvline(first - 0.5, color='0.6', linestyle=':', linewidth=1)
    runs = ' <- '.join(reversed(chain)) if len(chain) > 1 else run_dir.name
    fig.suptitle(f'run {runs} {name}'.strip())
    fig.tight_layout()
    fig.savefig(path)


def run_folder(name, snapshot_dir):
    """The folder of the run that ``name`` names: a run id, else what eval.py takes for it (a
    snapshot_name: its newest COMPLETED training run, said on the terminal)."""
    folder = Path(snapshot_dir) / str(name)
    if folder.is_dir():
        return folder
    path = find.resolve(name, snapshot_dir, say=print)
    return path if path.is_dir() else path.parent


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python3 -m multiexit.runs',
        description='List the sacred runs of a snapshots folder (a readable subset of columns; '
                    '--wide: more, --csv writes all of them).')
    parser.add_argument('snapshots', nargs='?',
                        default=os.environ.get('MULTIEXIT_SNAPSHOTS', 'snapshots'),
                        help='snapshots folder (default: $MULTIEXIT_SNAPSHOTS or snapshots)')
    parser.add_argument('--filter', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                        help='keep runs whose column KEY equals VALUE (compared as values: 4 '
                             'matches 4.0; * and ? glob the text), e.g. experiment=eval '
                             'status=COMPLETED cf_loss.call=ClassificationOnlyLoss')
    parser.add_argument('--wide', action='store_true',
                        help=f'more columns (start, duration, parent run, settings), not cut to '
                             f'{WIDTH} characters')
    parser.add_argument('--csv', metavar='PATH', help='write every column of the listed runs')
    parser.add_argument('--plot', nargs='+', default=[], metavar='RUN',
                        help='write training curves, from the first run of a resumed run\'s '
                             'chain, to <snapshots>/<run id>/curves.png; RUN: a run id or a '
                             'snapshot_name')
    args = parser.parse_args(argv)
    with reported_as_one_line():
        filters = [parse_filter(f) for f in args.filter]
        runs = select(load_runs(args.snapshots), filters)
        if runs.empty:
            print(f'no runs in {args.snapshots}' + (' match the filters' if filters else ''))
        else:
            print(summary(runs, wide=args.wide))
            print(LEGEND)
        if args.csv:
            runs.to_csv(args.csv, index=False)
            print(f'wrote {len(runs)} runs x {runs.shape[1]} columns to {args.csv}')
        for run in args.plot:
            run_dir = run_folder(run, args.snapshots)
            plot_curves(run_dir, run_dir / 'curves.png')
            print(f'wrote {run_dir / "curves.png"}')


