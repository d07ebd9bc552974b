"""``--jobs N``: up to N units of the grid (cells, or packs of cells trained together) at the
same time on this machine, one training process per unit, then an evaluation per cell, each unit
with its own log file and GPU.

A thread per running unit starts and watches its processes (``cells.run_unit``); the main
thread only waits, updates the progress bar and reports: signal handlers run there, and the
tables are written there, one cell at a time.
"""
import os
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from tqdm import tqdm

from .cells import log_path, run_logged


def visible_gpus():
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    if visible is not None:
        return [g for g in visible.split(',') if g.strip() and g.strip() != '-1']
    import torch  # only here: the other modes need no torch in this process
    return [str(k) for k in range(torch.cuda.device_count())]


def cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


class Devices:
    """Hands each cell that starts the GPU with the fewest cells on it (the first of them on a
    tie), and the environment that gives its processes that GPU alone. Without GPUs, cells run
    on the CPU and share its cores (OMP_NUM_THREADS, where it is not set)."""

    def __init__(self, ids, jobs):
        self.running = {g: 0 for g in ids}
        self.threads = str(max(1, cpu_count() // jobs))
        self.lock = threading.Lock()

    def take(self):
        with self.lock:
            if not self.running:
                return None
            gpu = min(self.running, key=self.running.get)
            self.running[gpu] += 1
            return gpu

    def give(self, gpu):
        if gpu is not None:
            with self.lock:
                self.running[gpu] -= 1

    def env(self, gpu):
        env = dict(os.environ)
        if gpu is not None:
            env['CUDA_VISIBLE_DEVICES'] = gpu
        else:
            env['CUDA_VISIBLE_DEVICES'] = ''  # CPU cells, also where GPUs are
            env.setdefault('OMP_NUM_THREADS', self.threads)
        return env


def run_parallel(schedule, snapshots, out, jobs, devices, stop):
    """Runs the units of ``schedule``, up to ``jobs`` at once; yields (cell, Outcome) of each of
    their cells as they finish, and (None, None) for each unit that was not started: ``stop``
    was requested, or the schedule stopped at an error every cell repeats."""
    def work():
        unit = schedule.take() if stop.signum is None else None
        if unit is None:
            return None, [(None, None)]
        gpu = devices.take()
        try:
            outcomes = run_logged(unit, snapshots, stop, log_path(out, unit),
                                  f'{unit.name}, ' + (f'GPU {gpu}' if gpu is not None else 'CPU'),
                                  env=devices.env(gpu))
        finally:
            devices.give(gpu)
        for cell, outcome in outcomes:  # before this thread takes its next unit
            schedule.ended(cell, outcome)
        return unit, outcomes

    units = len(schedule.units)
    bar = tqdm(total=sum(len(u.cells) for u in schedule.units), desc='cells', unit='cell',
               disable=None, dynamic_ncols=True)
    failed = 0
    with bar, ThreadPoolExecutor(jobs, thread_name_prefix='cell') as pool:
        pending = {pool.submit(work) for _ in range(units)}
        while pending:
            finished, _ = wait(pending, timeout=1, return_when=FIRST_COMPLETED)
            for future in finished:
                pending.discard(future)
                unit, outcomes = future.result()
                for cell, outcome in outcomes:
                    if outcome is not None and outcome.status != 'interrupted':
                        failed += outcome.status == 'failed'
                        bar.update()
                        bar.write(report(cell, outcome, log_path(out, unit)))
                    yield cell, outcome
            bar.set_postfix_str(f'running {sum(f.running() for f in pending)}, failed {failed}')


def report(cell, outcome, log):
    if outcome.status == 'failed':
        return f'failed {cell.name}: {outcome.reason}; log {log}'
    return (f'done {cell.name} (training run {outcome.train["run"]}, test run '
            f'{outcome.test["run"]}); log {log}')
