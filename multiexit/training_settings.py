"""The settings that every training script shares (device, CUDA switches, torchrun, snapshots)
as a sacred config scope: each local variable of ``training_settings`` is a setting, and its
comment documents it in ``print_config``. A script adds them with
``ex.config(training_settings)``; sacred reads the function's source, this module does not
import sacred."""
import torch


def training_settings():
    gpu = 0 if torch.cuda.is_available() else -1  # CUDA device ordinal; -1 = CPU (torchrun: 0 or -1)
    snapshot_name = 'test:0'  # a name for this run; eval.py finds its snapshots by it
    parent_snapshot = None  # resume from a run id, snapshot name or checkpoint path (None: fresh)
    generate_fake_data = False  # write a small generated data set of cf_trn's kind to data_dir if absent
    save_interval = 0  # 0: keep the snapshot with the best validation acc1_avg; N: every N epochs
    amp = True  # CUDA: bf16 autocast of forward and loss (weights stay fp32); ignored on CPU
    channels_last = True  # CUDA: NHWC memory format for model and batches; ignored on CPU
    compile = False  # CUDA: torch.compile mode for model and loss ('default', 'reduce-overhead')
    cuda_graph = True  # CUDA: replay the whole training step as one captured CUDA graph
    deterministic = False  # CUDA: deterministic algorithms, for bit-exact reruns (slower)
    cudnn_benchmark = False  # CUDA: time cuDNN's algorithms per conv shape (MsdNet has ~100 shapes)
    sync_bn = False  # torchrun: BatchNorm statistics of the global batch, not each process's part
    ddp_timeout_s = 600  # torchrun: a process waiting this long for the others fails the job
