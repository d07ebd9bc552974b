"""``--cluster slurm``: every cell of the grid that is not done becomes one task of a SLURM job
array (with ``--pack``, every pack of such cells), submitted through submitit; ``--cluster
local`` runs the same tasks as background processes of this machine (submitit's
LocalExecutor), which tests this path without SLURM.

A task is ``cells.run_unit``: the training run of the cell (or the pack's), resumed from last.pt
where there is one, then an eval.py run per cell, with their output in the unit's log. When a task's time limit nears,
or SLURM preempts it (where the cluster signals preemptions), SLURM sends submitit's signal
(USR2); the task stops its training process as Ctrl-C would (last.pt keeps the last finished
epoch) and submitit requeues it, and the task that runs again resumes from that last.pt.

The submission is recorded in ``<out>/cluster.json`` (cell -> task id and log, and the
options). A plain
grid command then collects: it reports every cell as done, queued or running, or failed, and
writes the tables of the done cells; ``--resubmit`` submits again the cells whose task ended
without finishing them.
"""
import json
import os
import shlex
import shutil
import signal
import socket

import submitit

from multiexit.errors import ConfigError

from .cells import ROOT, Stop, run_logged

RECORD = 'cluster.json'
CLUSTERS = ('slurm', 'local')
GRACE_S = 60  # for the training process to stop; submitit signals 90 s before the time limit
# sacct states of a task that may still run (UNKNOWN: just submitted, not yet known to sacct)
ACTIVE = {'PENDING', 'RUNNING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'CONFIGURING',
          'COMPLETING', 'RESIZING', 'SUSPENDED', 'SIGNALING', 'STAGE_OUT', 'UNKNOWN'}


class CellFailed(Exception):
    """A task ended without its cell done (submitit records it as the task's error)."""


def _ignore_preemption_signal():
    """In a task's training process: SLURM signals every process of the task, and this signal
    is for submitit; the training process gets SIGTERM from the task instead."""
    signal.signal(getattr(signal, f'SIG{submitit.JobEnvironment.USR_SIG}'), signal.SIG_IGN)


