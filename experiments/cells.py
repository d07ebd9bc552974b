"""One cell of the grid, or a pack of cells trained together: how far each is done, and
running what is missing as a training run (train_cifar.py or train_imagenet.py; train_pack.py
for the cells of a pack) and an eval.py run per cell, each its own process, that SIGINT and
SIGTERM stop cleanly.

Every way of running the grid (one unit after another, several at once, a task of a SLURM job
array) goes through ``run_unit``, which looks at the snapshots folder first: a cell is done
once its training run COMPLETED and an evaluation of its best snapshot COMPLETED; an unfinished
training run with a last.pt is resumed. So running a cell again, after an interruption, a
failure or a preemption, continues where it stopped.
"""
import contextlib
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from multiexit.runs import find
from multiexit.runs.table import META, load_runs, matches, parse_filter, select
from multiexit.train.checkpoint import LAST

ROOT = Path(__file__).resolve().parents[1]
# Updates that change where a run trains, not what it computes: a cell done on another GPU is done.
DEVICE_KEYS = {'gpu'}
# Output to a log file: without progress bars, which would fill it, and each line at once, so
# that it can be followed (tail -f).
TO_FILE = {'TQDM_DISABLE': '1', 'PYTHONUNBUFFERED': '1'}
TEE_WAIT_S = 10  # for the rest of a script's stderr once it ended


@dataclass(frozen=True)
class Cell:
    method: str
    size: int
    seed: int
    name: str  # the training run's snapshot_name
    named_configs: tuple
    settings: tuple  # config updates 'key=value': the cell's own, then those given after --
    script: str = 'train_cifar.py'  # the training script

    @property
    def updates(self):
        return [*self.named_configs, *self.settings]

    @property
    def cells(self):
        """The cells of this unit of the grid's work: itself (a Pack has several)."""
        return (self,)

    @property
    def identity(self):
        """Filters that a training run of this cell matches (multiexit.runs.select)."""
        return ([('experiment', Path(self.script).stem),
                 ('named_configs', ','.join(self.named_configs))]
                + [f for f in map(parse_filter, self.settings) if f[0] not in DEVICE_KEYS])


# The settings in which the members of a pack may differ (a prefix ending in '.': a section).
PER_MEMBER = ('snapshot_name', 'seed', 'cf_trn.seed', 'cf_loss.')


def _per_member(update):
    key = update.partition('=')[0]
    return any(key == p or p.endswith('.') and key.startswith(p) for p in PER_MEMBER)


@dataclass(frozen=True)
class Pack:
    """Cells trained together as one pack (train_pack.py, one fused network): of one script,
    with the same named configs and settings but those of ``PER_MEMBER`` (method, seed)."""
    cells: tuple

    @property
    def name(self):
        """E.g. grid/pack/n25/standard-s0+dbt-s0: the prefix and size of its cells, and theirs."""
        prefix, _, size, _ = self.cells[0].name.rsplit('/', 3)
        return f'{prefix}/pack/{size}/' + '+'.join(f'{c.method}-s{c.seed}' for c in self.cells)


def packed(cells, size):
    """``cells`` as the units to run: Packs of up to ``size`` cells that can share one (the
    first of those of one script, named configs and other settings, in order), the rest alone.
    ``size`` None: all that can share one. Their methods may differ (``train.pack.PackLoss``)."""
    groups = {}
    for cell in cells:
        key = (cell.script, cell.named_configs,
               tuple(u for u in cell.settings if not _per_member(u)))
        groups.setdefault(key, []).append(cell)
    units = []
    for group in groups.values():
        step = size or len(group)
        for i in range(0, len(group), step):
            part = tuple(group[i:i + step])
            units.append(Pack(part) if len(part) > 1 else part[0])
    order = {cell: i for i, cell in enumerate(cells)}
    return sorted(units, key=lambda unit: order[unit.cells[0]])


def load(snapshots, warn):
    """The runs of the snapshots folder (an empty table while it does not exist)."""
    if not Path(snapshots).is_dir():
        return pd.DataFrame(columns=META)
    return load_runs(snapshots, with_metrics=False, warn=warn)


def _newest(frame):
    """The newest run of a table's rows, as a name means it (``find.newness``), or None."""
    if frame.empty:
        return None
    return frame.loc[max(frame.index, key=lambda i: find.newness(frame.at[i, 'run'],
                                                               frame.at[i, 'start_time']))]


def state(table, cell, snapshots):
    """(completed training run, resumable training run, evaluation run) of a cell, or None."""
    trained = select(table, cell.identity, strict=False)
    done = _newest(trained[trained['status'] == 'COMPLETED'])
    resumable = trained['run'].map(lambda r: (Path(snapshots) / r / LAST).is_file()).astype(bool)
    unfinished = trained[(trained['status'] != 'COMPLETED') & resumable]
    if done is not None:
        return done, None, evaluation(table, done['run'])
    return None, _newest(unfinished), None


