"""multiexit: distillation-based training for multi-exit architectures (Phuong & Lampert, 2019).

Modules: ``models`` (MsdNet, registry), ``losses`` (the three training losses), ``metrics``
(per-exit accuracies), ``data`` (CIFAR on the device), ``training`` (the loop and resume),
``evaluation``, ``checkpoints``, ``flops`` (cost per exit). No module imports sacred.
"""
__version__ = '0.1.0'
