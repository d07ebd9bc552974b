"""Not a script: what train_cifar.py and train_imagenet.py share on sacred's side, which
multiexit (the library) never imports: the settings that every training script has, their
checks before a run starts, the run folders, logging under torchrun, the main function, and
training several runs of one of them as a pack (``run_pack``, for train_pack.py).

    ex = training_experiment.experiment('train_cifar')
    @ex.config
    def config(): ...  # the script's own settings
    ...
    if __name__ == '__main__':
        training_experiment.run_commandline(ex)
"""
import contextlib
import datetime
import logging
import os
import shlex
import sys
import threading
import traceback

from multiexit import checks
from multiexit.accel import distributed
from multiexit.config import TrainConfig, shared_defaults, shared_docs
from multiexit.errors import (EXIT_CODE, EXIT_CODE_INTERRUPTED, ConfigError, Resume,
                              TrainingInterrupted, UserError, reported_as_one_line, started_with)
from multiexit.progress import strip_progress
from multiexit.runs import find
from multiexit.train.api import build_run, train_alone, train_packs
from sacred_setup import (SNAPSHOT_DIR, Experiment, RunFolders, announce, explicit_keys,
                          records_now, refuse)
# after sacred_setup, which quiets the warning that importing sacred prints
from sacred.arg_parser import get_config_updates  # noqa: E402
from sacred.config.config_dict import ConfigDict  # noqa: E402
from sacred.metrics_logger import MetricsLogger, linearize_metrics  # noqa: E402

BEAT_S = 10  # between two writes of a pack member's run.json, cout.txt and metrics.json


class SharedSettings(ConfigDict):
    """The settings that every training script has (``multiexit.config.TrainConfig``): their
    defaults, with their comments for print_config."""

    def __init__(self):
        super().__init__(shared_defaults())

    def __call__(self, fixed=None, preset=None, fallback=None):
        summary = super().__call__(fixed, preset, fallback)
        summary.docs.update(shared_docs())
        return summary


def check_config(config, command_name, logger):
    """sacred config hook, before a run (and its folder) exists: a bad value is one error line;
    a resumed run keeps the seed of the run it continues (its data order and augmentation)
    unless the command line gives one."""
    with reported_as_one_line():
        TrainConfig.check(config)
        if config.get('parent_snapshot') and 'seed' not in config:
            seed = find.recorded_seed(config['parent_snapshot'], SNAPSHOT_DIR)
            if seed is not None:
                return {'seed': seed}
    return {}


def warn_ignored(config, explicit):
    """One line for each setting given on the command line that its ``call`` does not take."""
    for section in checks.SECTIONS:
        keys = {k.partition('.')[2] for k in explicit if k.startswith(f'{section}.')}
        for key in checks.ignored_keys(section, config[section], keys):
            print(f'warning: {section}.{key}={config[section][key]!r} is ignored: '
                  f'{config[section]["call"]} takes no {key}', file=sys.stderr, flush=True)


def experiment(name):
    """The sacred Experiment of the training script ``<name>.py``: its runs go to SNAPSHOT_DIR
    (written by rank 0 alone under torchrun, where the other ranks log only errors), it has the
    shared ``settings`` and their checks, and its main function trains with
    ``multiexit.train.api``."""
    main_rank = distributed.env_rank() == 0
    ex = Experiment(name, observed=main_rank,
                    log_level=logging.INFO if main_rank else logging.ERROR)
    ex.configurations.append(SharedSettings())
    ex.config_hook(check_config)

    @ex.main
    def main(_run, _config, cf_net, cf_loss, cf_trn, cf_val, cf_opt, cf_scheduler):
        # main reads _config; the dicts are parameters so that sacred accepts the keys that
        # named configs and `with cf_net.depth=...` add to them
        warn_ignored(_config, explicit_keys(_run))
        run_dir = _run.observers[0].dir if _run.observers else f'{SNAPSHOT_DIR}/unobserved'
        return train(_config, run_dir, _run, f'{ex.path}.py')
    return ex


