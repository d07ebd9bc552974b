"""The CUDA path: loaders, numerics against the CPU, the default fast step (bf16, channels_last,
fused SGD, CUDA graph), the scripts, resume, evaluation, early exit (its graphed streaming and
latency modes) and torchrun. Skipped without a GPU; `benchmarks/gpu_check.py` runs them on one."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from recorded_graphs import SyncsInForward

from helpers import ROOT, TINY, pythonpath, run_script
from multiexit.config import PAPER_NET
from multiexit import data, losses, models
from multiexit.accel import streams
from multiexit.data.cifar import DATASETS, DeviceLoader
from multiexit.data.folders import write_fake_image_folders
from multiexit.early_exit.latency import LatencyExit
from multiexit.early_exit.rule import confidences, exit_indices
from multiexit.early_exit.shrinking import early_exit_predict
from multiexit.early_exit.streaming import StreamingExit
from multiexit.early_exit.thresholds import fit_thresholds, geometric_fractions
from multiexit.evaluate.passes import GraphedForward, evaluate, logits_of
from multiexit.train.step import GraphedTrainStep, build_step
from multiexit.config import TrainConfig, shared_defaults
from multiexit.train.api import train_alone
from multiexit.train.loop import fit
from multiexit.train.pack import PackedRuns
from multiexit.train.run import Run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

CUDA = torch.device('cuda')
SPEC = DATASETS['Cifar100']
PAPER_LOSS = dict(call='DistillationBasedLoss', n_exits=11, acc_tops=[1, 5], C=0.5, maxprob=0.5,
                  global_scale=2.0 * 5 / 11)
OPT = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
RUN_DEFAULTS = shared_defaults()
# generated data: 30 training images per class, of which 10 for validation (2,000 + 1,000)
SCRIPT_DATA = ['generate_fake_data=True', 'cf_trn.n_per_class=30', 'cf_trn.nval_per_class=10']


@pytest.fixture(autouse=True)
def fp32_means_fp32():
    """TF32 convolutions (cuDNN's default) would make 'fp32 on CUDA' a 1e-3 approximation."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.randint(0, 100, (n,), generator=g))


def test_device_loader_keeps_uint8_on_the_gpu_and_the_cpu_order():
    x, _ = images(200)
    ids = torch.arange(200)  # labels that name the examples, to read the order back
    kw = dict(augment=True, shuffle=True, drop_last=True, seed=3)
    gpu = DeviceLoader(x, ids, 64, SPEC.mean, SPEC.std, CUDA, channels_last=True, **kw)
    cpu = DeviceLoader(x, ids, 64, SPEC.mean, SPEC.std, 'cpu', **kw)
    assert gpu.images.is_cuda and gpu.images.dtype == torch.uint8
    for epoch in (0, 5):
        gpu.set_epoch(epoch)
        cpu.set_epoch(epoch)
        got = list(gpu)
        assert len(got) == 3
        for xb, yb in got:
            assert xb.is_cuda and xb.dtype == torch.float32 and xb.shape == (64, 3, 32, 32)
            assert xb.is_contiguous(memory_format=torch.channels_last)
        order = torch.cat([yb.cpu() for _, yb in got])
        assert torch.equal(order, torch.cat([yb for _, yb in cpu]))
    assert not torch.equal(order, ids[:192])  # shuffled


def paper_step(device, fused=False, amp=False, channels_last=False, cuda_graph=False,
               loss=PAPER_LOSS, cuda_streams=False, net=PAPER_NET, compile=None):
    torch.manual_seed(0)
    model = models.build(net).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = losses.build(loss).to(device)
    opt = torch.optim.SGD(model.parameters(), **OPT, **(dict(fused=True) if fused else {}))
    step = build_step(model, loss_fn, opt, loss_fn.n_exits, (1, 5), device, amp=amp,
                            T=getattr(loss_fn, 'temperature', None), cuda_graph=cuda_graph,
                            cuda_streams=cuda_streams, compile=compile)
    return model, loss_fn, step


def fixed_batch(device, n=64, seed=1, channels_last=False):
    x, y = images(n, seed)
    loader = DeviceLoader(x, y, n, SPEC.mean, SPEC.std, device, channels_last=channels_last)
    return next(iter(loader))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_one_fp32_step_on_cuda_equals_the_cpu_step():
    out = {}
    for device in ('cpu', CUDA):
        model, loss_fn, step = paper_step(device)
        before = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
        step.start_epoch()
        step(*fixed_batch(device))
        [loss], _, [bad] = step.finish_epoch()
        after = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
        out[str(device)] = loss, after, after - before
        assert bad is None
    (loss_cpu, w_cpu, d_cpu), (loss_gpu, w_gpu, d_gpu) = out['cpu'], out['cuda']
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-3)
    assert rel(w_gpu, w_cpu) < 1e-3
    assert rel(d_gpu, d_cpu) < 1e-2  # the update itself, not only the (much larger) weights
    assert d_cpu.abs().max() > 0


