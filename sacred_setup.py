"""Not a script: what every script of this repository (train_cifar.py, train_imagenet.py,
eval.py) does on sacred's side, which multiexit (the library) never imports.

- ``Experiment``: sacred's, whose runs go to SNAPSHOT_DIR; a misspelled setting or an unknown
  named config is one ``error:`` line (with the closest valid name) and exit code 2, and its log
  keeps quiet about what the user need not hear (the result dict, which each script sums up in
  a line of its own; the keys that named configs add to a dict, which the builders check).
- ``refuse(run)``, ``refusing(run)``: a run stopped by bad input before it did any work leaves
  no run folder and announces nothing: its log holds back sacred's ``Started run with ID``
  until ``announce(run)``, which a script calls once its checks passed (or until the run's
  next log line, say of a crash).
- A snapshots folder that cannot be written, or a config file on the command line that cannot
  be read, is one ``error:`` line too.
- ``explicit_keys(run)``: the settings the command line set.
- ``records_now(run)``: a function that writes a run's records (run.json, cout.txt,
  metrics.json) at once, as its heartbeat does: what training calls after every epoch, before
  the epoch's checkpoint.
"""
import contextlib
import difflib
import functools
import io
import logging
import os
import shutil
import sys
import threading
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # raised by sacred 0.8.7
import sacred  # noqa: E402
from sacred import SETTINGS  # noqa: E402
from sacred.config.config_files import load_config_file  # noqa: E402
from sacred.host_info import HostInfoGetter  # noqa: E402
from sacred.observers import FileStorageObserver  # noqa: E402
from sacred.utils import ConfigAddedError, create_basic_stream_logger  # noqa: E402

from multiexit.errors import EXIT_CODE, UserError  # noqa: E402
from multiexit.progress import strip_progress  # noqa: E402

SETTINGS.CAPTURE_MODE = 'sys'
SETTINGS.HOST_INFO.INCLUDE_GPU_INFO = False
SNAPSHOT_DIR = os.environ.get('MULTIEXIT_SNAPSHOTS', 'snapshots')
QUIET = ('Result: ', 'Added new config entry')  # sacred's log lines that nobody needs to read


class RunFolders(FileStorageObserver):
    """sacred's run folders, except that a run marked ``refused`` (bad input, no work done)
    removes its folder when it fails instead of recording the failure, and that a folder that
    cannot be written is one error line (the run is refused: it has nothing to record into)."""
    refused = False
    run = None  # the sacred Run it records (Experiment._create_run), to refuse it

    def started_event(self, *args, **kwargs):
        # one observer records the runs of a process in turn: nothing of the last one counts
        self.dir, self.refused = None, False
        try:
            return super().started_event(*args, **kwargs)
        except OSError as e:
            self.refused = True
            if self.run is not None:
                refuse(self.run)
            _exit(f'cannot write a run folder in {self.basedir}/ ({type(e).__name__}: '
                  f'{e.strerror or e}{f": {e.filename}" if e.filename else ""}): make '
                  f'{self.basedir} a writable folder, or set MULTIEXIT_SNAPSHOTS=<a writable '
                  f'folder> (where the run folders go)')

    def failed_event(self, fail_time, fail_trace):
        if self.refused:
            if self.dir:
                shutil.rmtree(self.dir, ignore_errors=True)
        else:
            super().failed_event(fail_time, fail_trace)