def train(config, run_dir, sacred_run, script):
    """What a training script's main does with its sacred ``config``: under torchrun, join the
    process group; build the run (bad input: one line, and the run leaves nothing behind);
    train it; print a summary line; return the sacred result. ``run_dir``: the run folder of
    sacred's observer (rank 0's is used)."""
    gpu = config['gpu']
    with reported_as_one_line(), distributed.process_group(gpu, config['ddp_timeout_s']), \
            started_with(distributed.launch_command(script)):
        try:
            if isinstance(gpu, (list, tuple)):
                raise ConfigError(f'gpu={list(gpu)}: one process per GPU, under torchrun: '
                                  f'{distributed.torchrun_command(gpu, sys.argv)}')
            if distributed.env_rank() == 0:
                os.makedirs(run_dir, exist_ok=True)
            else:
                run_dir = None  # ranks other than 0 write nothing
            run = build_run(TrainConfig.of(config), run_dir, SNAPSHOT_DIR,
                            log_scalar=sacred_run.log_scalar, records=records_now(sacred_run))
        except UserError:
            refuse(sacred_run)
            raise
        announce(sacred_run)
        first = run.epoch + 1
        return summary(run, first, train_alone(run))


def summary(run, first, val):
    """The line that a run ends with (to its log) and its sacred result, once it trained from
    epoch ``first`` to the end, ``val`` its last validation metrics."""
    best_epoch, best_val = run.checkpointer.best_epoch, run.checkpointer.best_val
    at = f' at epoch {best_epoch}' if best_epoch is not None else ''
    run.log(f'{run.run_dir}: trained epochs {first} to {run.epoch}; best validation top-1 '
            f'(mean over exits) {100 * best_val:.2f} %{at}; evaluate it with: '
            f'python3 eval.py with snapshot_name={run.run_dir}')
    return {'epoch': run.epoch, 'best_epoch': best_epoch, 'best_val_acc1_avg': best_val,
            **{f'val.{k}': v for k, v in val.items()}}


def run_commandline(ex):
    try:
        ex.run_commandline()
    except KeyboardInterrupt:  # reported in main(); sacred marked the run INTERRUPTED
        raise SystemExit(EXIT_CODE_INTERRUPTED) from None


class PackMember:
    """One run of a pack, recorded as sacred records a run of ``ex``: its config is what
    ``python3 <script> with <updates>`` would resolve (named configs, config files, key=value,
    the config hooks), and a RunFolders observer of its own writes its folder (config.json,
    run.json, cout.txt with its own output, metrics.json) through the observer's events, as
    sacred's Run would. Its output goes to this terminal too, each line after ``prefix``."""

    def __init__(self, ex, updates, snapshot_dir):
        config_updates, named_configs = get_config_updates(updates)
        self.updates = updates
        self.run = ex._create_run(config_updates=config_updates, named_configs=named_configs)
        self.config = self.run.config
        warn_ignored(self.config, explicit_keys(self.run))
        self.observer = RunFolders(snapshot_dir)
        self.metrics, self.out, self.lock = MetricsLogger(), [], threading.Lock()
        self.writing = threading.Lock()  # one heartbeat at a time (each takes the new metrics)

    def start(self):
        self.start_time = datetime.datetime.utcnow()
        self.id = self.observer.started_event(
            ex_info=dict(self.run.experiment_info), command=self.run.meta_info['command'],
            host_info=self.run.host_info, start_time=self.start_time, config=self.config,
            meta_info=self.run.meta_info, _id=None)
        self.dir = self.observer.dir
        self.prefix = f'[run {self.id}: {self.config["snapshot_name"]}] '
        self.run.run_logger.info('Started run with ID "%s"', self.id)

    def log(self, *args, file=sys.stdout):
        text = ' '.join(map(str, args))
        with self.lock:
            self.out.append(text + '\n')
        print('\n'.join(self.prefix + line for line in text.splitlines()), file=file, flush=True)

    def log_scalar(self, name, value, step):
        self.metrics.log_scalar_metric(name, value, step)

    def heartbeat(self, result=None):
        with self.writing:
            with self.lock:
                out = strip_progress(''.join(self.out))
            self.observer.log_metrics(linearize_metrics(self.metrics.get_last_metrics()), {})
            self.observer.heartbeat_event({}, out, datetime.datetime.utcnow(), result)

    def beat(self):
        """``heartbeat`` every BEAT_S and at the end of every epoch (before its checkpoint); a
        full disk is left to the next one, the last one or the checkpoint to tell."""
        with contextlib.suppress(OSError):
            self.heartbeat()

    def finish(self, outcome):
        """Its last heartbeat and its end, ``outcome`` being its sacred result or the error that
        stopped it, said as a solo run would say it; returns its exit code."""
        if isinstance(outcome, BaseException):
            interrupted = isinstance(outcome, TrainingInterrupted)
            self.log(f'{"interrupted" if interrupted else "error"}: {outcome}', file=sys.stderr)
        self.heartbeat(None if isinstance(outcome, BaseException) else outcome)
        now = datetime.datetime.utcnow()
        seconds = datetime.timedelta(seconds=round((now - self.start_time).total_seconds()))
        if isinstance(outcome, TrainingInterrupted):
            self.observer.interrupted_event(now, 'INTERRUPTED')
            self.run.run_logger.warning('Run %s aborted after %s!', self.id, seconds)
            return EXIT_CODE_INTERRUPTED
        if isinstance(outcome, BaseException):
            self.observer.failed_event(now, traceback.format_exception(outcome))
            self.run.run_logger.error('Run %s failed after %s!', self.id, seconds)
            return EXIT_CODE if isinstance(outcome, UserError) else 1
        self.observer.completed_event(now, outcome)
        self.run.run_logger.info('Run %s completed after %s', self.id, seconds)
        return 0