def trajectory(step, loss_fn, batch, n):
    """Loss and T after each of ``n`` steps on the same batch (one host sync per step: a test)."""
    losses_, temps = [], []
    for _ in range(n):
        step.start_epoch()
        step(*batch)
        [loss], _, [bad] = step.finish_epoch()
        assert bad is None
        losses_.append(loss)
        temps.append(loss_fn.T)
    return np.array(losses_), np.array(temps)


# A maxprob below a fresh network's confidence (about 0.02 here), so that T moves at once.
MOVING_T = dict(PAPER_LOSS, maxprob=0.015)


def test_default_cuda_path_trains_like_fp32_eager():
    """Paper loss (maxprob 0.5) on one batch, 30 steps: in fp32 on the CPU the loss falls from
    44 to 15 by step 23, where the teacher's confidence passes 0.5 and T starts to rise. Stated
    tolerance: the mean loss within 5 % of fp32 eager, T within two multiplications by 1.05."""
    d = RUN_DEFAULTS
    assert d['amp'] and d['channels_last'] and d['cuda_graph']
    model, loss_fn, step = paper_step(CUDA, fused=True, amp=True, channels_last=True,
                                      cuda_graph=True, cuda_streams=d['cuda_streams'])
    fast, T_fast = trajectory(step, loss_fn, fixed_batch(CUDA, channels_last=True), 30)
    assert step.captures == 1 and not step.eager_only  # the graph was replayed
    _, ref_loss_fn, ref_step = paper_step(CUDA)
    slow, T_slow = trajectory(ref_step, ref_loss_fn, fixed_batch(CUDA), 30)
    assert np.isfinite(fast).all()
    assert fast.min() < 0.6 * fast[0]  # it learns the batch
    ratios = T_fast[1:] / T_fast[:-1]
    assert np.all(np.isclose(ratios, 1.0) | np.isclose(ratios, 1.05))  # DBT's only moves
    assert T_fast[-1] > 1.05 ** 3
    assert abs(np.log(T_fast[-1] / T_slow[-1])) <= 2 * np.log(1.05) + 1e-9
    assert abs(fast.mean() / slow.mean() - 1) < 0.05


@pytest.fixture
def deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def test_graph_replay_equals_the_eager_step(deterministic_cudnn):
    """fp32, no autocast, 3 eager warm-up steps, the capture and 2 replays: the captured step
    computes what the eager one does. Stated tolerance: as close as two eager runs are to each
    other (rounding that differs between runs, if any, grows over steps), and at most 1e-6."""
    batch = fixed_batch(CUDA)
    weights, temps, loss_values = [], [], []
    for graphed in (False, False, True):
        model, loss_fn, step = paper_step(CUDA, fused=True, cuda_graph=graphed, loss=MOVING_T)
        values, T = trajectory(step, loss_fn, batch, 6)
        if graphed:
            assert step.captures == 1
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        temps.append(T)
        loss_values.append(values)
    noise = rel(weights[1], weights[0])
    assert rel(weights[2], weights[0]) <= max(1e-6, 10 * noise), noise
    assert temps[2][-1] > 1.05  # T moved
    np.testing.assert_array_equal(temps[2], temps[0])
    np.testing.assert_allclose(loss_values[2], loss_values[0], rtol=max(1e-6, 10 * noise))


# issue 34's methods on the paper's MsdNet: (network, loss)
METHODS = {
    'imta': (dict(PAPER_NET, gradient_equilibrium=True),
             dict(call='IMTADistillation', n_exits=11, gamma=0.5, T=2.0)),
    'boosted': (dict(PAPER_NET, gradient_equilibrium=True, boost_reweight=0.5),
                dict(call='ClassificationOnlyLoss', n_exits=11)),
    'sdn': (PAPER_NET, dict(call='SdnWeightedLoss', n_exits=11)),
    'distill_later': (PAPER_NET, dict(call='DistillationFromLaterExits', n_exits=11)),
}


