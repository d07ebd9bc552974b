"""Training regimes (multiexit.train.regime, ``cf_regime``): which parameters each phase trains,
on MsdNet and a ResNet, alone, in a pack and under a CUDA-graph stand-in; the phase boundary's
fresh optimizer state and schedule; the checks; a disjoint run from train_cifar.py's command
line that resumes exactly inside either phase and at the boundary."""
import json
import os
import re
import signal

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from helpers import RISING_T, TINY, assert_resumed_exactly, run_in_process, saved_epoch
from recorded_graphs import RecordedGraphs
from multiexit.config import TrainConfig
from multiexit.data.cifar import write_fake_cifar
from multiexit.errors import ConfigError
from multiexit.train.api import train_alone, train_packs
from multiexit.train.loop import fit
from multiexit.train.run import Run, phased_schedule, step_without_optimizer
from multiexit.train import solo
from multiexit.train.step import GraphedTrainStep

NETS = {'MsdNet': None, 'ResNet': dict(TINY['ResNet'], out_dim=None)}


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """train_cifar.py's smoke configuration (DBT, whose T rises from the first step it trains),
    on a generated data set of 3 images per class: 3 steps an epoch."""
    import train_cifar

    config = dict(train_cifar.ex.run('print_config', named_configs=['smoke']).config)
    data = tmp_path_factory.mktemp('data')
    write_fake_cifar(data, 'Cifar100', n_train_per_class=30, n_test_per_class=2)
    small = dict(n_per_class=3, nval_per_class=1)
    return dict(config, data_dir=str(data), seed=3, parent_snapshot=None, save_interval=1,
                cf_loss=dict(config['cf_loss'], maxprob=0.015),
                cf_trn=dict(config['cf_trn'], **small), cf_val=dict(config['cf_val'], **small))


def built(config, run_dir, net='MsdNet', **changes):
    """A Run of ``config`` with ``changes`` (whole values) and the network ``net`` of NETS."""
    config = dict(config, **changes, **({'cf_net': NETS[net]} if NETS[net] else {}))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'config.json').write_text(json.dumps(config))
    return Run(TrainConfig.of(config), run_dir, run_dir.parent, log=lambda *a: None)


def state(run_dir, epoch):
    return torch.load(run_dir / f'ep{epoch}.pt', weights_only=True)['model']


def changed(before, after, names):
    """Of ``names`` (parameter and buffer names), those whose tensor differs."""
    return {k for k in names if not torch.equal(before[k], after[k])}


def parts(model):
    """(names of the backbone's and last exit's tensors, names of the early exits' tensors)."""
    heads = {f'exits.{i}.' for i in range(len(model.exits) - 1)}
    names = list(model.state_dict())
    head = [k for k in names if any(k.startswith(h) for h in heads)]
    return [k for k in names if k not in head], head


def params(model, names):
    return [k for k in names if k in dict(model.named_parameters())]


@pytest.mark.parametrize('net', NETS)
@pytest.mark.parametrize('call', ['disjoint', 'mixed'])
def test_each_phase_trains_its_parameters(smoke, tmp_path, net, call):
    """Epoch 1 (phase 1) changes every parameter of the backbone and last exit and nothing of
    the early exits, not even their BatchNorm statistics; epochs 2-3 (phase 2) change every
    early exit's parameter and, for disjoint, leave the backbone bit-identical (its BatchNorm
    statistics and counters included), for mixed change all parameters."""
    run = built(smoke, tmp_path / 'r', net, n_epochs=3,
                cf_regime=dict(call=call, backbone_epochs=1))
    backbone, heads = parts(run.model)
    start = {k: v.clone() for k, v in run.model.state_dict().items()}
    train_alone(run)
    ep1, ep3 = state(tmp_path / 'r', 1), state(tmp_path / 'r', 3)
    assert changed(start, ep1, params(run.model, backbone)) == set(params(run.model, backbone))
    assert not changed(start, ep1, heads)
    assert changed(ep1, ep3, params(run.model, heads)) == set(params(run.model, heads))
    if call == 'disjoint':
        assert not changed(ep1, ep3, backbone)
    else:
        assert changed(ep1, ep3, params(run.model, backbone)) == set(params(run.model, backbone))
    assert run.loss_fn.T > 1  # DBT trained in phase 2 only: its T rose there


def test_phase_1_is_the_cross_entropy_of_the_last_exit(smoke, tmp_path):
    run = built(smoke, tmp_path / 'r', n_epochs=2, cf_regime=dict(call='mixed',
                                                                  backbone_epochs=1))
    logits = [torch.randn(4, 100) for _ in range(run.n_exits)]
    y = torch.tensor([1, 2, -100, 3])
    expected = torch.nn.functional.cross_entropy(logits[-1], y)
    assert torch.allclose(run.train_loss(logits, y), expected)
    run.scheduler.step()  # into phase 2: the run's own loss
    run.train_loss.eval()  # DBT raises its T at a training call
    assert torch.equal(run.train_loss(logits, y), run.loss_fn(logits, y))


