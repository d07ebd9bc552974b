"""The training loop, written once, over a job: a run alone (``train.solo.Solo``) or runs of one
network fused into one (``train.pack.PackedRuns``). A job has ``runs``, a ``train_loader``, a
``loss_fn`` and ``lr()``, and per epoch ``train_epoch``, ``next_epoch``, ``validate``, ``scatter``
and ``rng_states``, each giving one entry per run; every run keeps its own checkpoints and log."""
import contextlib
import signal
import threading
import time

from ..accel import distributed
from ..errors import PeerLostError, TrainingInterrupted
from ..progress import bar


def train_epoch(step, loader, progress=None):
    """One epoch of ``step`` (a ``train.step.TrainStep``) over ``loader``: (mean losses,
    metrics dicts, indices of the first step whose loss was not finite or None), one of each per
    member of the step. With a sharded ``loader`` (each rank its part of every batch, the step's
    model wrapped in DDP), those of the global batches, the same on every rank."""
    step.start_epoch()
    for x, y in (progress(loader) if progress else loader):
        step(x, y)
    return step.finish_epoch(loader.world_size)  # host sync, once per epoch


def set_loss_epoch(loss_fn, epoch, n_epochs):
    """Tell a loss whose terms follow the epoch (one with ``set_epoch``, e.g. SDN's weights)
    that the epoch ``epoch`` (0-based) of ``n_epochs`` trains next; before its first step, so
    that a resumed run sets what its epoch needs. Other losses have nothing to set."""
    set_epoch = getattr(loss_fn, 'set_epoch', None)
    if set_epoch is not None:
        set_epoch(epoch, n_epochs)


def fit(job):
    """Train every run of ``job`` up to its ``n_epochs``; returns (each run's last validation
    metrics, {} where it trained no epoch; the signal that stopped training, or None).

    A run whose loss turns non-finite, or whose checkpoint cannot be written, stops with that
    error in its ``error`` (nothing of that epoch saved), and the others go on. SIGINT and
    SIGTERM abandon the epoch in progress: every run still training gets a TrainingInterrupted
    that says how to resume it from its last finished epoch (saved atomically in last.pt).
    Under torchrun, a collective that fails because another process failed or stopped
    answering gives PeerLostError, with the same instructions."""
    runs, last_val, stopped_by = job.runs, [{} for _ in job.runs], None
    for run in runs:
        run.error = None
    lead = runs[0]
    progress = (lambda desc: lambda it: bar(it, desc)) if lead.is_main else (lambda desc: None)
    try:
        with stopping_on_signals():
            while active := [run for run in runs if run.training]:
                start, epoch = time.time(), active[0].epoch
                job.train_loader.set_epoch(epoch)
                set_loss_epoch(job.loss_fn, epoch, lead.n_epochs)
                lr = job.lr()
                losses, trn, bad = job.train_epoch(progress(f'epoch {epoch + 1}/{lead.n_epochs}'))
                for run, bad_step in zip(runs, bad):
                    if run in active and bad_step is not None:
                        run.error = run.non_finite(bad_step)
                if not (active := [run for run in active if run.error is None]):
                    break
                job.next_epoch(active)  # after the epoch: epochs 0..149 at the first lr (torch 0.4)
                for run in active:
                    run.epoch += 1
                val = job.validate(progress('validation'))
                job.scatter()
                with signals_deferred():  # every run's records and checkpoints of the epoch
                    for i, (run, rngs) in enumerate(zip(runs, job.rng_states())):
                        if run in active:
                            run.end_epoch(losses[i], trn[i], val[i], lr, time.time() - start,
                                          *rngs)
                            last_val[i] = val[i]
    except KeyboardInterrupt as e:
        stopped_by = str(e) or 'SIGINT'
        for run in runs:
            if run.training:
                run.error = TrainingInterrupted(f'{stopped_by} during epoch {run.epoch + 1}; ',
                                                *run.checkpointer.resume_parts())
    except RuntimeError as e:
        if not distributed.is_peer_failure(e):
            raise
        for run in runs:
            if run.training:
                when = f' during epoch {run.epoch + 1}'
                run.error = PeerLostError(f'{distributed.peer_failure(e, when)}; ',
                                          *run.checkpointer.resume_parts())
    return last_val, stopped_by


@contextlib.contextmanager
def stopping_on_signals():
    """SIGTERM stops the block as SIGINT does (a KeyboardInterrupt that names it), where the
    handler can be installed (the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM that come during the block are handled after it, as they would have
    been (where handlers can be installed: the main thread). The end of an epoch writes its
    records, whose row a user may see, then its checkpoints: a Ctrl-C then stops training after
    the checkpoint that holds that epoch, not between the two."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came, previous = [], {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):
            previous[signum] = signal.signal(signum, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if came:
        signal.raise_signal(came[0])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)
