"""Errors caused by the user's input (data, configuration, snapshots).

Scripts report them as one line and exit non-zero instead of printing a traceback. A message
that says how to resume a run carries that as data (``Resume``): the library does not know the
command line that started it, so the script that reports the error sets ``command``.
"""
import contextlib
import os
import sys
from pathlib import Path


class Resume:
    """The part of a message that says how to continue the run in ``run_dir`` with the settings
    it recorded (its config.json), ``extra`` settings after them."""

    def __init__(self, run_dir, extra=''):
        self.run_dir, self.extra = Path(run_dir), extra

    def updates(self):
        """What follows ``with`` on the command line that resumes the run."""
        config = self.run_dir / 'config.json'
        return ((f'{config} ' if config.is_file() else '') + f'parent_snapshot={self.run_dir}'
                + (f' {self.extra}' if self.extra else ''))


class _Told:
    """An error whose message is its parts, strings and ``Resume``s; ``command``: how the
    script that reports it is started (``accel.distributed.launch_command``)."""
    command = 'python3 <training script>'

    def __str__(self):
        return ''.join(f'{self.command} with {part.updates()}' if isinstance(part, Resume)
                       else str(part) for part in self.args)

    def resumes(self):
        """The runs that the message says how to resume."""
        return [part for part in self.args if isinstance(part, Resume)]


class UserError(_Told, Exception):
    """Something the user can fix; the message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid."""


class DataError(UserError):
    """The data set is missing or unreadable."""


class SnapshotError(UserError):
    """A snapshot or checkpoint cannot be found or loaded."""


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (the previous one is intact)."""


class PeerLostError(UserError):
    """Another process of a torchrun job failed or stopped answering."""


class TrainingInterrupted(_Told, KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training; the message says how to resume.

    A KeyboardInterrupt, so that sacred marks the run INTERRUPTED rather than FAILED.
    """


EXIT_CODE = 2
EXIT_CODE_INTERRUPTED = 130


@contextlib.contextmanager
def started_with(command):
    """Errors raised in the block that say how to resume a run name ``command``: how the script
    reporting them was started (``accel.distributed.launch_command``)."""
    try:
        yield
    except (UserError, TrainingInterrupted) as e:
        e.command = command
        raise


@contextlib.contextmanager
def reported_as_one_line():
    """Turn a UserError into one line on stderr and exit code 2 (MULTIEXIT_DEBUG=1: traceback).

    Under torchrun with several processes, each error line names its rank, and only rank 0
    reports an interruption (all of them are interrupted together).
    """
    rank = int(os.environ.get('RANK', 0))
    tag = f'[rank {rank}] ' if int(os.environ.get('WORLD_SIZE', 1)) > 1 else ''
    try:
        yield
    except TrainingInterrupted as e:
        if rank == 0:
            print(f'interrupted: {e}', file=sys.stderr, flush=True)
        raise
    except UserError as e:
        if os.environ.get('MULTIEXIT_DEBUG'):
            raise
        print(f'error: {tag}{e}', file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODE) from None