def test_the_boundary_starts_a_fresh_optimizer_and_the_schedule_per_phase(smoke, tmp_path):
    """n_epochs=8, milestones [4, 6] and a share of 0.25 for the backbone: phase 1 (2 epochs)
    decays at its epoch 1 (the milestones scaled by 2/8, rounded half up: [1, 2]), phase 2 at
    its epochs 3 and 5 (by 6/8: [3, 5]), each from cf_opt's lr; the optimizer's state is
    dropped at the boundary."""
    run = built(smoke, tmp_path / 'r', n_epochs=8, cf_scheduler=dict(
        call='MultiStepLR', milestones=[4, 6], gamma=0.1),
        cf_regime=dict(call='disjoint', backbone_epochs=0.25))
    lrs = []
    for epoch in range(8):
        lrs.append(run.optimizer.param_groups[0]['lr'])
        if epoch == 1:
            run.optimizer.state[next(run.model.parameters())]['momentum_buffer'] = torch.ones(1)
        step_without_optimizer(run.scheduler)
        if epoch == 1:
            assert not run.optimizer.state
    assert lrs == pytest.approx([0.1, 0.01, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001])


def test_a_resumed_schedule_is_that_of_its_phase(smoke, tmp_path):
    """The schedule, loss and trainable parameters that a run resumed at each epoch starts
    with are those of the run that stepped there."""
    cf = dict(n_epochs=8, cf_scheduler=dict(call='MultiStepLR', milestones=[4, 6], gamma=0.1),
              cf_regime=dict(call='mixed', backbone_epochs=2))
    stepped = built(smoke, tmp_path / 'stepped', **cf)
    for epoch in range(1, 8):
        step_without_optimizer(stepped.scheduler)
        resumed = built(smoke, tmp_path / f'at{epoch}', **cf)
        _, loss = phased_schedule(resumed.cfg, resumed.model, resumed.optimizer,
                                  resumed.loss_fn, epoch)
        assert resumed.optimizer.param_groups[0]['lr'] == pytest.approx(
            stepped.optimizer.param_groups[0]['lr']), epoch
        assert trainable(resumed.model) == trainable(stepped.model)
        assert loss.last_exit_only == stepped.train_loss.last_exit_only == (epoch < 2)


def trainable(model):
    return [name for name, p in model.named_parameters() if p.requires_grad]


@pytest.fixture
def no_onednn():
    """Convolutions without oneDNN, whose grouped kernels (a pack's) sum in another order."""
    saved, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    yield
    torch.backends.mkldnn.enabled = saved


