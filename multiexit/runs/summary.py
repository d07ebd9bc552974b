"""The runs table as ``python3 -m multiexit.runs`` prints it: a readable subset of the columns
of ``table.load_runs``, top-1 in percent (the files hold fractions), shortened to fit a terminal
unless ``--wide``."""
import json

import pandas as pd

from .lineage import given

WIDTH = 120  # of the table printed without --wide


def _percent(value):
    return f'{100 * value:.2f}' if isinstance(value, (int, float)) and pd.notna(value) else None


def _epochs(row):
    if row.get('experiment') == 'eval' or not given(row.get('n_epochs')):
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
