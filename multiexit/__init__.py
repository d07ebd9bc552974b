"""multiexit: distillation-based training for multi-exit architectures (Phuong & Lampert, 2019).

Modules: ``models`` (MsdNet, ResNet, WideResNet, ImageNetResNet, registry), ``losses`` (the
three training losses), ``metrics`` (per-exit accuracies), ``datasets`` (the data-set registry),
``data`` (subsets, epoch order, CIFAR on the device), ``image_folders``, ``image_loader`` and
``image_transforms`` (ImageNet and image folders), ``training`` (the loop and resume),
``evaluation``, ``budgeted`` and ``inference`` (early exit), ``flops`` (cost per exit),
``plots``, ``checkpoints``, ``runs`` (run inspection), ``reference_style`` (the original's
mechanics). No module imports sacred.
"""
__version__ = '0.1.0'
