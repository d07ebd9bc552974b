"""Errors caused by the user's input (data, configuration, snapshots).

Scripts report them as one line and exit non-zero instead of printing a traceback.
"""
import contextlib
import os
import sys


class UserError(Exception):
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


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training; the message says how to resume.

    A KeyboardInterrupt, so that sacred marks the run INTERRUPTED rather than FAILED.
    """


EXIT_CODE = 2
EXIT_CODE_INTERRUPTED = 130


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