@pytest.mark.parametrize('method', sorted(METHODS))
def test_each_method_s_graph_replay_equals_its_eager_step(deterministic_cudnn, method):
    """As the graph test above, for the field's methods: Gradient Equilibrium's autograd
    function, the boosted ensemble and the other losses captured and replayed."""
    net, loss = METHODS[method]
    batch = fixed_batch(CUDA)
    weights, loss_values = [], []
    for graphed in (False, False, True):
        model, loss_fn, step = paper_step(CUDA, fused=True, cuda_graph=graphed, loss=loss,
                                          net=net)
        values = []
        for _ in range(6):
            step.start_epoch()
            step(*batch)
            [value], _, [bad] = step.finish_epoch()
            assert bad is None
            values.append(value)
        if graphed:
            assert step.captures == 1
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        loss_values.append(values)
    noise = rel(weights[1], weights[0])
    assert rel(weights[2], weights[0]) <= max(1e-6, 10 * noise), noise
    np.testing.assert_allclose(loss_values[2], loss_values[0], rtol=max(1e-6, 10 * noise))


def test_a_regime_on_the_default_cuda_path_freezes_what_its_phase_does_not_train(tmp_path):
    """disjoint with the CUDA defaults (the step a graph): phase 2's new graph trains the
    early exits and leaves the backbone, its BatchNorm statistics included, as phase 1 left
    it."""
    run_script('train_cifar.py', 'with', 'data_dir=data/gen', *SCRIPT_DATA, 'gpu=0',
               'n_epochs=2', 'save_interval=1', 'cf_regime.call=disjoint',
               'cf_regime.backbone_epochs=1', cwd=tmp_path, snapshots=tmp_path / 'snapshots')
    one, two = (torch.load(tmp_path / 'snapshots' / '1' / f'ep{epoch}.pt',
                           weights_only=True)['model'] for epoch in (1, 2))
    n_exits = PAPER_NET['n_exits']
    heads = [k for k in one if k.startswith('exits.') and
             not k.startswith(f'exits.{n_exits - 1}.')]
    assert heads and all(torch.equal(one[k], two[k]) for k in one if k not in heads)
    assert not all(torch.equal(one[k], two[k]) for k in heads)


def test_multi_stream_graph_step_equals_the_single_stream_eager_step(deterministic_cudnn):
    """fp32, deterministic cuDNN, 6 steps of the paper's MsdNet + DBT (T moving): the captured
    step whose branches run on parallel streams (forward and backward) computes what the eager
    step on one stream does, within 1e-5."""
    batch = fixed_batch(CUDA)
    out = {}
    for on in (False, True):
        model, loss_fn, step = paper_step(CUDA, fused=True, cuda_graph=on, cuda_streams=on,
                                          loss=MOVING_T)
        values, T = trajectory(step, loss_fn, batch, 6)
        out[on] = values, T, torch.cat([p.detach().flatten() for p in model.parameters()])
        if on:
            assert step.captures == 1 and not step.eager_only
            side = streams._per_device[torch.cuda.current_device()]._side
            assert ('branch', 3) in side and 'exits' in side  # it did fork
    (loss_1, T_1, w_1), (loss_n, T_n, w_n) = out[False], out[True]
    assert T_n[-1] > 1.05
    np.testing.assert_array_equal(T_n, T_1)
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
    assert rel(w_n, w_1) < 1e-5


def test_compile_inside_the_whole_step_graph_trains_like_eager():
    """compile='default' within our graph, on a tiny MsdNet (a compilation in seconds): the
    warm-up compiles forward and backward, the capture then holds compiled code, and 6 steps
    follow the eager, uncompiled ones (stated tolerance 1e-3, as fp32 CUDA against the CPU:
    inductor fuses and reorders the sums). maxprob below 1/100: T rises at every step."""
    net, loss = TINY['MsdNet'], dict(PAPER_LOSS, n_exits=3, maxprob=0.005)
    batch = fixed_batch(CUDA, n=16)
    runs = []
    for compile in (None, 'default'):
        _, loss_fn, step = paper_step(CUDA, fused=True, cuda_graph=compile is not None,
                                      net=dict(net, out_dim=100), loss=loss, compile=compile)
        runs.append(trajectory(step, loss_fn, batch, 6))
        if compile:
            assert step.captures == 1 and not step.eager_only
    (eager, T_eager), (compiled, T_compiled) = runs
    assert T_eager[-1] > 1.05  # T moved
    np.testing.assert_array_equal(T_compiled, T_eager)
    np.testing.assert_allclose(compiled, eager, rtol=1e-3)


