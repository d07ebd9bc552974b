"""Not a script: what train_cifar.py and train_imagenet.py share on sacred's side, which
multiexit (the library) never imports: the settings that every training script has, the run
folders, logging under torchrun, and the main function.

    ex = Experiment('train_cifar', save_git_info=False)
    training_experiment.set_up(ex)
    @ex.config
    def config(): ...  # the script's own settings
    ...
    if __name__ == '__main__':
        training_experiment.run_commandline(ex)
"""
import logging
import os

import torch
from sacred import SETTINGS
from sacred.observers import FileStorageObserver
from sacred.utils import create_basic_stream_logger

from multiexit import distributed
from multiexit.errors import EXIT_CODE_INTERRUPTED
from multiexit.progress import strip_progress
from multiexit.training import train

SETTINGS.CAPTURE_MODE = 'sys'
SETTINGS.HOST_INFO.INCLUDE_GPU_INFO = False
SNAPSHOT_DIR = os.environ.get('MULTIEXIT_SNAPSHOTS', 'snapshots')


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


def set_up(ex):
    """Make the sacred Experiment ``ex`` of the script ``<ex.path>.py`` a training experiment:
    its runs go to SNAPSHOT_DIR (written by rank 0 alone under torchrun, where the other ranks
    log only errors), it has the shared ``settings``, and its main function trains with
    ``multiexit.training.train``."""
    if distributed.env_rank() == 0:
        ex.observers.append(FileStorageObserver(SNAPSHOT_DIR))
    else:
        ex.logger = create_basic_stream_logger()
        ex.logger.setLevel(logging.ERROR)
    ex.captured_out_filter = strip_progress
    ex.config(settings)

    @ex.main
    def main(_run, _config, _seed, cf_net, cf_loss, cf_trn, cf_val, cf_opt, cf_scheduler):
        # train() reads _config; the dicts are parameters so that sacred accepts the keys that
        # named configs and `with cf_net.depth=...` add to them
        run_dir = _run.observers[0].dir if _run.observers else f'{SNAPSHOT_DIR}/unobserved'
        return train(_config, _seed, run_dir, SNAPSHOT_DIR, _run.log_scalar, f'{ex.path}.py')


def run_commandline(ex):
    try:
        ex.run_commandline()
    except KeyboardInterrupt:  # reported in main(); sacred marked the run INTERRUPTED
        raise SystemExit(EXIT_CODE_INTERRUPTED) from None