class _Quiet(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith(QUIET)


class _RunLog(logging.Filter):
    """The filter of a run's own logger: sacred's ``Started run with ID`` is held back until
    ``announce`` (or the run's next line, which follows it); a refused run says nothing."""
    STARTED = 'Started'  # with its id, or alone when unobserved

    def __init__(self, logger):
        super().__init__()
        self.logger, self.held, self.announced, self.refused = logger, [], False, False

    def filter(self, record):
        if self.refused:
            return False
        if not self.announced and record.getMessage().startswith(self.STARTED):
            self.held.append(record)
            return False
        if self.held:  # a line after it: say it first
            self.announce()
        return True

    def announce(self):
        if self.announced or self.refused:
            return
        self.announced = True
        for record in self.held:
            self.logger.handle(record)
        self.held = []


def _own_logger(parent):
    """A logger of a run alone (not in logging's registry, so that a filter on it ends with
    the run), writing through ``parent``'s handlers under its name."""
    logger = logging.Logger(parent.name)
    logger.parent = parent
    logger.addFilter(_RunLog(logger))
    return logger


def root_logger(level):
    """sacred's default log (the root logger, to stderr), without the QUIET lines."""
    log = create_basic_stream_logger()
    log.setLevel(level)
    for handler in log.handlers:
        handler.addFilter(_Quiet())
    return log


def _did_you_mean(word, options):
    match = difflib.get_close_matches(word, sorted(options), n=1)
    return f' (did you mean {match[0]}?)' if match else ''


class Experiment(sacred.Experiment):
    """A sacred Experiment of this repository (module docstring). ``observed=False``: no run
    folders (the processes of a torchrun job other than rank 0); ``log_level``: its log's."""

    def __init__(self, name, observed=True, log_level=logging.INFO):
        super().__init__(name, save_git_info=False)
        self.logger = root_logger(log_level)
        if observed:
            self.observers.append(RunFolders(SNAPSHOT_DIR))
        self.captured_out_filter = strip_progress
        # run.json's host: with the hostname, the process, which the runs table looks for
        self.additional_host_info.append(HostInfoGetter(os.getpid, 'pid'))

    def _create_run(self, command_name=None, config_updates=None, named_configs=(), *args,
                    **kwargs):
        # where every run's config is made: of a command line (run) and of a pack's member
        unknown = [n for n in named_configs if n not in self.named_configs
                   and not os.path.isfile(n)]
        if unknown:
            known = sorted(self.named_configs)
            _exit(f'no named config or config file {unknown[0]!r}'
                  f'{_did_you_mean(unknown[0], known)}; named configs: {", ".join(known)}')
        for name in named_configs:
            if name not in self.named_configs:
                _check_config_file(name)
        try:
            run = super()._create_run(command_name, config_updates, named_configs, *args,
                                      **kwargs)
        except ConfigAddedError as e:
            key = list(e.__conflicting_configs__)[0]
            known = [k for k in e.__config__ if k != key]
            _exit(f'unknown setting {key}{_did_you_mean(key, known)}; '
                  f'python3 {self.path}.py print_config lists them')
        run.run_logger = _own_logger(run.run_logger)
        for observer in run.observers:
            if isinstance(observer, RunFolders):
                observer.run = run
        return run


def _check_config_file(path):
    """A config file named on the command line (sacred reads it as it creates the run) that
    cannot be read as one is an error line naming it, not a traceback."""
    try:
        config = load_config_file(path)
    except Exception as e:  # whatever its format's reader raises (JSON, YAML, pickle)
        detail = str(e).splitlines()[0] if str(e) else ''
        _exit(f'cannot read the config file {path} ({type(e).__name__}'
              f'{": " + detail if detail else ""}): repair or replace it, or give the settings '
              f'on the command line instead')
    if not isinstance(config, dict):
        _exit(f'the config file {path} holds a {type(config).__name__}, not settings '
              f'(a dict): repair or replace it')


def _exit(message):
    print(f'error: {message}', file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CODE)


def _run_log(run):
    """The ``_RunLog`` of a run (every run is made by ``Experiment._create_run``)."""
    return next(f for f in run.run_logger.filters if isinstance(f, _RunLog))


def refuse(run):
    """Bad input stopped ``run`` (a sacred Run) before it did any work: its folder goes when it
    fails, it was never announced, and sacred does not add a line of its own to the error
    line."""
    for observer in run.observers:
        if isinstance(observer, RunFolders):
            observer.refused = True
    _run_log(run).refused = True


def announce(run):
    """``run`` passed its checks: say its id (sacred's ``Started run with ID``, held back until
    now so that a refused run announces none)."""
    _run_log(run).announce()


@contextlib.contextmanager
def refusing(run):
    """``refuse(run)`` if a UserError (bad input) ends the block."""
    try:
        yield
    except UserError:
        refuse(run)
        raise


def explicit_keys(run):
    """The dotted keys of the settings that the command line of ``run`` set (key=value)."""
    def walk(tree, prefix=''):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from walk(value, f'{prefix}{key}.')
            else:
                yield f'{prefix}{key}'
    return set(walk(run.meta_info.get('config_updates') or {}))


def records_now(sacred_run):
    """A function that writes the records of ``sacred_run`` now, as its heartbeat does
    (run.json, cout.txt, metrics.json), for the end of every epoch: the run's records then hold
    the epoch before its checkpoint does. sacred's heartbeat thread calls it too, so that two
    heartbeats never run at once (each takes the metrics logged since the last one); and the
    captured output is read without moving the position that prints write at."""
    lock, beat = threading.Lock(), sacred_run._emit_heartbeat

    def records():
        with lock:
            beat()
    if sacred_run._heartbeat is not None:  # sacred's timer thread, started before main
        sacred_run._heartbeat.func = records
    out = getattr(sacred_run, '_output_file', None)
    if isinstance(getattr(out, 'buffer', None), io.StringIO):  # capture mode 'sys'
        out.get = functools.partial(_unread_output, out)
    return records


def _unread_output(out):
    """What was printed since the last call, of sacred's CapturedStdout ``out``: its own get()
    seeks the buffer that prints write to, so that a line printed from the main thread while the
    heartbeat thread read (seek, then read) went past the reading and was lost from cout.txt."""
    if out.final is not None:  # the rest, once the run ended (sacred's finalize)
        value, out.final = out.final, None
        return value
    text = out.buffer.getvalue()
    value, out.read_position = text[out.read_position:], len(text)
    return value