def test_a_new_learning_rate_is_captured_afresh():
    model, loss_fn, step = paper_step(CUDA, fused=True, cuda_graph=True)
    batch = fixed_batch(CUDA)
    trajectory(step, loss_fn, batch, 5)
    assert step.captures == 1
    for g in step.optimizer.param_groups:
        g['lr'] = 0.0  # nothing may move now, if the new lr is used
    before = [p.detach().clone() for p in model.parameters()]
    trajectory(step, loss_fn, batch, 1)
    assert step.captures == 2
    # with lr = 0 neither the gradient, the weight decay nor the momentum moves a weight
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_failed_capture_warns_once_and_trains_eagerly(capfd):
    model, loss_fn, step = paper_step(CUDA, fused=True, cuda_graph=True)
    step.model = SyncsInForward(model)
    losses_, _ = trajectory(step, loss_fn, fixed_batch(CUDA), 6)
    assert step.eager_only and step.captures == 0
    assert np.isfinite(losses_).all() and losses_[-1] < losses_[0]
    err = capfd.readouterr().err
    assert err.count('warning: CUDA graph capture') == 1


def test_the_graphed_evaluation_forward_equals_the_eager_one(deterministic_cudnn, capfd):
    """fp32, deterministic cuDNN: the replayed forward gives the eager logits bit for bit (the
    same kernels on the same shapes), a last smaller batch runs eagerly, and the metrics of an
    evaluation are the eager one's. On the default path (bf16, channels_last, parallel
    streams) the capture succeeds too and the logits stay close to fp32's."""
    torch.manual_seed(0)
    model = models.build(PAPER_NET).to(CUDA).eval()
    batches = [fixed_batch(CUDA, n=n, seed=s) for s, n in ((1, 64), (2, 64), (3, 64), (4, 16))]
    forward = GraphedForward(model)
    with torch.inference_mode():
        for x, _ in batches:
            assert all(torch.equal(a, b) for a, b in zip(forward(x), logits_of(model, x)))
    assert forward.captures == 1 and not forward.eager_only
    loader = type('Loader', (), dict(device=CUDA, world_size=1,
                                     __iter__=lambda self: iter(batches)))()
    assert evaluate(model, loader, 11, forward=forward) == evaluate(model, loader, 11)
    fast_model = model.to(memory_format=torch.channels_last)
    fast = GraphedForward(fast_model, amp=True, cuda_streams=True)
    with torch.inference_mode():
        for x, _ in batches[:3]:  # warm-up, capture, replay
            x = x.contiguous(memory_format=torch.channels_last)
            assert rel(fast(x)[-1].float(), logits_of(model, x)[-1]) < 0.1  # bf16
    assert fast.captures == 1 and not fast.eager_only
    assert 'warning: CUDA graph capture' not in capfd.readouterr().err


@pytest.fixture(scope='module')
def script_runs(tmp_path_factory):
    """1: the defaults, 2 epochs; 2: deterministic, 2 epochs; 3: deterministic, 1 epoch;
    4: run 3 resumed to 2 epochs; 5: eval.py of run 1."""
    work = tmp_path_factory.mktemp('cuda_work')
    snaps = work / 'snapshots'
    data = ['data_dir=data/gen', *SCRIPT_DATA]
    det = ['deterministic=True', f'cf_loss.maxprob={MOVING_T["maxprob"]}', 'seed=2']
    run = lambda script, *a: run_script(script, *a, cwd=work, snapshots=snaps)
    procs = {
        'default': run('train_cifar.py', 'with', *data, 'n_epochs=2', 'gpu=0', 'snapshot_name=d'),
        'full': run('train_cifar.py', 'with', *data, *det, 'n_epochs=2'),
        'part': run('train_cifar.py', 'with', *data, *det, 'n_epochs=1'),
        'resumed': run('train_cifar.py', 'with', str(snaps / '3' / 'config.json'),
                       'n_epochs=2', 'parent_snapshot=3'),
        'eval': run('eval.py', 'with', 'snapshot_name=d'),
    }
    return work, snaps, procs