def evaluation(table, run_id):
    """The newest COMPLETED test evaluation of a training run's best snapshot, or None
    (``checkpoint=None``, eval.py's default, is the best snapshot too)."""
    filters = [('experiment', 'eval'), ('status', 'COMPLETED'), ('snapshot_name', run_id)]
    tests = select(table, filters, strict=False)
    if 'checkpoint' in tests:
        tests = tests[tests['checkpoint'].map(lambda c: matches(c, 'None')
                                              or matches(c, 'best')).astype(bool)]
    return _newest(tests)


class Stop:
    """Whether SIGINT or SIGTERM asked the grid to stop, and the training processes to pass the
    signal on to. Each gets it once (``send``): a second signal could strike while it records
    how to resume. An evaluation in progress finishes, which takes seconds."""

    def __init__(self):
        self.signum = None
        self.event = threading.Event()  # set at once, so that waiting threads notice
        self.training = set()  # the training processes running
        self._sent = set()

    def request(self, signum, frame=None):
        """As a signal handler, it only takes note: the threads waiting for processes send."""
        if self.signum is None:
            self.signum = signum
        self.event.set()

    @property
    def name(self):
        return signal.Signals(self.signum).name

    def send(self, proc, signum=None):
        if proc.pid not in self._sent and proc.poll() is None:
            self._sent.add(proc.pid)
            proc.send_signal(signum or self.signum)

    def now(self, signum, timeout_s):
        """Stop every training process now and wait up to ``timeout_s`` for them: for a signal
        handler after which the waiting loop does not go on (a cluster task being requeued)."""
        self.request(signum)
        for proc in list(self.training):
            self.send(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout_s)

    @contextlib.contextmanager
    def handling_signals(self):
        """SIGINT and SIGTERM call ``request`` instead of raising KeyboardInterrupt or ending
        this process (the main thread only)."""
        previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


@dataclass
class Outcome:
    status: str  # 'done' (before), 'ran' (done now), 'failed' or 'interrupted'
    train: pd.Series = None  # the training run's row
    test: pd.Series = None  # the evaluation run's row
    reason: str = ''  # of a failure: which script, its exit code and its error line
    code: int = None  # of a failure: the exit code of the script that failed
    error: str = None  # of a failure: that script's last 'error: ...' line, if it printed one
    kept: bool = False  # of an interruption: a training run of the cell has a last.pt


def call(args, snapshots, stop, log=None, env=None, training=False, preexec=None):
    """Run a script of the repository as a user would (``args``: the script and what follows
    it); returns (its exit code, the end of its output, where its error lines are).

    Its output goes to the file ``log``, else to this terminal (stderr through this process,
    which keeps its end). It runs in a session of its own, so that a Ctrl-C on the terminal
    reaches this process only, which passes it on to a training process through ``stop``.
    """
    cmd = [sys.executable, *map(str, args)]
    env = dict(os.environ if env is None else env, MULTIEXIT_SNAPSHOTS=str(snapshots))
    if log is not None:
        env.update(TO_FILE)
    print(f'$ MULTIEXIT_SNAPSHOTS={shlex.quote(str(snapshots))} {shlex.join(cmd)}', flush=True,
          file=log or sys.stdout)
    start = os.path.getsize(log.name) if log is not None else 0
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.PIPE if log is None else subprocess.STDOUT,
                            start_new_session=True, preexec_fn=preexec)
    tee = Tee(proc.stderr) if log is None else None
    try:
        if training:
            stop.training.add(proc)
            while proc.poll() is None and stop.signum is None:
                stop.event.wait(1)
            stop.send(proc)
        code = proc.wait()
    finally:  # left by an exception (a cluster task's requeue): the process stops first
        if proc.poll() is None:
            stop.send(proc, signal.SIGTERM)
            proc.wait()
        stop.training.discard(proc)
        if tee is not None:  # its end: a process the script left behind may hold it open
            tee.join(TEE_WAIT_S)
    return code, tee.text() if tee is not None else _read(log.name, start)


