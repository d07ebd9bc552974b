"""Finding runs and their checkpoints: by path, run id or the snapshot_name given at training."""
import datetime
import json
import re
import sys
from pathlib import Path

from ..errors import SnapshotError
from ..train.checkpoint import LAST, load

DEFAULT_NAME = 'test:0'  # the snapshot_name of a training run that sets none
EPOCH_FILE = re.compile(r'^ep(\d+)\.pt$')


def is_run_dir(path):
    path = Path(path)
    return (path / LAST).is_file() or any(EPOCH_FILE.match(p.name) for p in path.glob('ep*.pt'))


def _read(run_dir, name):
    try:
        return json.loads((Path(run_dir) / name).read_text())
    except (OSError, ValueError):
        return None


def recorded_config(run_dir, needed_for):
    """The config.json of a run folder as a dict; None where there is none (a checkpoint file
    outside a run). One that is there but cannot be read is a SnapshotError that names it and
    says what it is ``needed_for``: nothing falls back to default settings silently."""
    path = Path(run_dir) / 'config.json'
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        problem = f'{type(e).__name__}: {e}'
    else:
        if isinstance(config, dict):
            return config
        problem = f'it holds a {type(config).__name__}, not settings'
    raise SnapshotError(f'{path}, the settings that run {Path(run_dir).name} recorded, is '
                        f'unreadable ({problem}); {needed_for}')


class UnknownSnapshot(SnapshotError):
    """No path, run id or training run's snapshot_name is the name given."""


def run_order(name):
    """Sort key of a run folder's name: run ids in numeric order (10 after 9), other names
    after them."""
    return (0, int(name), '') if name.isdigit() else (1, 0, name)


def utc_time(value):
    """A start time (ISO text as sacred writes it, or a datetime) as a naive UTC datetime;
    None where there is none (missing, unreadable, NaT)."""
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime.datetime) or value != value:  # NaT is not itself
        return None
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return value


def newness(name, start_time):
    """Sort key of a run, the newest last: the start time recorded in its run.json (sacred's,
    in UTC; written once when the run starts), then its run id (``run_order``). The start time
    wins because it is what "newest" means and it stays with the run where its folder is copied
    or renamed; the id orders runs that started at the same time and those without a readable
    start time, which count as older than any that has one. Nothing read or written in a run
    folder later (its modification time) changes it."""
    start = utc_time(start_time)
    return (start is not None, start or datetime.datetime.min, run_order(name))


def started(run_dir):
    """``newness`` of a run folder, from its run.json."""
    info = _read(run_dir, 'run.json')
    return newness(Path(run_dir).name, info.get('start_time') if isinstance(info, dict) else None)


def named_runs(name, snapshot_dir, unreadable=None):
    """[(run folder, status)] of the training runs of ``snapshot_dir`` whose config.json has
    ``snapshot_name=name`` (an evaluation's names what it evaluated), in the order to take them:
    COMPLETED before any other status (a newer INTERRUPTED or RUNNING run of the same
    name is unfinished), then the newest (``newness``: the latest start, then the highest
    run id). ``unreadable``: a list that gets the run folders with a checkpoint whose
    config.json is there but cannot be read (their name is unknown)."""
    runs = []
    for run in Path(snapshot_dir).iterdir() if Path(snapshot_dir).is_dir() else ():
        cf = _read(run, 'config.json') if run.is_dir() else None
        if (cf is None and unreadable is not None and (run / 'config.json').is_file()
                and is_run_dir(run)):
            unreadable.append(run)
        if not isinstance(cf, dict) or str(cf.get('snapshot_name')) != name:
            continue
        info = _read(run, 'run.json')
        info = info if isinstance(info, dict) else {}
        if (info.get('experiment') or {}).get('name') != 'eval':
            status = info.get('status')
            key = newness(run.name, info.get('start_time'))
            runs.append((status == 'COMPLETED', key, run, status))
    return [(run, status) for *_, run, status in sorted(runs, reverse=True)]