def read(path):
    return json.loads(path.read_text())


def test_train_cifar_on_cuda_completes_with_the_fast_path(script_runs):
    _, snaps, procs = script_runs
    assert read(snaps / '1' / 'run.json')['status'] == 'COMPLETED'
    config = read(snaps / '1' / 'config.json')
    assert config['gpu'] == 0 and config['cuda_graph'] and config['amp']
    assert 'warning: CUDA graph capture' not in procs['default'].stderr
    metrics = read(snaps / '1' / 'metrics.json')
    assert metrics['train.loss']['steps'] == [1, 2]
    assert all(np.isfinite(metrics['train.loss']['values']))


def test_resume_on_cuda_is_bit_exact_with_deterministic_algorithms(script_runs):
    _, snaps, procs = script_runs
    full = torch.load(snaps / '2' / 'last.pt', weights_only=True)
    resumed = torch.load(snaps / '4' / 'last.pt', weights_only=True)
    assert full['epoch'] == resumed['epoch'] == 2
    assert float(full['loss']['temperature']) > 1.05  # T moved, so keeping it is checked
    assert torch.equal(full['loss']['temperature'], resumed['loss']['temperature'])
    for k, v in full['model'].items():
        assert torch.equal(v, resumed['model'][k]), k
    a, b = read(snaps / '2' / 'metrics.json'), read(snaps / '4' / 'metrics.json')
    for key in ('train.loss', 'val.acc1_avg', 'temperature'):
        assert b[key]['values'] == a[key]['values'][1:], key
    assert 'resuming' in procs['resumed'].stdout


def test_eval_on_cuda(script_runs):
    _, snaps, procs = script_runs
    result = read(snaps / '5' / 'run.json')['result']
    assert read(snaps / '5' / 'config.json')['gpu'] == 0
    assert 0 <= result['acc1_avg'] <= 1 and 'macs_clf10' in result
    # the time per image of each exit, measured on the GPU in both graphed modes
    assert 0 < result['ms_streaming_clf0'] < result['ms_streaming_clf10']
    assert 0 < result['ms_latency_clf0'] < result['ms_latency_clf10']
    for name in ('budgeted.csv', 'budgeted_ms.png'):
        assert (snaps / '5' / name).is_file()
    assert 'warning: CUDA graph capture' not in procs['eval'].stderr


@pytest.fixture(scope='module')
def noise_net():
    """(the paper's MsdNet on the GPU in eval mode with the BatchNorm statistics of noise (see
    benchmarks/early_exit.py), a generator of more noise, its calibration confidences)."""
    torch.manual_seed(0)
    net = models.build(PAPER_NET).to(CUDA)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.randn(128, 3, 32, 32, generator=g).to(CUDA))
    net.eval()
    with torch.inference_mode():
        calib = torch.stack(net(torch.randn(256, 3, 32, 32, generator=g).to(CUDA)))
    return net, g, confidences(calib.cpu())[0]


def test_early_exit_on_cuda_gives_the_budgeted_decisions(noise_net):
    net, g, calib = noise_net
    x = torch.randn(256, 3, 32, 32, generator=g).to(CUDA)
    with torch.inference_mode():
        conf, _ = confidences(torch.stack(net(x)).cpu())
    thresholds = fit_thresholds(calib, geometric_fractions(11, 0.7))
    expected = exit_indices(conf, thresholds)
    assert expected.unique().numel() >= 5  # several exits used: the comparison means something
    _, exit_of = early_exit_predict(net, x, thresholds)
    assert exit_of.is_cuda
    differ = exit_of.cpu() != expected
    # a subset runs other kernels than the full batch: only a tie within rounding may flip
    near = (conf - torch.as_tensor(thresholds, dtype=conf.dtype)[:, None]).abs().amin(0) < 1e-4
    assert not (differ & ~near).any()


def simulated(net, x, thresholds, batch_size):
    """(predictions, exits, confidences, all confidences) of the budgeted decisions on the full
    forward pass in batches of ``batch_size``, on the CPU."""
    with torch.inference_mode():
        logits = torch.cat([torch.stack(net(b)) for b in x.split(batch_size)], dim=1).cpu()
    conf, pred = confidences(logits)
    exits = exit_indices(conf, thresholds)
    at_exit = lambda t: t.gather(0, exits[None])[0]
    return at_exit(pred), exits, at_exit(conf), conf


