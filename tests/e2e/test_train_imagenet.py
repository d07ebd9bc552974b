"""train_imagenet.py and eval.py as a user types them, on generated JPEG folders, on the CPU:
training, resuming, the original folder layout, evaluation, torchrun (bad input, in this
process: tests/test_train_imagenet.py)."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from helpers import ROOT, pythonpath, run_script
from multiexit.evaluate import flops
from multiexit.evaluate.passes import load_model
from multiexit.metrics import metric_names
from multiexit.runs.table import load_runs

SMOKE = ['smoke', 'seed=1']  # 5 classes of 10 training images (2 held out), 8 per batch
ORIGINAL_LAYOUT = ['cf_trn.call=ImageNet', 'cf_val.call=ImageNet']


def read(path):
    return json.loads(path.read_text())


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp('imagenet_work')


@pytest.fixture(scope='module')
def trained(workdir):
    """Runs 1: 2 epochs; 2: 1 epoch; 3: run 2 resumed to 2 epochs; 4: 1 epoch from the
    original layout; 5: eval of run 1."""
    snaps = workdir / 'snapshots'
    run = lambda script, *a: run_script(script, *a, cwd=workdir, snapshots=snaps)
    procs = {
        'full': run('train_imagenet.py', 'with', *SMOKE, 'n_epochs=2', 'snapshot_name=full'),
        'part': run('train_imagenet.py', 'with', *SMOKE),
        'resumed': run('train_imagenet.py', 'with', str(snaps / '2' / 'config.json'),
                       'n_epochs=2', 'parent_snapshot=2'),
        'original': run('train_imagenet.py', 'with', *SMOKE, *ORIGINAL_LAYOUT),
        'eval': run('eval.py', 'with', 'snapshot_name=full'),
    }
    return snaps, procs


def test_smoke_trains_one_epoch_on_generated_jpegs(trained, workdir):
    snaps, procs = trained
    assert read(snaps / '2' / 'run.json')['status'] == 'COMPLETED'
    config = read(snaps / '2' / 'config.json')
    assert config['cf_trn']['call'] == 'ImageFolder' and config['cf_trn']['n_workers'] == 2
    assert len(list((workdir / 'data' / 'smoke-images' / 'train').glob('*/*.JPEG'))) == 50
    ckpt = last(snaps / '2')
    assert ckpt['epoch'] == 1 and ckpt['cf_net']['out_dim'] == 5  # from the folder
    metrics = read(snaps / '2' / 'metrics.json')
    assert metrics['train.loss']['steps'] == [1]
    for name, proc in procs.items():
        assert 'WARNING' not in proc.stderr, (name, proc.stderr[-2000:])


def last(run):
    return torch.load(run / 'last.pt', weights_only=True)


def test_resume_continues_exactly(trained):
    """Run 2 resumed for its second epoch ends where run 1 did, bit for bit."""
    snaps, procs = trained
    full, resumed = last(snaps / '1'), last(snaps / '3')
    assert 'resuming' in procs['resumed'].stdout and full['epoch'] == resumed['epoch'] == 2
    state = lambda ckpt: [*ckpt['model'].values(), ckpt['loss']['temperature']]
    assert all(map(torch.equal, state(full), state(resumed)))
    losses = [read(snaps / run / 'metrics.json')['train.loss'] for run in ('1', '3')]
    assert losses[1]['steps'] == [2] and losses[1]['values'] == losses[0]['values'][1:]


def test_the_original_layout_trains_exactly_as_the_standard_one(trained):
    snaps, _ = trained
    standard, original = last(snaps / '2')['model'], last(snaps / '4')['model']
    assert standard.keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in standard.items())


def test_eval_reports_every_exit_with_macs_at_224_pixels(trained):
    snaps, procs = trained
    result = read(snaps / '5' / 'run.json')['result']
    per_exit = {f'{m}_clf{k}' for m in ('ece', 'ece_ts', 'temperature', 'macs', 'macs_all_heads',
                                         'params', 'ms_streaming', 'ms_latency') for k in range(3)}
    per_exit |= {f'acc1_poe{k}' for k in range(3)}
    assert set(result) == set(metric_names(3, (1, 5))) | per_exit
    model, _, _ = load_model(next((snaps / '1').glob('ep*.pt')), 'cpu')
    costs = flops.exit_costs(model, (3, 224, 224))
    assert [result[f'macs_clf{k}'] for k in range(3)] == [c['macs'] for c in costs]
    assert 'on ImageFolder test, 20 images' in procs['eval'].stdout
    anytime = pd.read_csv(snaps / '5' / 'anytime.csv')
    assert anytime['exit'].tolist() == [0, 1, 2]
    assert len(pd.read_csv(snaps / '5' / 'budgeted.csv')) > 0
    assert (snaps / '5' / 'budgeted.png').is_file()


def test_runs_lists_the_imagenet_runs(trained):
    snaps, _ = trained
    runs = load_runs(snaps).set_index('run')
    assert runs.loc['1', 'experiment'] == 'train_imagenet' and runs.loc['5', 'experiment'] == 'eval'
    assert runs.loc['1', 'cf_trn.call'] == 'ImageFolder' and runs.loc['1', 'final_epoch'] == 2


def test_torchrun_two_processes_train_as_one(workdir, tmp_path):
    """Each process reads its half of every batch with its own loader processes; with the
    statistics of the whole batch in BatchNorm, the two train as one process alone. (A small
    learning rate keeps rounding from growing over the steps: reading the wrong halves changes
    the loss by about 1 %.)"""
    snaps = tmp_path / 'snapshots'
    args = ['with', *SMOKE, 'gpu=-1', 'sync_bn=True', 'cf_opt.lr=0.001']
    run_script('train_imagenet.py', *args, cwd=workdir, snapshots=snaps)
    env = dict(os.environ, MULTIEXIT_SNAPSHOTS=str(snaps), PYTHONPATH=pythonpath(),
               OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         str(ROOT / 'train_imagenet.py'), *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in snaps.iterdir() if p.name.isdigit()) == ['1', '2']
    assert read(snaps / '2' / 'run.json')['status'] == 'COMPLETED'
    alone, two = (read(snaps / run / 'metrics.json') for run in ('1', '2'))
    assert two['train.loss']['values'] == pytest.approx(alone['train.loss']['values'], rel=1e-5)
    assert two['val.acc1_clf0']['values'] == alone['val.acc1_clf0']['values']
