"""Not a script: what train_cifar.py and train_imagenet.py share on sacred's side, which
multiexit (the library) never imports: the settings that every training script has, their
checks before a run starts, the run folders, logging under torchrun, and the main function.

    ex = training_experiment.experiment('train_cifar')
    @ex.config
    def config(): ...  # the script's own settings
    ...
    if __name__ == '__main__':
        training_experiment.run_commandline(ex)
"""
import logging
import sys

import torch

from multiexit import checkpoints, distributed, settings as checks
from multiexit.errors import EXIT_CODE_INTERRUPTED, reported_as_one_line
from multiexit.training import train
from sacred_setup import SNAPSHOT_DIR, Experiment, explicit_keys, refuse


def settings():
    # A sacred config scope: each local variable is a setting, its comment is what print_config
    # shows.
    gpu = 0 if torch.cuda.is_available() else -1  # CUDA device ordinal; -1 = CPU (torchrun: 0 or -1)
    snapshot_name = 'test:0'  # a name for this run; eval.py finds its snapshots by it
    parent_snapshot = None  # resume from a run id, snapshot name or checkpoint path (None: fresh)
    generate_fake_data = False  # write a small generated data set of cf_trn's kind to data_dir if absent
    save_interval = 0  # 0: keep the snapshot with the best validation acc1_avg; N: every N epochs
    amp = True  # CUDA: bf16 autocast of forward and loss (weights stay fp32); ignored on CPU
    channels_last = True  # CUDA: NHWC memory format for model and batches; ignored on CPU
    compile = False  # CUDA: torch.compile mode ('default', 'max-autotune', 'reduce-overhead')
    cuda_graph = True  # CUDA: replay the whole training step as one captured CUDA graph
    cuda_streams = True  # CUDA, one process: MsdNet's scales and exit heads on parallel streams
    deterministic = False  # CUDA: deterministic algorithms, for bit-exact reruns (slower)
    cudnn_benchmark = False  # CUDA: time cuDNN's algorithms per conv shape (MsdNet has ~100 shapes)
    sync_bn = False  # torchrun: BatchNorm statistics of the global batch, not each process's part
    ddp_timeout_s = 600  # torchrun: a process waiting this long for the others fails the job


def check_config(config, command_name, logger):
    """sacred config hook, before a run (and its folder) exists: a bad value is one error line;
    a resumed run keeps the seed of the run it continues (its data order and augmentation)
    unless the command line gives one."""
    with reported_as_one_line():
        checks.check(config)
        if config.get('parent_snapshot') and 'seed' not in config:
            seed = checkpoints.recorded_seed(config['parent_snapshot'], SNAPSHOT_DIR)
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
    ``multiexit.training.train``."""
    main_rank = distributed.env_rank() == 0
    ex = Experiment(name, observed=main_rank,
                    log_level=logging.INFO if main_rank else logging.ERROR)
    ex.config(settings)
    ex.config_hook(check_config)

    @ex.main
    def main(_run, _config, cf_net, cf_loss, cf_trn, cf_val, cf_opt, cf_scheduler):
        # train() reads _config; the dicts are parameters so that sacred accepts the keys that
        # named configs and `with cf_net.depth=...` add to them
        warn_ignored(_config, explicit_keys(_run))
        run_dir = _run.observers[0].dir if _run.observers else f'{SNAPSHOT_DIR}/unobserved'
        return train(_config, run_dir, SNAPSHOT_DIR, _run.log_scalar, f'{ex.path}.py',
                     refused=lambda: refuse(_run))
    return ex


def run_commandline(ex):
    try:
        ex.run_commandline()
    except KeyboardInterrupt:  # reported in main(); sacred marked the run INTERRUPTED
        raise SystemExit(EXIT_CODE_INTERRUPTED) from None
