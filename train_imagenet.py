"""Train a multi-exit network on ImageNet, or on any data set stored as image folders, as a
sacred experiment (docs/imagenet.md).

    python3 train_imagenet.py                        # MSDNet (step 4) with DBT, data/imagenet/
    python3 train_imagenet.py with smoke             # tiny offline run on generated JPEGs (CPU)
    python3 train_imagenet.py with msdnet_step7 data_dir=/datasets/imagenet
    python3 train_imagenet.py with resnet50          # torchvision's ResNet-50 with 3 early exits
    python3 train_imagenet.py with cf_trn.call=ImageNet cf_val.call=ImageNet   # original layout
    python3 train_imagenet.py print_config           # every setting, with its comment
    python3 train_imagenet.py with snapshots/3/config.json parent_snapshot=3   # resume run 3
    torchrun --nproc_per_node=8 train_imagenet.py with ...   # 8 GPUs (DDP): docs/multi-gpu.md

Each run writes snapshots/<run id>/ as train_cifar.py does; eval.py evaluates it.
"""
import training_experiment

ex = training_experiment.experiment('train_imagenet')  # runs in snapshots/, the settings of every script


@ex.config
def config():
    # The device, CUDA switches, torchrun and snapshot settings (gpu, amp, parent_snapshot, ...)
    # are those of every training script: training_experiment.py.
    data_dir = 'data/imagenet'  # holds train/<class>/ and val/<class>/ (docs/imagenet.md)

    cf_net = dict(  # the network: MSDNet's ImageNet model with step 4 (23,975,768 parameters)
        call='MsdNet',
        in_shape=224,  # input size: the ImageNet stem (7x7 conv, stride 2, and a max pool)
        out_dim=None,  # number of classes; None: as many as the data set has
        n_scales=4,  # feature scales: 56x56, 28x28, 14x14, 7x7
        n_exits=5,  # classifiers, one after each block
        nlayers_to_exit=4,  # layers in the first block (MSDNet's step; msdnet_step6, _step7)
        nlayers_between_exits=4,  # layers in every later block (the step)
        nplanes_mulv=[1, 2, 4, 4],  # channel multiplier per scale (MSDNet's grFactor)
        nplanes_addh=16,  # growth of the base width per layer (MSDNet's growthRate)
        nplanes_init=32,  # base width of the first layer (MSDNet's nChannels)
        prune='max',  # scale pruning: the coarser half of the layers drop the finest scales
        plane_reduction=0.5,  # width factor of the transition layers (MSDNet's reduction)
        exit_width=None,  # channels of the exit heads' convs; None: as wide as their input
        btneck_widths=[1, 2, 4, 4],  # bottleneck factor per scale (MSDNet's bnFactor)
    )
    cf_loss = dict(  # the training loss: distillation-based training with annealed temperature
        call='DistillationBasedLoss',  # or 'DistillationLossConstTemp' (+ T) or 'ClassificationOnlyLoss'
        n_exits=None,  # None: as many as cf_net has (5); a number must match cf_net's
        acc_tops=None,  # top-k accuracies reported (None: [1, 5], or [1] below 5 classes)
        C=0.5,  # weight of the distillation terms; 1 - C weighs the cross-entropies
        maxprob=0.5,  # T grows by Tmult after a batch while the teacher's mean max-prob exceeds this
        global_scale=2.0 * 5 / 5,  # overall loss scale: 2*5/n_exits, train_cifar.py's rule
    )
    cf_trn = dict(  # training data: image folders
        call='ImageFolder',  # or 'ImageNet': the original code's layout (trn_images/, classes.csv)
        n_per_class=None,  # images drawn per class from train/ (None = all)
        nval_per_class=50,  # of which held out for validation (ImageNet: 50,000 images, as MSDNet)
        augment=True,  # the original's: RandomResizedCrop, colour jitter, flip, lighting noise
        seed=0,  # seed of the class permutation and of the held-out draw
        image_size=224,  # side of the crops; the test split is resized to 256/224 of it first
        n_workers=None,  # loader processes per training process (None: 8, or fewer cores)
        n_unl_per_class=0,  # semi-supervised: images per class whose label is hidden (-100)
        lab_unl_ratio=[0, 0],  # semi-supervised: labelled/unlabelled examples interleaved per epoch
    )
    cf_val = dict(cf_trn, augment=False)  # validation data: the held-out part of train/
    # The paper's ImageNet schedule is not in the original code; this is MSDNet's (Huang et al.
    # 2018, and its PyTorch code): SGD, 90 epochs, batch 256, lr 0.1 divided by 10 at 30 and 60.
    cf_opt = dict(call='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False)  # momentum
    batch_size = 256  # training batch (all processes together); the incomplete last one is dropped
    val_batch_size = 256  # validation batch
    n_epochs = 90  # training epochs
    cf_scheduler = dict(call='MultiStepLR', milestones=[30, 60], gamma=0.1)  # stepped per epoch


@ex.named_config
def msdnet_step4():
    # MSDNet's ImageNet model with step 4 (the default): 5 blocks of 4 layers.
    cf_net = dict(call='MsdNet', nlayers_to_exit=4, nlayers_between_exits=4)


@ex.named_config
def msdnet_step6():
    # MSDNet's ImageNet model with step 6 (58,721,760 parameters); its 4th exit comes one layer
    # late, as in the original code (docs/imagenet.md).
    cf_net = dict(call='MsdNet', nlayers_to_exit=6, nlayers_between_exits=6)


@ex.named_config
def msdnet_step7():
    # MSDNet's ImageNet model with step 7 (62,344,376 parameters; MSDNet's 62.31 M without the
    # conv biases that the original keeps).
    cf_net = dict(call='MsdNet', nlayers_to_exit=7, nlayers_between_exits=7)


@ex.named_config
def resnet50():
    # torchvision's ResNet-50 with an early exit (pooling and a linear layer) after each of its
    # first three stages; 4 exits. The schedule above is also torchvision's for ResNet-50.
    cf_net = dict(call='ImageNetResNet', depth=50, out_dim=None, exit_after=[0, 1, 2],
                  head='pool', head_width=128)
    cf_loss = dict(global_scale=2.0 * 5 / 4)  # 2*5/n_exits, 4 exits


@ex.named_config
def smoke():
    # A tiny MsdNet of the same family for 1 epoch on generated JPEG files in
    # data/smoke-images (5 classes, 50 training and 20 test images, both layouts): the whole
    # pipeline, offline, on a CPU.
    data_dir = 'data/smoke-images'
    generate_fake_data = True
    snapshot_name = 'smoke-imagenet'  # eval.py finds the newest such run by this name
    cf_net = dict(n_exits=3, nlayers_to_exit=2, nlayers_between_exits=1, nplanes_init=4,
                  nplanes_addh=2, exit_width=8)
    cf_trn = dict(nval_per_class=2, n_workers=2)
    batch_size = 8
    val_batch_size = 16
    n_epochs = 1


if __name__ == '__main__':
    training_experiment.run_commandline(ex)
