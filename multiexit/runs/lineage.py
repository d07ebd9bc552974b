"""Run chains: which run a resumed run continued (its ``parent_snapshot``) and which runs an
evaluation tested (its ``snapshot_name``), found as ``find.resolve`` found them when the run
started, and the metrics of a whole chain.

A resumed run has a folder of its own whose metrics.json holds only the epochs it trained; its
history is its parent's epochs up to the one it resumed from, then its own.
"""
import json
from pathlib import Path

import pandas as pd

from . import find


def given(value):
    """Whether a cell holds a value: not None, empty or NaN (the table's missing value)."""
    return value is not None and str(value).strip() not in ('', 'nan')


class Lineage:
    """What each run of a snapshots folder continued (a training run's parent_snapshot) or
    tested (an evaluation's snapshot_name), found as multiexit.runs.find.resolve found it
    when the run started. ``rows``: {run id: flat row} of the folder's runs."""

    def __init__(self, snapshot_dir, rows):
        self.dir, self.rows, self._named = Path(snapshot_dir), rows, {}

    def source(self, name, run):
        """(run id, epoch of the checkpoint file named, or None) of the run that ``name`` names
        for run ``run``: a path, a run id, else the first of the training runs with that
        snapshot_name that started before ``run`` (find.named_runs' order, ``find.newness``:
        start times, then run ids); None where it names no run of this folder."""
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
                  if r in self.rows and self._newness(r) < self._newness(run)]
        return (before[0], None) if before else None

    def _newness(self, run):
        return find.newness(run, self.rows[run].get('start_time'))

    def chain(self, run):
        """[(run id, epoch its child resumed from: None for ``run`` or where the child took
        the last one)], from the first run of ``run``'s parent_snapshot chain to ``run``."""
        chain = [(run, None)]
        while True:
            parent = self.rows[chain[0][0]].get('parent_snapshot')
            found = self.source(parent, chain[0][0]) if given(parent) else None
            if found is None or found[0] in {r for r, _ in chain}:
                return chain
            chain.insert(0, found)

    def tested(self, run):
        """The run ids that an evaluation tested (its snapshot_name: one or a list)."""
        name = self.rows[run].get('snapshot_name')
        names = json.loads(name) if isinstance(name, str) and name.startswith('[') else [name]
        found = [self.source(n if given(n) else find.DEFAULT_NAME, run) for n in names]
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
