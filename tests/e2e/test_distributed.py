"""train_cifar.py under torchrun on the CPU: 2 gloo processes, one sacred run; a killed rank
ends the job, which resumes exactly (DDP through torch.multiprocessing, in
tests/test_distributed.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import RISING_T, ROOT, assert_resumed_exactly, pythonpath, saved_epoch
from multiexit.data import cifar
from multiexit.evaluate.passes import evaluate, load_model

# ---- train_cifar.py under torchrun

SMOKE = ['smoke', 'seed=3', RISING_T]


def torchrun(args, cwd, snapshots, monitor_interval_s=0.1):
    """``monitor_interval_s``: how often torchrun looks for ended processes (0.1 s, its
    default); when it finds one, it stops the others with SIGTERM."""
    env = dict(os.environ, MULTIEXIT_SNAPSHOTS=str(snapshots), PYTHONPATH=pythonpath(),
               OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                             '--nproc_per_node=2', f'--monitor-interval={monitor_interval_s}',
                             str(ROOT / 'train_cifar.py'), 'with', *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def read(path):
    return json.loads(path.read_text())


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    work = tmp_path_factory.mktemp('torchrun')
    out, err = finished(torchrun(SMOKE + ['n_epochs=2'], work, work / 'snapshots'))
    return work, out, err


def test_torchrun_writes_one_sacred_run_from_rank_0(ddp_run):
    work, out, _ = ddp_run
    assert sorted(p.name for p in (work / 'snapshots').iterdir() if p.name != '_sources') == ['1']
    run = work / 'snapshots' / '1'
    assert read(run / 'run.json')['status'] == 'COMPLETED'
    assert read(run / 'metrics.json')['train.loss']['steps'] == [1, 2]
    assert (run / 'cout.txt').read_text().count('val top-1 of exit') == 1
    assert out.count('val top-1 of exit') == 1  # the other rank logs nothing
    assert not (work / 'snapshots' / 'unobserved').exists()


def test_checkpoint_loads_in_one_process_and_gives_the_logged_validation(ddp_run):
    work, _, _ = ddp_run
    run = work / 'snapshots' / '1'
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    assert not any(k.startswith('module.') for k in ckpt['model'])
    assert len(ckpt['rng_ranks']) == 2
    model, cf_net, _ = load_model(run / 'last.pt', 'cpu')  # strict
    config = read(run / 'config.json')
    loader, _ = cifar.build_split(config['cf_val'], 'val', work / 'data' / 'smoke', 250, 'cpu')
    [val] = evaluate(model, loader, cf_net['n_exits'])
    logged = read(run / 'metrics.json')
    for name in ('acc1_avg', 'acc5_clf0', 'acc1_ens2'):
        assert val[name] == logged[f'val.{name}']['values'][-1], name
    assert val['avg_maxprob'] == pytest.approx(logged['val.avg_maxprob']['values'][-1], rel=1e-6)


def rank_processes(proc):
    """{rank: pid} of the workers torchrun started."""
    def children(pid):
        kids = [int(c) for t in os.listdir(f'/proc/{pid}/task')
                for c in open(f'/proc/{pid}/task/{t}/children').read().split()]
        return kids + [g for k in kids for g in children(k)]
    ranks = {}
    for pid in children(proc.pid):
        env = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
        ranks.update({int(e[5:]): pid for e in env if e.startswith(b'RANK=')})
    return ranks



def test_a_killed_rank_ends_the_job_and_the_run_resumes_exactly(ddp_run):
    work, _, _ = ddp_run
    snaps = work / 'killed'
    # torchrun would stop rank 0 with SIGTERM (its usual message, tested elsewhere) if it saw
    # the killed rank before rank 0's next collective failed: give rank 0 time to see it first
    proc = torchrun(SMOKE + ['n_epochs=50'], work, snaps, monitor_interval_s=10)
    end = time.time() + 300
    while saved_epoch(snaps / '1') < 1 and time.time() < end and proc.poll() is None:
        time.sleep(0.05)
    os.kill(rank_processes(proc)[1], signal.SIGKILL)
    killed = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - killed < 60
    lines = [line for line in err.splitlines() if line.startswith('error: [rank 0] lost the')]
    assert len(lines) == 1, err[-3000:]
    assert err.count('Traceback') == 1 and 'ChildFailedError' in err  # torchrun's own, only
    run = snaps / '1'
    assert saved_epoch(run) == 1, 'killed too late: the comparison below needs epoch 1'
    assert torch.load(run / 'last.pt', weights_only=True)['loss']['temperature'] > 1  # it moved
    assert ('resume with: torchrun --nproc_per_node=2 train_cifar.py with '
            f'{run}/config.json parent_snapshot={run}') in lines[0]
    out, _ = finished(torchrun([f'{run}/config.json', f'parent_snapshot={run}', 'n_epochs=2'],
                               work, snaps))
    assert (f'resuming {run}/last.pt at epoch 1; these settings change from epoch 2 on: '
            'n_epochs 50 -> 2\n') in out
    assert_resumed_exactly(snaps / '2' / 'last.pt', work / 'snapshots' / '1' / 'last.pt', 2)



def test_a_regime_under_torchrun_reduces_what_each_phase_trains(tmp_path):
    """disjoint under DDP: phase 2 trains the early exits, which phase 1 froze. DDP, built for
    phase 1's parameters, is built again at the boundary, so every rank trains the same heads:
    rank 0's checkpoint gives, in one process, the validation that the ranks' shards logged."""
    regime = SMOKE + ['n_epochs=2', 'cf_regime.call=disjoint', 'cf_regime.backbone_epochs=1']
    finished(torchrun(regime, tmp_path, tmp_path / 'snapshots'))
    run = tmp_path / 'snapshots' / '1'
    model, cf_net, _ = load_model(run / 'last.pt', 'cpu')
    config = read(run / 'config.json')
    loader, _ = cifar.build_split(config['cf_val'], 'val', tmp_path / 'data' / 'smoke', 250,
                                  'cpu')
    [val] = evaluate(model, loader, cf_net['n_exits'])
    logged = read(run / 'metrics.json')
    for name in ('acc1_clf0', 'acc1_clf1', 'acc5_clf0'):
        assert val[name] == logged[f'val.{name}']['values'][-1], name
    assert val['avg_maxprob'] == pytest.approx(logged['val.avg_maxprob']['values'][-1], rel=1e-6)
