"""Train a multi-exit network on CIFAR-100 (Phuong & Lampert, ICCV 2019), as a sacred experiment.

    python3 train_cifar.py                        # the paper's configuration
    python3 train_cifar.py with smoke             # tiny offline run on generated data (CPU, <1 min)
    python3 train_cifar.py with n_epochs=10 cf_loss.C=0.3
    python3 train_cifar.py print_config           # every setting, with its comment
    python3 train_cifar.py with snapshots/3/config.json parent_snapshot=3   # resume run 3
    torchrun --nproc_per_node=4 train_cifar.py with ...   # 4 GPUs (DDP): README "Several GPUs"

Each run writes snapshots/<run id>/: config.json, run.json, cout.txt, metrics.json, and the
checkpoints (last.pt to resume, ep<N>.pt model snapshots).
"""
import training_experiment
from multiexit.config import PAPER_NET

ex = training_experiment.experiment('train_cifar')  # runs in snapshots/, the settings of every script


@ex.config
def config():
    # The device, CUDA switches, torchrun and snapshot settings (gpu, amp, parent_snapshot, ...)
    # are those of every training script: training_experiment.py.
    data_dir = 'data'  # holds cifar-100-python/ (downloaded there through torchvision if missing)

    cf_net = PAPER_NET  # the network: MsdNet as in the paper (5,067,588 parameters, 11 exits)
    cf_loss = dict(  # the training loss: distillation-based training with annealed temperature
        call='DistillationBasedLoss',  # or 'DistillationLossConstTemp' (+ T) or 'ClassificationOnlyLoss'
        n_exits=None,  # None: as many as cf_net has (11); a number must match cf_net's
        acc_tops=None,  # top-k accuracies reported (None: [1, 5], or [1] below 5 classes)
        C=0.5,  # weight of the distillation terms; 1 - C weighs the cross-entropies
        maxprob=0.5,  # T grows by Tmult after a batch while the teacher's mean max-prob exceeds this
        global_scale=2.0 * 5 / 11,  # overall loss scale
    )
    cf_trn = dict(  # training data
        call='Cifar100',  # or 'Cifar10' (cifar-10-batches-py)
        n_per_class=150,  # images drawn per class from the training file (None = all 500)
        nval_per_class=50,  # of which held out for validation
        augment=True,  # random flip and +-4 pixel shift
        seed=0,  # seed of the class permutation and of the subset draw
        n_unl_per_class=0,  # semi-supervised: images per class whose label is hidden (-100)
        lab_unl_ratio=[0, 0],  # semi-supervised: labelled/unlabelled examples interleaved per epoch
    )
    cf_val = dict(cf_trn, augment=False)  # validation data: the held-out part of the same draw
    cf_opt = dict(call='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)  # torch.optim
    batch_size = 64  # training batch; the last incomplete batch of an epoch is dropped
    val_batch_size = 250  # validation batch
    n_epochs = 300  # training epochs
    cf_scheduler = dict(call='MultiStepLR', milestones=[150, 225], gamma=0.1)  # stepped per epoch


@ex.named_config
def smoke():
    # A tiny MsdNet for 1 epoch on generated data in data/smoke: the whole pipeline, offline.
    data_dir = 'data/smoke'
    generate_fake_data = True
    snapshot_name = 'smoke'  # eval.py finds the newest such run by this name
    cf_net = dict(n_exits=3, nlayers_to_exit=2, nlayers_between_exits=1, nplanes_mulv=[2, 4, 8],
                  exit_width=16, btneck_widths=[2, 2, 2])
    cf_trn = dict(n_per_class=20, nval_per_class=5)
    n_epochs = 1
    val_batch_size = 250


@ex.named_config
def resnet56():
    # He et al.'s CIFAR ResNet-56 with 6 early exits (SDN placement) and its training schedule.
    cf_net = dict(call='ResNet', depth=56, out_dim=100, exit_after=None, head='pool',
                  head_width=128)
    cf_loss = dict(global_scale=2.0 * 5 / 7)  # the default's 2*5/n_exits, 7 exits
    cf_opt = dict(call='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False)
    batch_size = 128
    n_epochs = 164
    cf_scheduler = dict(call='MultiStepLR', milestones=[82, 123], gamma=0.1)


@ex.named_config
def resnet110():
    # As resnet56, with ResNet-110.
    cf_net = dict(call='ResNet', depth=110, out_dim=100, exit_after=None, head='pool',
                  head_width=128)
    cf_loss = dict(global_scale=2.0 * 5 / 7)
    cf_opt = dict(call='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False)
    batch_size = 128
    n_epochs = 164
    cf_scheduler = dict(call='MultiStepLR', milestones=[82, 123], gamma=0.1)


@ex.named_config
def wrn28_10():
    # Zagoruyko & Komodakis' WRN-28-10 with 6 early exits (SDN placement) and its schedule.
    cf_net = dict(call='WideResNet', depth=28, widen_factor=10, dropout=0.0, out_dim=100,
                  exit_after=None, head='pool', head_width=128)
    cf_loss = dict(global_scale=2.0 * 5 / 7)
    cf_opt = dict(call='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    batch_size = 128
    n_epochs = 200
    cf_scheduler = dict(call='MultiStepLR', milestones=[60, 120, 160], gamma=0.2)


@ex.named_config
def semisup():
    # The paper's semi-supervised extension (the numbers are this repository's choice): 100
    # labelled training and 50 validation images per class, and the other 350 of each class's 500
    # training images without their labels (-100: they add only distillation terms). An epoch
    # pairs every labelled image with an unlabelled one drawn afresh (ratio 1:1), so it is twice
    # as long as without them.
    cf_trn = dict(n_per_class=150, nval_per_class=50, n_unl_per_class=350, lab_unl_ratio=[1, 1])


if __name__ == '__main__':
    training_experiment.run_commandline(ex)