def near_a_threshold(conf, thresholds):
    """Samples whose confidence at some exit lies within rounding of its threshold: a kernel
    for another batch size may decide them otherwise."""
    return (conf - torch.as_tensor(thresholds, dtype=conf.dtype)[:, None]).abs().amin(0) < 1e-4


def counted_syncs_only(runner, monkeypatch):
    """Makes any host sync but the runner's counted ones (``host_value``) an error."""
    counted = runner.host_value

    def host_value(t):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return counted(t)
        finally:
            torch.cuda.set_sync_debug_mode('error')
    monkeypatch.setattr(runner, 'host_value', host_value)


@pytest.fixture
def sync_debug_off_afterwards():
    yield
    torch.cuda.set_sync_debug_mode(0)


def test_streaming_on_cuda_replays_graphs_and_decides_bit_for_bit_as_the_full_pass(
        noise_net, deterministic_cudnn, monkeypatch, sync_debug_off_afterwards):
    """Every step at batch 64 (tails padded to it), as the full pass in batches of 64: the same
    kernels on the same shapes, so the same bits for each image, whatever else is in its batch.
    The host syncs once per round of steps and nowhere else, other thresholds replay the same
    graphs."""
    net, g, calib = noise_net
    x = torch.randn(640, 3, 32, 32, generator=g).to(CUDA)
    runner = StreamingExit(net, 64, tail_sizes=[])
    for q in (0.7, 1.5):
        thresholds = fit_thresholds(calib, geometric_fractions(11, q))
        pred, exits, conf, _ = simulated(net, x, thresholds, 64)
        assert exits.unique().numel() >= 5  # several exits used: the comparison means something
        got = runner.run(x, thresholds)
        assert all(t.is_cuda for t in got)
        assert runner.graphed and runner.captures == 11  # one graph per block, for both budgets
        assert torch.equal(got[1].cpu(), exits) and torch.equal(got[0].cpu(), pred)
        assert torch.equal(got[2].cpu(), conf)
    syncs = runner.syncs
    counted_syncs_only(runner, monkeypatch)
    torch.cuda.set_sync_debug_mode('error')
    again = runner.run(x, thresholds)  # raises at any other host sync
    torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(again[1].cpu(), exits)
    assert 0 < runner.syncs - syncs <= runner.rounds_bound(len(x))


def test_streaming_on_cuda_with_its_default_tail_graphs(noise_net):
    """Batches of 256 and the end of the stream on smaller graphs (64, 16, 4, 1): the decisions
    of the full pass in batches of 256, but where a confidence lies within rounding of a
    threshold (another batch size, other kernels)."""
    net, g, calib = noise_net
    x = torch.randn(1000, 3, 32, 32, generator=g).to(CUDA)
    thresholds = fit_thresholds(calib, geometric_fractions(11, 0.7))
    pred, exits, conf, all_conf = simulated(net, x, thresholds, 256)
    runner = StreamingExit(net, 256)
    assert runner.tail_sizes == [1, 4, 16, 64]
    got_pred, got_exits, got_conf = (t.cpu() for t in runner.run(x, thresholds))
    sizes = {size for _, size in runner.replays}
    assert runner.graphed and sizes - {256} and runner.captures == 11 * len(sizes)
    near = near_a_threshold(all_conf, thresholds)
    differ = (got_exits != exits) | (got_pred != pred)
    assert not (differ & ~near).any()
    same = ~differ
    torch.testing.assert_close(got_conf[same], conf[same], rtol=1e-5, atol=1e-6)


