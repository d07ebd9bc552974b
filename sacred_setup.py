"""Not a script: what every script of this repository (train_cifar.py, train_imagenet.py,
eval.py) does on sacred's side, which multiexit (the library) never imports.

- ``Experiment``: sacred's, whose runs go to SNAPSHOT_DIR; a misspelled setting or an unknown
  named config is one ``error:`` line (with the closest valid name) and exit code 2, and its log
  keeps quiet about what the user need not hear (the result dict, which each script sums up in
  a line of its own; the keys that named configs add to a dict, which the builders check).
- ``refuse(run)``, ``refusing(run)``: a run stopped by bad input before it did any work leaves
  no run folder.
- ``explicit_keys(run)``: the settings the command line set.
"""
import contextlib
import difflib
import logging
import os
import shutil
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # raised by sacred 0.8.7
import sacred  # noqa: E402
from sacred import SETTINGS  # noqa: E402
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
    removes its folder when it fails instead of recording the failure."""
    refused = False

    def failed_event(self, fail_time, fail_trace):
        if self.refused:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            super().failed_event(fail_time, fail_trace)


class _Quiet(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith(QUIET)


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

    def _create_run(self, command_name=None, config_updates=None, named_configs=(), *args,
                    **kwargs):
        # where every run's config is made: of a command line (run) and of a pack's member
        unknown = [n for n in named_configs if n not in self.named_configs
                   and not os.path.isfile(n)]
        if unknown:
            known = sorted(self.named_configs)
            _exit(f'no named config or config file {unknown[0]!r}'
                  f'{_did_you_mean(unknown[0], known)}; named configs: {", ".join(known)}')
        try:
            return super()._create_run(command_name, config_updates, named_configs, *args,
                                       **kwargs)
        except ConfigAddedError as e:
            key = list(e.__conflicting_configs__)[0]
            known = [k for k in e.__config__ if k != key]
            _exit(f'unknown setting {key}{_did_you_mean(key, known)}; '
                  f'python3 {self.path}.py print_config lists them')


def _exit(message):
    print(f'error: {message}', file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CODE)


def refuse(run):
    """Bad input stopped ``run`` (a sacred Run) before it did any work: its folder goes when it
    fails, and sacred does not add a line of its own to the error line."""
    for observer in run.observers:
        if isinstance(observer, RunFolders):
            observer.refused = True
    run.run_logger.setLevel(logging.CRITICAL)


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