def test_a_pack_trains_each_member_as_it_would_alone(smoke, tmp_path, no_onednn):
    """Two seeds of disjoint, packed (one fused network, optimizer and schedule) and alone: the
    same weights and BatchNorm statistics after each phase, the backbone bit-identical in
    phase 2 and the early exits in phase 1."""
    cf = dict(n_epochs=3, cf_regime=dict(call='disjoint', backbone_epochs=1),
              cf_loss=dict(call='ClassificationOnlyLoss'))
    alone = [built(smoke, tmp_path / f'a{s}', seed=s, **cf) for s in (1, 2)]
    for run in alone:
        train_alone(run)
    packed = [built(smoke, tmp_path / f'p{s}', seed=s, **cf) for s in (1, 2)]
    starts = [{k: v.clone() for k, v in run.model.state_dict().items()} for run in packed]
    train_packs(packed)
    for a, p, start in zip(alone, packed, starts):
        backbone, heads = parts(p.model)
        assert not changed(start, state(p.run_dir, 1), heads)
        assert not changed(state(p.run_dir, 1), state(p.run_dir, 3), backbone)
        for epoch in (1, 3):
            for k, v in state(a.run_dir, epoch).items():
                torch.testing.assert_close(state(p.run_dir, epoch)[k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('momentum', [0.9, 0.0])
def test_under_a_graph_the_phases_train_as_eagerly(smoke, tmp_path, monkeypatch, momentum):
    """The training step captured and replayed (the CPU stand-in): each phase's step is built and
    captured afresh, since the parameters that train are a constant of the capture, and the run
    trains bit for bit as the eager one. Plain SGD (momentum 0) keeps no optimizer state, so
    only the parameters that train tell the phases apart."""
    cf = dict(n_epochs=3, cf_regime=dict(call='disjoint', backbone_epochs=1),
              cf_opt=dict(smoke['cf_opt'], momentum=momentum, nesterov=False))
    eager = built(smoke, tmp_path / 'eager', **cf)
    train_alone(eager)
    run = built(smoke, tmp_path / 'graphed', **cf)
    graphs, steps = RecordedGraphs(), []

    def graphed(lead, model, loss_fn, optimizer, members=1):
        steps.append(GraphedTrainStep(model, loss_fn, optimizer, lead.n_exits, lead.acc_tops,
                                      lead.device, T=getattr(loss_fn, 'temperature', None),
                                      warmup=1, graphs=graphs))
        return steps[-1], None
    monkeypatch.setattr(solo, 'build_steps', graphed)
    fit(solo.Solo(run))
    assert [s.captures for s in steps] == [1, 1] and graphs.replays > 0
    assert not any(s.eager_only for s in steps)
    for k, v in eager.model.state_dict().items():
        assert torch.equal(v, run.model.state_dict()[k]), k
    backbone, _ = parts(run.model)
    assert not changed(state(tmp_path / 'graphed', 1), state(tmp_path / 'graphed', 3), backbone)


@pytest.mark.parametrize('regime_cf, n_epochs, message', [
    (dict(call='sequential'), 3, "cf_regime.call='sequential': unknown"),
    (dict(call='disjoint', backbone_epochs=0), 3, 'cf_regime.backbone_epochs=0: expected an '
                                                  'integer >= 1 (epochs), a number in (0, 1)'),
    (dict(call='mixed', backbone_epochs=3), 3, 'cf_regime.backbone_epochs=3 with n_epochs=3 '
                                               'gives phases of 3 + 0 epochs'),
    (dict(call='mixed', backbone_epochs=0.1), 3, 'gives phases of 0 + 3 epochs'),
    (dict(call='mixed', backbone_epochs=0.5), 1, 'gives phases of 1 + 0 epochs'),
    (dict(call='joint', backbone_epochs='x'), 3, "cf_regime.backbone_epochs='x': expected"),
    (dict(call='disjoint', backbone_epochs=None), 3, 'cf_regime for disjoint: backbone_epochs='
                                                     'None: give the epochs of phase 1'),
])
def test_bad_regimes_are_refused(regime_cf, n_epochs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.check(dict(cf_regime=regime_cf, n_epochs=n_epochs))


def test_a_bad_regime_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    proc = run_in_process('train_cifar.py', 'with', 'smoke', 'cf_regime.call=disjont',
                          cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: cf_regime.call='disjont': unknown (did you mean disjoint?); known: disjoint, "
        'joint, mixed')


@pytest.fixture
def interrupt_after(tmp_path):
    """``interrupt_after(epoch)``: SIGINT reaches this process at the first training step after
    snapshots/2/last.pt holds ``epoch``, as a terminal's Ctrl-C would."""
    handles = []
    before = signal.signal(signal.SIGINT, signal.default_int_handler)

    def arm(epoch):
        sent = []

        def hook(optimizer, args, kwargs):
            if not sent and saved_epoch(tmp_path / 'snapshots' / '2') == epoch:
                sent.append(epoch)
                os.kill(os.getpid(), signal.SIGINT)
        handles.append(register_optimizer_step_post_hook(hook))
    try:
        yield arm
    finally:
        for handle in handles:
            handle.remove()
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize('stop', [1, 2, 3])
def test_a_disjoint_run_resumes_exactly_in_either_phase_and_at_the_boundary(
        tmp_path, interrupt_after, stop):
    """train_cifar.py with the disjoint regime, 2 of 4 epochs for the backbone: stopped after
    epoch ``stop`` (in phase 1, at the boundary, in phase 2) and resumed, it ends as the
    uninterrupted run, to the bit, DBT's temperature included (it moves in phase 2)."""
    args = ['with', 'smoke', 'n_epochs=4', 'seed=5', 'cf_trn.n_per_class=3',
            'cf_trn.nval_per_class=1', 'cf_regime.call=disjoint', 'cf_regime.backbone_epochs=2',
            RISING_T]
    snaps = tmp_path / 'snapshots'
    run_in_process('train_cifar.py', *args, cwd=tmp_path)
    interrupt_after(stop)
    stopped = run_in_process('train_cifar.py', *args, cwd=tmp_path, check=False)
    assert stopped.returncode == 130 and saved_epoch(snaps / '2') == stop, stopped.stderr[-2000:]
    run_in_process('train_cifar.py', *args, f'parent_snapshot={snaps / "2"}', cwd=tmp_path)
    assert_resumed_exactly(snaps / '3' / 'last.pt', snaps / '1' / 'last.pt', 4)
    assert torch.load(snaps / '1' / 'last.pt', weights_only=True)['loss']['temperature'] > 1
