"""One cell of the grid: how far it is done, and running what is missing of it as a
training run (train_cifar.py or train_imagenet.py) and an eval.py run, each its own process,
that SIGINT and SIGTERM stop cleanly.

Every way of running the grid (one cell after another, several at once, a task of a SLURM job
array) goes through ``run_cell``, which looks at the snapshots folder first: a cell is done
once its training run COMPLETED and an evaluation of its best snapshot COMPLETED; an unfinished
training run with a last.pt is resumed. So running a cell again, after an interruption, a
failure or a preemption, continues where it stopped.
"""
import contextlib
import datetime
import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from multiexit import runs
from multiexit.checkpoints import LAST

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
    def identity(self):
        """Filters that a training run of this cell matches (multiexit.runs.select)."""
        return ([('experiment', Path(self.script).stem),
                 ('named_configs', ','.join(self.named_configs))]
                + [f for f in map(runs.parse_filter, self.settings) if f[0] not in DEVICE_KEYS])


def load(snapshots, warn):
    """The runs of the snapshots folder (an empty table while it does not exist)."""
    if not Path(snapshots).is_dir():
        return pd.DataFrame(columns=runs.META)
    return runs.load_runs(snapshots, with_metrics=False, warn=warn)


def _newest(frame):
    return None if frame.empty else frame.iloc[-1]


def state(table, cell, snapshots):
    """(completed training run, resumable training run, evaluation run) of a cell, or None."""
    trained = runs.select(table, cell.identity, strict=False)
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
    tests = runs.select(table, filters, strict=False)
    if 'checkpoint' in tests:
        tests = tests[tests['checkpoint'].map(lambda c: runs.matches(c, 'None')
                                              or runs.matches(c, 'best')).astype(bool)]
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


def call(script, updates, snapshots, stop, log=None, env=None, training=False, preexec=None):
    """Run a script of the repository as a user would; returns (its exit code, its last
    'error: ...' line or None).

    Its output goes to the file ``log``, else to this terminal (stderr through this process,
    which watches it for the error line). It runs in a session of its own, so that a Ctrl-C on
    the terminal reaches this process only, which passes it on to a training process through
    ``stop``.
    """
    cmd = [sys.executable, str(ROOT / script), 'with', *updates]
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
    return code, tee.error() if tee is not None else last_error(log.name, start)


class Tee(threading.Thread):
    """Copies a process's stderr to this one's as it comes (progress bars too) and keeps its
    end, for its last 'error: ...' line (``error()``)."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.tail = stream, b''
        self.start()

    def error(self):
        return _error_line(self.tail.decode(errors='replace'))

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


def log_path(out, cell):
    """Where the output of a cell's processes goes, when not to the terminal."""
    return Path(out) / 'logs' / f'{cell.name}.log'


def run_logged(cell, snapshots, stop, path, header, env=None, preexec=None):
    """``run_cell`` with the output of its processes, and notes on its steps, appended to the
    log file ``path``, after a line with the time and ``header``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'a') as log:
        def note(message):
            print(f'# {message}', file=log, flush=True)
        note(f'{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {header}')
        return run_cell(cell, snapshots, stop, log=log, env=env, preexec=preexec,
                        warn=lambda message: note(f'warning: {message}'), say=note)


def run_cell(cell, snapshots, stop, log=None, env=None, warn=print, say=print, preexec=None):
    """Train or resume, then test, whatever a cell is missing; returns its Outcome.

    ``say`` reports each step; ``log``, ``env`` and ``preexec`` go to ``call``."""
    def step(script, updates, training=False):
        """(Outcome of a failure of the script, the runs after it)."""
        code, error = call(script, updates, snapshots, stop, log, env, training, preexec)
        reason = f'{script} exit code {code}' + (f' ({error})' if error else '')
        return Outcome('failed', reason=reason, code=code, error=error), load(snapshots, warn)

    train, parent, test = state(load(snapshots, warn), cell, snapshots)
    if train is not None and test is not None:
        return Outcome('done', train, test)
    if train is None:
        resume = [] if parent is None else [f'parent_snapshot={parent["run"]}']
        say('training' if parent is None else f'resuming run {parent["run"]}')
        failure, table = step(cell.script, cell.updates + resume, training=True)
        train, parent, test = state(table, cell, snapshots)
        if train is None:
            if stop.signum is not None:
                return Outcome('interrupted', kept=parent is not None)
            return failure
        if stop.signum is not None:  # trained just before the signal; tested next time
            return Outcome('interrupted', train)
    if test is None:
        say(f'testing run {train["run"]}')
        failure, table = step('eval.py', [f'snapshot_name={train["run"]}'])
        test = evaluation(table, train['run'])
        if test is None:
            failure.train = train
            return failure
    return Outcome('ran', train, test)


def _error_line(text):
    return next((line for line in reversed(text.splitlines()) if line.startswith('error: ')),
                None)


def last_error(path, start=0):
    """The last 'error: ...' line (what the scripts report) of a log file from byte ``start``."""
    try:
        with open(path, 'rb') as f:
            f.seek(start)
            return _error_line(f.read().decode(errors='replace'))
    except OSError:
        return None