def run_pack(ex, members, script):
    """``python3 train_pack.py``: train ``members`` (each the ``with`` arguments of one run of
    ``ex``, the experiment of ``script``) as packs (``multiexit.train.api.train_packs``), each a
    sacred run of its own in SNAPSHOT_DIR (``PackMember``). Returns the exit code: 0 when every
    run completed, 130 when a signal stopped them (with one more line: the command that resumes
    the pack), 2 when one failed with bad input or a loss that turned non-finite. Bad input
    before any training (a member's setting, data or parent snapshot) is one error line: the
    pack does not start and leaves no run folder."""
    with reported_as_one_line():
        if int(os.environ.get('WORLD_SIZE', 1)) > 1:
            raise ConfigError('a pack trains its runs in one process: not under torchrun')
    records = [PackMember(ex, updates, SNAPSHOT_DIR) for updates in members]  # bad input: exit 2
    for record in records:
        record.start()
    stop = threading.Event()
    beating = threading.Thread(target=_beat, args=(records, stop), daemon=True)
    beating.start()
    command = distributed.launch_command(script)
    try:
        with reported_as_one_line(), started_with(command):
            try:
                runs = [build_pack_member(record) for record in records]
                for record in records:
                    announce(record.run)
                vals = train_packs(runs)
            except UserError:
                stop.set()
                beating.join()
                for record in records:  # nothing trained: it leaves no folder
                    record.observer.refused = True
                    record.observer.failed_event(datetime.datetime.utcnow(), [])
                raise
    except KeyboardInterrupt:  # while the runs were built: nothing trained
        for record in records:
            record.finish(TrainingInterrupted('SIGINT before the pack started; nothing was '
                                              'trained: start it again'))
        raise
    except Exception as e:  # a crash: every run records it
        for record in records:
            record.finish(e)
        raise
    finally:
        stop.set()
        beating.join()
    for run in runs:
        if run.error is not None:
            run.error.command = command
    codes = [record.finish(run.error or summary(run, record.first_epoch, val))
             for record, run, val in zip(records, runs, vals)]
    if EXIT_CODE_INTERRUPTED in codes:
        stopped = [shlex.split(_continuation(run) or shlex.join(record.updates))
                   for record, run, code in zip(records, runs, codes)
                   if code == EXIT_CODE_INTERRUPTED]
        print(f'interrupted: to resume the pack: {pack_command(script, stopped)}',
              file=sys.stderr, flush=True)
        return EXIT_CODE_INTERRUPTED
    return max(codes)


def build_pack_member(record):
    """The Run of a pack member (a ``PackMember``), its output and metrics going to its record."""
    os.makedirs(record.dir, exist_ok=True)
    run = build_run(TrainConfig.of(record.config), record.dir, SNAPSHOT_DIR, log=record.log,
                    log_scalar=record.log_scalar, records=record.beat)
    record.first_epoch = run.epoch + 1
    return run


def _continuation(run):
    """What follows ``with`` in the command that continues ``run`` from its newest complete
    training state; None where no epoch finished."""
    last = run.checkpointer.last_good
    return Resume(last[0].parent).updates() if last else None


def pack_command(script, members):
    """The command line of train_pack.py that trains ``members`` (lists of with updates)."""
    words = ['python3', 'train_pack.py'] + ['--script', script] * (script != 'train_cifar.py')
    for updates in members:
        words += ['--member', *updates]
    return shlex.join(words)


def _beat(records, stop):
    while not stop.wait(BEAT_S):
        for record in records:
            record.beat()
