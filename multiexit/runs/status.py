"""What a run's folder says of its state beyond sacred's status: a RUNNING run whose process is
gone (DEAD) or silent (STALE), and a training run whose metrics.json is missing. Read from its
files only, for the runs table (``table.load_runs``)."""
import datetime
import os
import platform
from pathlib import Path

from .find import is_run_dir, utc_time

# A RUNNING run without a heartbeat for this long is STALE: sacred's observer, and a pack
# member's, beat every 10 s; the margin covers a shared file system's caches and clocks.
STALE_S = 120


def _process_exists(pid):
    try:
        os.kill(pid, 0)  # no signal: whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's
        pass
    return True


def shown_status(run, now=None):
    """The status of a run.json: sacred's, but for a RUNNING run whose process is gone, DEAD
    (its host is this machine and its pid, which every script records, is no process),
    else STALE where its last heartbeat (or its start) is more than STALE_S old at ``now``
    (UTC, as sacred writes times; default: now): killed, hung or on a machine that stopped."""
    status = run.get('status')
    if status != 'RUNNING':
        return status
    host = run.get('host') if isinstance(run.get('host'), dict) else {}
    pid = host.get('pid')
    if (host.get('hostname') == platform.node() and isinstance(pid, int) and pid > 0
            and not _process_exists(pid)):
        return 'DEAD'
    beat = utc_time(run.get('heartbeat') or run.get('start_time'))
    now = now or datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    if beat is not None and (now - beat).total_seconds() > STALE_S:
        return 'STALE'
    return status


def lacks_metrics(run_dir, row):
    """Whether a training run that trained (a checkpoint, or COMPLETED) has no metrics.json:
    sacred writes one at every heartbeat, so it was deleted or never written."""
    return (row['experiment'] != 'eval' and not (Path(run_dir) / 'metrics.json').is_file()
            and (row['status'] == 'COMPLETED' or is_run_dir(run_dir)))