class CellTask(submitit.helpers.Checkpointable):
    """One unit (a cell, or a pack of cells) as a submitit task; what it holds is pickled into
    the job folder."""

    def __init__(self, unit, snapshots, log):
        self.unit, self.snapshots, self.log = unit, str(snapshots), str(log)

    def __call__(self):
        self._stop = Stop()
        outcomes = run_logged(self.unit, self.snapshots, self._stop, self.log,
                              f'task {submitit.JobEnvironment().job_id} on {socket.gethostname()}, '
                              f'pid {os.getpid()}, CUDA_VISIBLE_DEVICES='
                              f'{os.environ.get("CUDA_VISIBLE_DEVICES", "")}',
                              preexec=_ignore_preemption_signal)
        ended = [f'{cell.name}: {outcome.reason or "interrupted"}' for cell, outcome in outcomes
                 if outcome.status in ('failed', 'interrupted')]
        if ended:
            raise CellFailed(f'{"; ".join(ended)}; log {self.log}')
        return {cell.name: {'train_run': outcome.train['run'], 'test_run': outcome.test['run']}
                for cell, outcome in outcomes}

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption or time-out signal: stop training now, and requeue a task
        that looks at the snapshots folder afresh (and so resumes)."""
        self._stop.now(signal.SIGTERM, GRACE_S)
        return submitit.helpers.DelayedSubmission(CellTask(self.unit, self.snapshots, self.log))


def add_arguments(parser):
    group = parser.add_argument_group(
        'cluster', 'Submit every cell that is not done as one task of a job array (submitit); '
                   'the plain command collects later.')
    group.add_argument('--cluster', choices=CLUSTERS,
                       help='slurm: a SLURM job array; local: the same tasks as processes of '
                            'this machine, to test the cluster path')
    group.add_argument('--resubmit', action='store_true',
                       help='submit again the cells whose task ended without finishing them '
                            '(with the options of the last submission, unless --cluster)')
    group.add_argument('--partition', help='SLURM partition (default: the cluster\'s)')
    group.add_argument('--time', type=int, default=720, metavar='MINUTES',
                       help='time limit per task, in minutes (default 720); a task that reaches '
                            'it is requeued and resumes')
    group.add_argument('--gpus-per-task', type=int, default=1, help='(default 1)')
    group.add_argument('--cpus-per-task', type=int, help='(default: the cluster\'s)')
    group.add_argument('--mem-gb', type=float, help='memory per task (default: the cluster\'s)')
    group.add_argument('--array-parallelism', type=int, default=256,
                       help='tasks of the array running at the same time (default 256)')
    group.add_argument('--sbatch', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                       help='more sbatch options, e.g. account=myproject qos=normal')


def options(args):
    """The submission options of the command line, as recorded in cluster.json."""
    if args.cluster == 'slurm' and shutil.which('sbatch') is None:
        raise ConfigError('--cluster slurm: no sbatch command here; submit from a machine of the '
                          'SLURM cluster (its login node)')
    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ConfigError(f'--sbatch {item!r}: use KEY=VALUE, e.g. account=myproject')
        extra[key] = value
    for name in ('time', 'gpus_per_task', 'array_parallelism'):
        if getattr(args, name) < (0 if name == 'gpus_per_task' else 1):
            raise ConfigError(f'--{name.replace("_", "-")} must be '
                              f'{">= 0" if name == "gpus_per_task" else "> 0"}')
    return dict(cluster=args.cluster, partition=args.partition, time=args.time,
                gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                mem_gb=args.mem_gb, array_parallelism=args.array_parallelism, sbatch=extra,
                pack=args.pack)


def read_record(out):
    """The submissions recorded in ``out`` (None if there are none)."""
    path = out / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        valid = isinstance(record['tasks'], dict) and record['options']['cluster'] in CLUSTERS
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise ConfigError(f'{path} is not a record of this grid\'s submissions; remove it to '
                          f'start afresh')
    return record


def executor(opts, folder, name):
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=opts['cluster'])
    except RuntimeError as e:  # no srun: not on a SLURM cluster
        raise ConfigError(f'--cluster {opts["cluster"]}: {e}') from None
    # The tasks import this repository's experiments package, from wherever they start.
    setup = [f'export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}']
    ex.update_parameters(
        name=name, timeout_min=opts['time'], gpus_per_node=opts['gpus_per_task'],
        cpus_per_task=opts['cpus_per_task'], mem_gb=opts['mem_gb'],
        slurm_partition=opts['partition'], slurm_array_parallelism=opts['array_parallelism'],
        slurm_additional_parameters=opts['sbatch'] or None, slurm_setup=setup, local_setup=setup)
    return ex


def submit(units, opts, snapshots, logs, out, name, record):
    """Submits the units (cells, packs of cells) as one job array and records it in ``out``;
    returns the task ids. ``logs``: each unit's log file."""
    folder = (out / 'submitit').resolve()
    tasks = [CellTask(unit, snapshots.resolve(), log.resolve()) for unit, log in zip(units, logs)]
    jobs = executor(opts, folder, name).submit_array(tasks)
    record = record or {'tasks': {}}
    record.update(folder=str(folder), options=opts)
    for unit, job, log in zip(units, jobs, logs):
        record['tasks'].update({cell.name: job.job_id for cell in unit.cells})
        record.setdefault('logs', {}).update({cell.name: str(log) for cell in unit.cells})
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD).write_text(json.dumps(record, indent=1))
    return [job.job_id for job in jobs]


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def task_states(record, names):
    """{cell name: (task id, state)} of the cells that have a task: 'active' (queued or
    running), 'ended' (its result is written), or how it ended otherwise (SLURM's word for it;
    'lost' for a local task)."""
    cluster = record['options']['cluster']
    job_class = submitit.SlurmJob if cluster == 'slurm' else submitit.LocalJob
    # every job first: then one sacct call answers for all of them
    jobs = {name: job_class(record['folder'], record['tasks'][name])
            for name in names if name in record['tasks']}
    states = {}
    for name, job in jobs.items():
        if job.paths.result_pickle.is_file():
            state = 'ended'
        elif cluster == 'local':  # a local task's id is the process that controls it
            state = 'active' if _alive(job.job_id) else 'lost'
        else:
            state = job.state.split()[0]  # e.g. 'CANCELLED by 1000'
            state = 'active' if state in ACTIVE else state
        states[name] = (job.job_id, state)
    return states