def test_latency_on_cuda_replays_graphs_and_syncs_once_per_block(
        noise_net, deterministic_cudnn, monkeypatch, sync_debug_off_afterwards):
    net, g, calib = noise_net
    x = torch.randn(48, 3, 32, 32, generator=g).to(CUDA)
    thresholds = fit_thresholds(calib, geometric_fractions(11, 0.7))
    pred, exits, conf, _ = simulated(net, x, thresholds, 1)
    runner = LatencyExit(net, 1)
    got = runner.run(x, thresholds)
    assert runner.graphed and runner.captures == 11
    assert torch.equal(got[1].cpu(), exits) and torch.equal(got[0].cpu(), pred)
    assert torch.equal(got[2].cpu(), conf)
    syncs = runner.syncs
    counted_syncs_only(runner, monkeypatch)
    torch.cuda.set_sync_debug_mode('error')
    runner.run(x, thresholds)  # raises at any other host sync
    torch.cuda.set_sync_debug_mode(0)
    # after every block an image ran but the last: whether it goes on
    assert runner.syncs - syncs == int((exits + 1).clamp(max=10).sum())


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_every_registered_model_early_exits_on_cuda_graphs(name):
    torch.manual_seed(0)
    net = models.build(TINY[name]).to(CUDA).eval()
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        calib, _ = confidences(torch.stack(net(
            torch.randn(48, 3, 32, 32, generator=g).to(CUDA))).cpu())
    thresholds = fit_thresholds(calib, geometric_fractions(3, 1.0))
    x = torch.randn(64, 3, 32, 32, generator=g).to(CUDA)
    for runner in (StreamingExit(net, 8, tail_sizes=[]), LatencyExit(net, 4)):
        pred, exits, conf, all_conf = simulated(net, x, thresholds, runner.batch_size)
        assert exits.unique().numel() == 3
        got_pred, got_exits, _ = (t.cpu() for t in runner.run(x, thresholds))
        assert runner.graphed and runner.captures == 3, type(runner).__name__
        differ = (got_exits != exits) | (got_pred != pred)
        assert not (differ & ~near_a_threshold(all_conf, thresholds)).any()


def test_torchrun_one_process_nccl(tmp_path):
    env = dict(os.environ, MULTIEXIT_SNAPSHOTS=str(tmp_path / 'snapshots'), PYTHONPATH=pythonpath(),
               OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
         str(ROOT / 'train_cifar.py'), 'with', 'data_dir=data/gen', *SCRIPT_DATA, 'n_epochs=1'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / 'snapshots').iterdir() if p.name.isdigit()]
    assert len(runs) == 1
    assert read(runs[0] / 'run.json')['status'] == 'COMPLETED'
    assert (runs[0] / 'last.pt').is_file()


def test_image_loader_pins_and_normalises_on_the_gpu_as_on_the_cpu(tmp_path):
    root = write_fake_image_folders(tmp_path / 'images')
    cf = dict(call='ImageFolder', nval_per_class=2, augment=True, image_size=64, n_workers=2)
    gpu = data.build(cf).loader('train', root, 8, CUDA, seed=1, channels_last=True)
    cpu = data.build(cf).loader('train', root, 8, 'cpu', seed=1)
    assert gpu._loader.pin_memory
    pairs = list(zip(gpu, cpu))
    assert len(pairs) == 5
    for (xg, yg), (xc, yc) in pairs:
        assert xg.is_cuda and xg.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-5)
        assert torch.equal(yg.cpu(), yc)


def test_train_imagenet_smoke_on_cuda_with_the_fast_path(tmp_path):
    snaps = tmp_path / 'snapshots'
    proc = run_script('train_imagenet.py', 'with', 'smoke', 'gpu=0', cwd=tmp_path, snapshots=snaps)
    assert read(snaps / '1' / 'run.json')['status'] == 'COMPLETED'
    assert 'warning: CUDA graph capture' not in proc.stderr
    run_script('eval.py', 'with', 'snapshot_name=1', cwd=tmp_path, snapshots=snaps)
    assert read(snaps / '2' / 'run.json')['result']['macs_clf2'] > 0


# --- packs: K runs as one fused network (multiexit.models.fused) ----------------------------------

PACK_NET = dict(TINY['MsdNet'], out_dim=None)
PACK_MEMBERS = [(0, dict(call='ClassificationOnlyLoss')),
                (1, dict(call='DistillationBasedLoss', C=0.5, maxprob=0.02, global_scale=10 / 3)),
                (2, dict(call='DistillationLossConstTemp', C=0.3, T=4.0, global_scale=2.0))]


@pytest.fixture(scope='module')
def pack_data(tmp_path_factory):
    from multiexit.data.cifar import write_fake_cifar
    data = tmp_path_factory.mktemp('pack-data')
    write_fake_cifar(data, 'Cifar10', n_train_per_class=30, n_test_per_class=5)
    return data


