"""multiexit: distillation-based training for multi-exit architectures (Phuong & Lampert, 2019).

The packages follow the data's path (docs/architecture.md): ``data`` (files to batches on the
device), ``models``, ``losses`` and ``metrics``, ``train`` (the step, the loop, runs, packs and
checkpoints), ``evaluate`` (metrics, reports, costs, figures), ``early_exit`` (the exit rule and
the ways of running it) and ``runs`` (run folders: finding them, the table). ``accel`` holds
the speed machinery (CUDA graphs, streams, distributed). No module imports sacred.
"""
__version__ = '0.1.0'