class Tee(threading.Thread):
    """Copies a process's stderr to this one's as it comes (progress bars too) and keeps its
    end, for its last 'error: ...' line (``error()``)."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.tail = stream, b''
        self.start()

    def text(self):
        return self.tail.decode(errors='replace')

    def run(self):
        out = getattr(sys.stderr, 'buffer', None)
        for chunk in iter(lambda: os.read(self.stream.fileno(), 1 << 16), b''):
            if out is not None:
                out.write(chunk)
                out.flush()
            else:  # a stderr without bytes (pytest's capture)
                print(chunk.decode(errors='replace'), end='', file=sys.stderr, flush=True)
            self.tail = (self.tail + chunk)[-(1 << 16):]
        self.stream.close()


def log_path(out, unit):
    """Where the output of a unit's processes goes (a cell's, or a pack's), when not to the
    terminal."""
    return Path(out) / 'logs' / f'{unit.name}.log'


def run_logged(unit, snapshots, stop, path, header, env=None, preexec=None):
    """``run_unit`` with the output of its processes, and notes on its steps, appended to the
    log file ``path``, after a line with the time and ``header``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'a') as log:
        def note(message):
            print(f'# {message}', file=log, flush=True)
        note(f'{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {header}')
        return run_unit(unit, snapshots, stop, log=log, env=env, preexec=preexec,
                        warn=lambda message: note(f'warning: {message}'), say=note)


def run_unit(unit, snapshots, stop, log=None, env=None, warn=print, say=print, preexec=None):
    """Train or resume, then test, whatever the cells of ``unit`` (a Cell, or a Pack of cells
    trained together) are missing; returns [(cell, Outcome)], in the unit's order.

    The cells to train or resume are one process: the training script of one cell, or
    train_pack.py with every cell of a pack as a member. ``say`` reports each step; ``log``,
    ``env`` and ``preexec`` go to ``call``."""
    cells, table = unit.cells, load(snapshots, warn)
    states = {cell: state(table, cell, snapshots) for cell in cells}
    done = {cell for cell in cells if states[cell][2] is not None}
    outcomes = {cell: Outcome('done', *states[cell][::2]) for cell in done}
    to_train = [cell for cell in cells if states[cell][0] is None]
    if to_train:
        members = [cell.updates + ([f'parent_snapshot={states[cell][1]["run"]}']
                                   if states[cell][1] is not None else []) for cell in to_train]
        what = ['training' if states[c][1] is None else f'resuming run {states[c][1]["run"]}'
                for c in to_train]
        say(what[0] if len(to_train) == 1 else 'training as one pack: ' + ', '.join(
            f'{c.name} ({w})' for c, w in zip(to_train, what)))
        script = to_train[0].script
        args = ([ROOT / script, 'with', *members[0]] if len(to_train) == 1 else
                [ROOT / 'train_pack.py', '--script', script,
                 *(word for updates in members for word in ['--member', *updates])])
        code, output = call(args, snapshots, stop, log, env, training=True, preexec=preexec)
        table = load(snapshots, warn)
        for cell in to_train:
            states[cell] = train, parent, _ = state(table, cell, snapshots)
            if train is None and stop.signum is not None:
                outcomes[cell] = Outcome('interrupted', kept=parent is not None)
            elif train is None:
                error = member_error(output, cell.name) or error_line(output)
                outcomes[cell] = _failure(args[0].name, code, error)
    for cell in cells:
        train, _, test = states[cell]
        if cell in outcomes:
            continue
        if stop.signum is not None:  # trained just before the signal; tested next time
            outcomes[cell] = Outcome('interrupted', train)
            continue
        say(f'testing run {train["run"]}' + (f' ({cell.name})' if len(cells) > 1 else ''))
        # no timing: the tables hold no times, and cells side by side would time each other
        code, output = call([ROOT / 'eval.py', 'with', f'snapshot_name={train["run"]}',
                             'time_repeats=0'],
                            snapshots, stop, log, env, preexec=preexec)
        test = evaluation(load(snapshots, warn), train['run'])
        outcomes[cell] = (Outcome('ran', train, test) if test is not None else
                          _failure('eval.py', code, error_line(output), train))
    return [(cell, outcomes[cell]) for cell in cells]


def _failure(script, code, error, train=None):
    reason = f'{script} exit code {code}' + (f' ({error})' if error else '')
    return Outcome('failed', train, reason=reason, code=code, error=error)


def error_line(text):
    """The last line of ``text`` that starts with 'error: ' (what the scripts report), or None."""
    return next((line for line in reversed(text.splitlines()) if line.startswith('error: ')),
                None)


def member_error(text, name):
    """The last 'error: ...' line of the pack member of snapshot_name ``name`` in the output
    ``text`` of train_pack.py, where its lines start with '[run <id>: <name>] '."""
    member = re.compile(rf'^\[run \d+: {re.escape(name)}\] (error: .*)$')
    return next((m[1] for m in map(member.match, reversed(text.splitlines())) if m), None)


def _read(path, start=0):
    try:
        with open(path, 'rb') as f:
            f.seek(start)
            return f.read().decode(errors='replace')
    except OSError:
        return ''


def cell_error(path, name):
    """The last 'error: ...' line of the cell of snapshot_name ``name`` in a log file (of the
    cell, or of its pack: its member's own, else the pack's)."""
    text = _read(path)
    return member_error(text, name) or error_line(text)