def cuda_run(data, run_dir, seed, cf_loss, **switches):
    """A run of 8 steps (batch 16) on CUDA with the default switches, but ``switches``. At lr
    0.01: at 0.1 this tiny network is chaotic (the roundings of two convolution algorithms part
    its trajectories by 1e-2 in 5 steps, on the CPU as well)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    trn = dict(call='Cifar10', n_per_class=18, nval_per_class=5, augment=True, seed=seed)
    cfg = TrainConfig(cf_net=PACK_NET, cf_loss=dict(cf_loss, acc_tops=[1]), cf_trn=trn,
                      cf_val=dict(trn, augment=False),
                      cf_opt=dict(call='SGD', **dict(OPT, lr=0.01)),
                      cf_scheduler=dict(call='StepLR', step_size=5), batch_size=16,
                      val_batch_size=50, n_epochs=1, data_dir=data, gpu=0, seed=seed, **switches)
    return Run(cfg, run_dir, log=lambda *a: None)


def losses_of(loss_fn):
    """Every training call's loss and temperature (one host sync per step: a test)."""
    calls = []
    loss_fn.register_forward_hook(lambda m, args, out: calls.append((
        torch.atleast_1d(out.detach()).tolist(),
        torch.atleast_1d(getattr(m, 'temperature', torch.ones(()))).tolist())) if m.training
        else None)
    return calls


@pytest.mark.parametrize('amp, rtol', [(False, 1e-3), (True, 3e-2)])
def test_a_pack_on_cuda_trains_each_member_as_its_solo_run(pack_data, tmp_path, amp, rtol):
    """The default CUDA path (CUDA graph, channels_last, fused SGD; fp32 with TF32 off, and
    bf16) with parallel streams, opt-in until the check that runs this test turns them on: a
    pack of three members and each member alone, 8 steps. cuDNN's grouped
    convolutions round otherwise than the plain ones, so close, not equal; the temperatures
    are the same."""
    solo = []
    for seed, loss in PACK_MEMBERS:
        run = cuda_run(pack_data, tmp_path / f'solo{seed}', seed, loss, amp=amp,
                       cuda_streams=True)
        calls = losses_of(run.loss_fn)
        train_alone(run)
        solo.append((run, calls))
    runs = [cuda_run(pack_data, tmp_path / f'm{seed}', seed, loss, amp=amp, cuda_streams=True)
            for seed, loss in PACK_MEMBERS]
    packed = PackedRuns(runs)
    assert isinstance(packed.step, GraphedTrainStep)
    calls = losses_of(packed.loss_fn)
    fit(packed)
    assert not packed.step.eager_only and all(r.error is None for r in runs)
    for k, ((alone, solo_calls), member) in enumerate(zip(solo, runs)):
        assert len(calls) == len(solo_calls) == 8
        np.testing.assert_allclose([c[0][k] for c in calls], [c[0][0] for c in solo_calls],
                                   rtol=rtol)
        assert [c[1][k] for c in calls] == [c[1][0] for c in solo_calls]
        mine, theirs = member.model.state_dict(), alone.model.state_dict()
        for name, value in theirs.items():  # the conv biases before BatchNorm: rounding alone
            if value.is_floating_point():
                torch.testing.assert_close(mine[name], value, rtol=10 * rtol, atol=1e-5)
    assert calls[-1][1][1] > 1  # the DBT member's T rose


def test_a_pack_replays_its_graph_as_its_eager_step(pack_data, tmp_path):
    """fp32, deterministic algorithms: the captured step of a pack (its inputs copied into the
    graph's, its accumulators per member) trains as its eager step."""
    out = []
    for graph in (False, True):
        runs = [cuda_run(pack_data, tmp_path / f'{graph}{seed}', seed, loss, amp=False,
                         cuda_graph=graph, deterministic=True)
                for seed, loss in PACK_MEMBERS]
        packed = PackedRuns(runs)
        calls = losses_of(packed.loss_fn)
        val, _ = fit(packed)
        out.append((calls, val, [r.model.state_dict() for r in runs]))
    (eager, eager_val, eager_w), (graphed, graphed_val, graphed_w) = out
    np.testing.assert_allclose(np.array([c[0] for c in graphed]), np.array([c[0] for c in eager]),
                               rtol=1e-5)
    assert [c[1] for c in graphed] == [c[1] for c in eager]
    for mine, theirs in zip(graphed_w, eager_w):
        for name, value in theirs.items():
            if value.is_floating_point():
                torch.testing.assert_close(mine[name], value, rtol=1e-4, atol=1e-6)
    for a, b in zip(graphed_val, eager_val):
        assert a['acc1_avg'] == pytest.approx(b['acc1_avg'], abs=0.02)
