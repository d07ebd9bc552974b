"""What the training scripts call: build a run of a ``config.TrainConfig``, train it alone, or
train runs as packs. The scripts make the commands and messages (training_experiment.py)."""
from .. import data
from ..errors import TrainingInterrupted
from .loop import fit, stopping_on_signals
from .pack import PackedRuns
from .run import Run
from .solo import Solo


def build_run(cfg, run_dir, snapshot_dir='snapshots', log=print, log_scalar=None, records=None):
    """The Run of ``cfg`` (``train.run.Run``), after writing its generated data set where
    ``cfg.generate_fake_data`` asks for it."""
    if cfg.generate_fake_data:
        data.build(cfg.cf_trn).write_fake(cfg.data_dir)
    return Run(cfg, run_dir, snapshot_dir, log, log_scalar, records)


def train_alone(run):
    """Train ``run`` up to its ``n_epochs`` (``train.loop.fit``); returns its last validation
    metrics, or raises what stopped it: NonFiniteLossError, CheckpointWriteError,
    TrainingInterrupted (SIGINT, SIGTERM) or PeerLostError (torchrun), each saying how to resume
    from the last finished epoch."""
    (val,), _ = fit(Solo(run))
    if run.error is not None:
        raise run.error from None
    return val


def train_packs(runs):
    """Train ``runs`` (built, not yet trained) as packs: those at the same epoch as one
    ``PackedRuns`` (a run alone as itself), one pack after another, every pack checked before
    any trains. Returns each run's last validation metrics ({} where it trained no epoch); a
    run that stopped has its ``error``. SIGINT and SIGTERM stop every run, as they stop a solo
    run (TrainingInterrupted, with how to resume it); a run whose pack had not started is
    stopped before its next epoch."""
    groups = [[run for run in runs if run.epoch == epoch]
              for epoch in sorted({run.epoch for run in runs})]
    jobs = [PackedRuns(group) if len(group) > 1 else Solo(group[0]) for group in groups]
    val = {}
    with stopping_on_signals():
        try:
            for job in jobs:
                last, stopped_by = fit(job)
                val.update(zip(map(id, job.runs), last))
                if stopped_by:
                    raise KeyboardInterrupt(stopped_by)
        except KeyboardInterrupt as e:  # the runs that had not started yet
            for run in runs:
                if run.training:
                    run.error = TrainingInterrupted(f'{str(e) or "SIGINT"} before epoch '
                                                    f'{run.epoch + 1}; ',
                                                    *run.checkpointer.resume_parts())
    return [val.get(id(run), {}) for run in runs]