def resolve(name, snapshot_dir='snapshots', say=None):
    """Path of a checkpoint file or training run directory named by ``name``.

    ``name`` may be a path (file or run directory), a run id (a folder of ``snapshot_dir``) or
    the ``snapshot_name`` given at training: of the training runs with that name and a
    checkpoint, the newest COMPLETED one, else the newest (``named_runs``; newest: the latest
    start time in run.json, then the highest run id). ``say``: called
    with one line saying which run a name chose.
    """
    name = str(name).strip()
    if not name:
        raise SnapshotError('no snapshot given: set snapshot_name=<run id, snapshot name or path>')
    snapshot_dir = Path(snapshot_dir)
    for path in (Path(name), snapshot_dir / name):
        if path.is_file() or (path.is_dir() and is_run_dir(path)):
            return path
        if path.is_dir():
            raise SnapshotError(f'{path} holds no checkpoint ({LAST} or ep<N>.pt): not a '
                                f'training run, or it stopped before its first epoch')
    unreadable = []
    named = named_runs(name, snapshot_dir, unreadable)
    for run in sorted(unreadable, key=lambda r: run_order(r.name)):
        print(f'warning: {run}/config.json is unreadable, so run {run.name} may be a run named '
              f'{name!r} that is left out; restore the file (python3 -m multiexit.runs shows the '
              'runs)', file=sys.stderr, flush=True)
    usable = [(run, status) for run, status in named if is_run_dir(run)]
    if not usable and named:
        runs = ', '.join(f'{run.name} ({status or "no status"})' for run, status in named)
        raise SnapshotError(
            f'snapshot_name={name!r} is the name of training run{"s" * (len(named) > 1)} {runs} '
            f'in {snapshot_dir}/, but no epoch of {"them" if len(named) > 1 else "it"} finished, '
            f'so there is no checkpoint ({LAST} or ep<N>.pt) to use: train it again, or name '
            f'another run')
    if not usable:
        raise UnknownSnapshot(f'no snapshot {name!r}: not a path, not a run id in '
                              f'{snapshot_dir}/ and no training run there has '
                              f'snapshot_name={name!r} (python3 -m multiexit.runs lists the '
                              f'runs)')
    (run, status), others = usable[0], usable[1:]
    if say is not None:
        chosen = started(run)
        newer = [f'run {r.name} ({s or "no status"})' for r, s in others if started(r) > chosen]
        say(f'snapshot_name={name!r}: run {run.name} ({status or "no status"}'
            + (f', the newest COMPLETED of {len(usable)} runs with that name; newer but '
               f'unfinished: {", ".join(newer)}' if newer else
               f', the newest of {len(usable)} runs with that name' if others else '')
            + ')')
    return run


def recorded_seed(name, snapshot_dir='snapshots'):
    """The seed that the training state named by ``name`` (as ``resolve`` takes it) was trained
    with: what orders its data and draws its augmentation. None for a model snapshot."""
    path = resolve(name, snapshot_dir)
    ckpt = load(path / LAST if path.is_dir() else path, mmap=True)
    return ckpt.get('seed') if isinstance(ckpt, dict) and 'optimizer' in ckpt else None


def epoch_files(run_dir):
    """{epoch: path} of the ``ep<N>.pt`` model snapshots of a run."""
    out = {}
    for p in Path(run_dir).glob('ep*.pt'):
        m = EPOCH_FILE.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def pick_checkpoint(path, which='best'):
    """The checkpoint file to evaluate: ``path`` itself if a file, else from a run directory.

    ``which``: 'best' (highest validation acc1_avg among the ep<N>.pt files), 'last', or an
    epoch number.
    """
    path = Path(path)
    if path.is_file():
        return path
    if which == 'last':
        return path / LAST
    files = epoch_files(path)
    if which == 'best':
        if not files:
            raise SnapshotError(f'{path} has no ep<N>.pt snapshot; use checkpoint=last')
        score = lambda ep: load(files[ep]).get('val_metrics', {}).get('acc1_avg', float('-inf'))
        return files[max(files, key=score)]
    try:
        return files[int(which)]
    except (KeyError, ValueError):
        raise SnapshotError(f"no checkpoint {which!r} in {path}: use 'best', 'last' or one of the "
                            f'epochs {sorted(files)}') from None
