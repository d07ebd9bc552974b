"""The sacred runs of a snapshots folder as one pandas table, and filters on it.

One row per run folder: ``run`` (its id), ``experiment`` (train_cifar or eval), ``status``
(sacred's, but DEAD or STALE for a RUNNING run that is not running: ``shown_status``),
``start_time``, ``stop_time``, ``duration_s``, ``named_configs``; the configuration flattened to
dotted keys (``cf_loss.call``, ``cf_trn.n_per_class``, ``seed``, ...; lists as JSON text);
``network`` and ``method`` (of a training run, or of the runs an evaluation tested); for
training runs ``final_epoch`` and ``final.<metric>`` (the last logged value of every metric of
metrics.json), ``best_epoch`` and ``best.<metric>`` (the epoch with the highest ``val.acc1_avg``,
the first one on a tie, as training keeps it); and ``result.<key>``, the sacred result (for an
evaluation, the test metrics such as ``result.acc1_clf0``). Metrics are fractions (0.25 is
25 %), as in every file the runs write; the printed table (``summary``) gives percent and says
so.

A resumed run (``parent_snapshot``) has a folder of its own whose metrics.json holds only the
epochs it trained. Its row follows the chain of parents back to the first run: the metric
columns are those of the whole history (the parent's epochs up to the one resumed from, then
its own), ``parent_run`` and ``first_run`` are the run ids of its parent and of the first run,
and ``total_duration_s`` sums the durations along the chain (``lineage``; ``curves`` draws the
whole history). A parent named by snapshot_name is found as ``multiexit.runs.find.resolve``
finds it, among the runs that started before.

The JSON files that sacred's FileStorageObserver writes are read directly: the library never
imports sacred. Folders that are not readable runs (no or garbled config.json / run.json /
metrics.json) are skipped with a warning; sacred's ``_sources`` is not a run and is passed over.
A training run that trained (a checkpoint, or COMPLETED) but has no metrics.json is listed, with
a warning that says so.
"""
import ast
import fnmatch
import json
import sys
from pathlib import Path

import pandas as pd

from ..errors import ConfigError, SnapshotError
from .find import run_order
from .lineage import Lineage, history
from .status import lacks_metrics, shown_status

META = ['run', 'experiment', 'status', 'start_time', 'stop_time', 'duration_s', 'named_configs']
# Columns named when a filter names none (``--csv`` lists them all).
KNOWN = ['run', 'experiment', 'status', 'snapshot_name', 'network', 'method', 'named_configs',
         'cf_loss.call', 'cf_trn.n_per_class', 'seed', 'final_epoch', 'best.val.acc1_avg',
         'result.acc1_avg']
METHODS = {'ClassificationOnlyLoss': 'standard', 'DistillationBasedLoss': 'DBT',  # cf_loss.call
           'DistillationLossConstTemp': 'distillation, T={T}',
           'DistillationFromLaterExits': 'distillation from later exits',
           'DistillationFromNextExit': 'distillation from the next exit',
           'IMTADistillation': 'IMTA distillation', 'SdnWeightedLoss': 'SDN weighted CE'}


class MalformedRun(SnapshotError):
    """A folder of the snapshots directory is not a readable sacred run."""


def print_warning(message):
    print(f'warning: {message}', file=sys.stderr, flush=True)


def read_json(run_dir, name, required=True):
    """The JSON object in ``run_dir / name`` ({} where it is missing and not ``required``);
    raises MalformedRun."""
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
    raw = read_json(Path(run_dir), 'metrics.json', required=False)
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
    run = read_json(run_dir, 'run.json')
    config = read_json(run_dir, 'config.json')
    row = flatten(config)
    row.update(run=run_dir.name, experiment=(run.get('experiment') or {}).get('name'),
               status=shown_status(run), start_time=run.get('start_time'),
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


def method_label(row):
    """The training method of a run's flat config: standard, DBT, distillation, T=4, ... with
    the network options and regime that make a method (', GE', ', boosted', ', disjoint'), and
    ' + unlabelled' for semi-supervised training; None without cf_loss.call."""
    call = row.get('cf_loss.call')
    if not isinstance(call, str):
        return None
    T = row.get('cf_loss.T')
    label = METHODS.get(call, call).format(T=f'{T:g}' if isinstance(T, (int, float)) else '?')
    if row.get('cf_net.gradient_equilibrium') is True:  # IMTA's, models.equilibrium
        label += ', GE'
    if row.get('cf_net.boost_reweight') is not None:  # boosted exits (models.boosted)
        label += ', boosted'
    regime = row.get('cf_regime.call')
    if isinstance(regime, str) and regime != 'joint':  # train.regime
        label += f', {regime}'
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


def load_runs(snapshot_dir, with_metrics=True, warn=print_warning):
    """Every run of ``snapshot_dir`` as a DataFrame, in run-id order (see the module docstring).

    ``with_metrics=False`` skips metrics.json (faster where only configs and results matter).
    """
    snapshot_dir = Path(snapshot_dir)
    if not snapshot_dir.is_dir():
        raise SnapshotError(f'no snapshots folder {snapshot_dir}')
    rows, metrics = {}, {}
    for path in sorted(snapshot_dir.iterdir(), key=lambda p: run_order(p.name)):
        if not path.is_dir() or path.name.startswith(('_', '.')):  # _sources: sacred's copies
            continue
        try:
            rows[path.name] = load_run(path, with_metrics=False)
            if with_metrics:
                metrics[path.name] = read_metrics(path)
                if lacks_metrics(path, rows[path.name]):
                    warn(f'{path}: no metrics.json, so its epochs and accuracies are missing '
                         f'from the table (the file was deleted or never written)')
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
