"""Evaluate a trained multi-exit network on the test split, as a sacred experiment.

    python eval.py with snapshot_name=3               # run id (folder of snapshots/)
    python eval.py with snapshot_name=test:0          # the snapshot_name given at training
    python eval.py with snapshot_name=snapshots/3/ep120.pt
    python eval.py with snapshot_name=old_ep300 cf_net.n_exits=11   # a file of the original code

Prints top-1, top-5 and ensemble accuracy per exit; the sacred result (run.json) is the dict of
metrics; the evaluation itself is logged as a run in snapshots/.
"""
import json
import os
import warnings
from pathlib import Path

import torch

warnings.filterwarnings('ignore', message='pkg_resources is deprecated')  # raised by sacred 0.8.7
from sacred import SETTINGS, Experiment  # noqa: E402
from sacred.observers import FileStorageObserver  # noqa: E402

from multiexit import checkpoints, data  # noqa: E402
from multiexit.errors import ConfigError, reported_as_one_line  # noqa: E402
from multiexit.evaluation import evaluate, load_model, per_exit_table  # noqa: E402
from multiexit.progress import bar, strip_progress  # noqa: E402
from multiexit.training import plain, resolve_device  # noqa: E402

SETTINGS.CAPTURE_MODE = 'sys'
SETTINGS.HOST_INFO.INCLUDE_GPU_INFO = False
SNAPSHOT_DIR = os.environ.get('MULTIEXIT_SNAPSHOTS', 'snapshots')

ex = Experiment('eval', save_git_info=False)
ex.observers.append(FileStorageObserver(SNAPSHOT_DIR))
ex.captured_out_filter = strip_progress

PAPER_NET = dict(call='MsdNet', in_shape=32, out_dim=100, n_scales=3, n_exits=11,
                 nlayers_to_exit=4, nlayers_between_exits=2, nplanes_mulv=[6, 12, 24],
                 nplanes_addh=1, nplanes_init=1, prune='min', plane_reduction=0.5,
                 exit_width=128, btneck_widths=[4, 4, 4])


@ex.config
def config():
    gpu = 0 if torch.cuda.is_available() else -1  # CUDA device ordinal; -1 = CPU
    snapshot_name = 'test:0'  # a run id, a snapshot_name given at training, a run dir or a file
    checkpoint = 'best'  # in a run: 'best' (validation acc1_avg), 'last' or an epoch number
    cf_test = dict(  # test data (None: the training run's data set and subset seed)
        call=None,  # 'Cifar100' or 'Cifar10'
        seed=None,  # seed of the class permutation used at training (the label map)
    )
    cf_loss = dict(  # evaluation metric
        call='_MultiExitAccuracy',
        acc_tops=[1, 5],  # top-k accuracies reported
    )
    batch_size = 250  # evaluation batch
    data_dir = None  # None: the training run's data_dir (else 'data')
    cf_net = PAPER_NET  # architecture of a bare state dict from the original code only


def training_config(path):
    """config.json of the training run that holds ``path`` (a run dir or one of its files)."""
    run_dir = path if path.is_dir() else path.parent
    try:
        return json.loads((run_dir / 'config.json').read_text())
    except (OSError, ValueError):
        return {}


@ex.main
def main(snapshot_name, checkpoint, cf_test, cf_loss, batch_size, data_dir, gpu, cf_net):
    with reported_as_one_line():
        if cf_loss.get('call') != '_MultiExitAccuracy':
            raise ConfigError(f"cf_loss.call must be '_MultiExitAccuracy', got {cf_loss.get('call')!r}")
        device = resolve_device(gpu)
        path = checkpoints.pick_checkpoint(checkpoints.resolve(snapshot_name, SNAPSHOT_DIR),
                                           checkpoint)
        model, net, ckpt = load_model(path, device, plain(cf_net))
        n_exits = len(model.exits)
        if cf_loss.get('n_exits', n_exits) != n_exits:
            raise ConfigError(f"cf_loss n_exits={cf_loss['n_exits']} but {path} has {n_exits} exits")
        trained = training_config(path)
        cf_trn = trained.get('cf_trn', {})
        cf = dict(call=cf_test.get('call') or cf_trn.get('call', 'Cifar100'),
                  seed=cf_test['seed'] if cf_test.get('seed') is not None else cf_trn.get('seed', 0))
        data_dir = data_dir or trained.get('data_dir', 'data')
        loader, _ = data.build_split(cf, 'test', data_dir, batch_size, device)
        print(f'{path} (epoch {ckpt.get("epoch", "?")}) on {cf["call"]} test, '
              f'{len(loader.labels)} images from {data_dir}')
        acc_tops = tuple(cf_loss.get('acc_tops', (1, 5)))
        metrics = evaluate(model, loader, n_exits, acc_tops, progress=lambda it: bar(it, 'test'))
        print(per_exit_table(metrics, n_exits, acc_tops))
        return metrics


if __name__ == '__main__':
    ex.run_commandline()
