"""Runs trained as one fused network (multiexit.models.fused, train.pack.PackedRuns): each
member trains as its solo run does, is a run of its own on disk, and stops, fails and resumes as
one; in this process, on generated data, fp32 on the CPU."""
import contextlib
import json

import numpy as np
import pytest
import torch

from helpers import TINY, assert_resumed_exactly, train_epochs_of_steps
from multiexit import losses, models
from multiexit.errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from multiexit.models.fused import fuse, member_part
from multiexit.config import TrainConfig
from multiexit.train import checkpoint, pack
from multiexit.train.api import train_alone
from multiexit.train.loop import fit
from multiexit.train.pack import PackedRuns, PackLoss
from multiexit.train.run import Run
from multiexit.train.step import GraphedTrainStep, TrainStep
from recorded_graphs import RecordedGraphs
from tools.kernel_count import count_ops

MSDNET = dict(TINY['MsdNet'], out_dim=None)
RESNET = dict(call='ResNet', depth=8, exit_after=[0], head='conv', head_width=8, out_dim=None)
# 20 training images per class, batch 8: 25 steps an epoch
DATA = dict(call='Cifar10', n_per_class=25, nval_per_class=5, augment=True)
OPT = dict(call='SGD', lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
SCHEDULE = dict(call='MultiStepLR', milestones=[1], gamma=0.5)
# Three grid cells of one size: the three methods, each of another seed (initialisation, subset,
# order, augmentation). DBT's maxprob is below a fresh 10-class teacher's confidence, so that
# its temperature rises for a while.
MEMBERS = [
    (0, dict(call='ClassificationOnlyLoss')),
    (1, dict(call='DistillationBasedLoss', C=0.5, maxprob=0.13, global_scale=10 / 3)),
    (2, dict(call='DistillationLossConstTemp', C=0.3, T=4.0, global_scale=2.0)),
]
# A pack whose members differ in method: two vectorised (distillation_loss) and two computed on
# their own part of the logits, one of whose weights follow the epoch.
MIXED = [
    (0, dict(call='ClassificationOnlyLoss')),
    (3, dict(call='DistillationFromLaterExits', kd_weight=0.5)),
    (1, dict(call='DistillationBasedLoss', C=0.5, maxprob=0.13, global_scale=10 / 3)),
    (4, dict(call='SdnWeightedLoss')),
]


def make_run(data_dir, run_dir, seed, cf_loss, net=MSDNET, n_epochs=2, parent=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    trn = dict(DATA, seed=seed)
    cfg = TrainConfig(cf_net=net, cf_loss=dict(cf_loss, acc_tops=[1]), cf_trn=trn,
                      cf_val=dict(trn, augment=False), cf_opt=OPT, cf_scheduler=SCHEDULE,
                      batch_size=8, val_batch_size=40, n_epochs=n_epochs, data_dir=data_dir,
                      gpu=-1, seed=seed, parent_snapshot=parent)
    return Run(cfg, run_dir, log=lambda *a: None)


@contextlib.contextmanager
def no_onednn():
    """Convolutions without oneDNN (see ``trained``)."""
    saved, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved


def recorded(loss_fn):
    """Every training call's loss and temperature, as lists (one entry per member)."""
    calls = []

    def hook(module, args, out):
        if module.training:
            T = getattr(module, 'temperature', torch.ones(()))
            calls.append((torch.atleast_1d(out.detach()).tolist(),
                          torch.atleast_1d(T).tolist()))
    loss_fn.register_forward_hook(hook)
    return calls


def relative(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.fixture(scope='module')
def trained(fake_data, tmp_path_factory):
    """50 steps of each member alone, and of the three as a pack: MsdNet (``solo_and_packed``)."""
    with no_onednn():
        return _trained(MSDNET, fake_data, tmp_path_factory.mktemp('pack-MsdNet'))


@pytest.fixture(scope='module', params=['MsdNet', 'ResNet'])
def solo_and_packed(request, trained, fake_data, tmp_path_factory):
    """50 steps of each member alone, and of the three as a fused.

    With oneDNN off: these small networks at batch 8 are chaotic (a solo run whose weights are
    perturbed by 1e-7 relative differs from the unperturbed one by ~1e-2 in its loss after 20
    steps), and oneDNN rounds a grouped convolution of few channels per group (the stem's 3,
    6) otherwise than the plain one, by up to 4e-6 (test_fused_forward_equals_each_model_alone
    holds it to 1e-5). Without oneDNN, a grouped convolution computes each group as the plain
    one does, and so does the rest of the fused step: a member's gradients are its solo run's to
    the bit, which is what the 50 steps check."""
    if request.param == 'MsdNet':
        return trained
    with no_onednn():
        return _trained(RESNET, fake_data, tmp_path_factory.mktemp('pack-ResNet'))


@pytest.fixture(scope='module')
def mixed(fake_data, tmp_path_factory):
    """50 steps of each MIXED member alone, and of the four as a pack: MsdNet."""
    with no_onednn():
        return _trained(MSDNET, fake_data, tmp_path_factory.mktemp('pack-mixed'), MIXED)


def _trained(net, fake_data, tmp, members=MEMBERS):
    solo = []
    for seed, loss in members:
        run = make_run(fake_data, tmp / f'solo{seed}', seed, loss, net)
        calls = recorded(run.loss_fn)
        train_alone(run)
        solo.append((run, calls))
    runs = [make_run(fake_data, tmp / f'member{seed}', seed, loss, net) for seed, loss in members]
    packed = PackedRuns(runs)
    calls = recorded(packed.loss_fn)
    assert [r.error for r in runs] == [None] * len(members) and fit(packed)[0]
    assert len(calls) == 50
    return net, solo, runs, calls


def test_each_member_trains_as_its_solo_run(solo_and_packed):
    """Per-step loss within 1e-4 relative over 50 steps, the same temperatures, the weights and
    BatchNorm statistics after 50 steps within 1e-3 relative."""
    _, solo, runs, calls = solo_and_packed
    assert_members_train_as_alone(solo, runs, calls)
    dbt = [c[1][1] for c in calls]
    assert dbt[0] == 1.05 and len(set(dbt)) > 2, 'the DBT member\'s temperature did not move'


def test_members_of_different_methods_train_as_their_solo_runs(mixed):
    """Standard, distillation from later exits, DBT and SDN in one pack: each as alone, as
    above; the DBT member's temperature rises with its own teacher, and the SDN member's
    weights follow the epochs (the pack's set_epoch reaches them)."""
    _, solo, runs, calls = mixed
    assert_members_train_as_alone(solo, runs, calls)
    dbt = [c[1][2] for c in calls]
    assert dbt[0] == 1.05 and len(set(dbt)) > 2, 'the DBT member\'s temperature did not move'
    assert [c[1][k] for c in calls for k in (0, 1, 3)] == [1.0] * 150
    assert runs[3].loss_fn.weights.tolist() == pytest.approx([0.45, 0.9, 1.0])  # epoch 2 of 2


def assert_members_train_as_alone(solo, runs, calls):
    for k, ((run, solo_calls), member) in enumerate(zip(solo, runs)):
        assert len(solo_calls) == 50
        alone = np.array([c[0][0] for c in solo_calls])
        packed = np.array([c[0][k] for c in calls])
        np.testing.assert_allclose(packed, alone, rtol=1e-4)
        assert [c[1][k] for c in calls] == [c[1][0] for c in solo_calls]
        mine, theirs = member.model.state_dict(), run.model.state_dict()
        for name, value in theirs.items():
            if value.is_floating_point():
                assert relative(mine[name], value) < 1e-3, (k, name)


def test_members_are_ordinary_runs_on_disk(trained):
    """Each member's folder holds what its solo run's holds: last.pt whose model is a state dict
    of the solo network, the best snapshot, the same metrics."""
    net, solo, runs, _ = trained
    for (alone, _), member in zip(solo, runs):
        assert sorted(p.name for p in member.run_dir.iterdir()) == sorted(
            p.name for p in alone.run_dir.iterdir())
        last = checkpoint.load(member.run_dir / 'last.pt')
        ref = checkpoint.load(alone.run_dir / 'last.pt')
        assert last.keys() == ref.keys() and last['epoch'] == 2
        model = models.build(dict(net, out_dim=10))
        model.load_state_dict(last['model'])  # strict: exactly the solo network's keys and shapes
        assert last['optimizer']['param_groups'] == ref['optimizer']['param_groups']
        assert last['optimizer']['state'].keys() == ref['optimizer']['state'].keys()
        for p, q in zip(last['optimizer']['state'].values(), ref['optimizer']['state'].values()):
            assert relative(p['momentum_buffer'], q['momentum_buffer']) < 1e-3
        assert last['scheduler'] == ref['scheduler'] and last['seed'] == ref['seed']
        assert last['loss'].keys() == ref['loss'].keys()
        for key, value in ref['loss'].items():
            assert torch.equal(last['loss'][key], value), key
        assert last['best_epoch'] == ref['best_epoch']
        best, ref_best = (checkpoint.load(r.run_dir / f'ep{ref["best_epoch"]}.pt')
                          for r in (member, alone))
        assert best['val_metrics'].keys() == ref_best['val_metrics'].keys()
        assert best['model'].keys() == ref_best['model'].keys()


def test_fused_forward_equals_each_model_alone():
    """Every registered model: the fused network's exits are the members' logits, stacked."""
    assert set(TINY) == set(models.REGISTRY)
    for name, cf in TINY.items():
        members = []
        for seed in range(3):
            torch.manual_seed(seed)
            members.append(models.build(cf))
        fused = fuse(members)
        size = 64 if name == 'ImageNetResNet' else 32
        xs = [torch.randn(2, 3, size, size) for _ in members]
        out = fused(torch.cat(xs, dim=1))
        alone = [m(x) for m, x in zip(members, xs)]
        assert len(out) == len(alone[0])
        for e, logits in enumerate(out):
            torch.testing.assert_close(logits, torch.stack([a[e] for a in alone]), rtol=1e-4,
                                       atol=1e-5)
        for k, member in enumerate(members):  # BatchNorm statistics too
            mine = {n: member_part(t, k, member.state_dict()[n].shape)
                    for n, t in fused.state_dict().items()}
            for n, value in member.state_dict().items():
                torch.testing.assert_close(mine[n], value)


def test_kernels_per_step_stay_those_of_one_model():
    """The operators a fused forward, loss and backward dispatch (each a kernel on a GPU) do not
    grow with the number of members."""
    def count(k):
        members = []
        for seed in range(k):
            torch.manual_seed(seed)
            members.append(models.build(TINY['MsdNet']))
        fused = fuse(members)
        loss_fn = PackLoss([losses.DistillationBasedLoss(0.5, 0.5, 3)] * k)
        x, y = torch.randn(2, 3 * k, 32, 32), torch.randint(0, 10, (k, 2))
        return count_ops(lambda: loss_fn(fused(x), y).sum().backward())[0]
    assert count(2) == count(5)


def packed_epochs(graphs=None, n_epochs=3):
    """``n_epochs`` epochs of 2 steps of the MIXED members' tiny MsdNets as one fused network,
    eager or captured on ``graphs`` (``RecordedGraphs``) after one eager step, the pack's loss
    told each epoch: every step's losses, the temperatures and the weights at the end."""
    members = []
    for seed, _ in MIXED:
        torch.manual_seed(seed)
        members.append(models.build(TINY['MsdNet']))
    fused = fuse(members)
    loss_fn = PackLoss([losses.build(dict(cf, n_exits=3)) for _, cf in MIXED])
    opt = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    args = (fused, loss_fn, opt, 3, (1,), 'cpu')
    kwargs = dict(T=loss_fn.temperature, members=len(MIXED))
    step = (TrainStep(*args, **kwargs) if graphs is None else
            GraphedTrainStep(*args, warmup=1, graphs=graphs, **kwargs))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3 * len(MIXED), 32, 32, generator=g),
             torch.randint(0, 10, (len(MIXED), 4), generator=g)) for _ in range(2)]
    record = lambda losses: (losses, loss_fn.temperature.tolist())
    return train_epochs_of_steps(step, loss_fn, data, n_epochs, record), fused.state_dict()


def test_a_captured_step_of_a_mixed_pack_trains_as_the_eager_one():
    """A pack of members of different methods is one capturable step (its CPU stand-in: no host
    sync, every buffer in place): the losses, temperatures (DBT's rising) and weights of the
    eager step, to the bit, each epoch with the SDN member's weights of that epoch."""
    graphs = RecordedGraphs()
    got, weights = packed_epochs(graphs)
    expected, eager_weights = packed_epochs()
    assert graphs.replays == 5 and got == expected and got[-1][1][2] > 1.05 ** 5
    assert all(torch.equal(weights[k], v) for k, v in eager_weights.items())


def same_state(a, b):
    """The names of the tensors that differ between two state dicts (none: equal to the bit)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope='module')
def one_epoch(trained, fake_data, tmp_path_factory):
    """The members of ``trained`` as a pack of 1 epoch, with oneDNN off as there."""
    net = trained[0]
    tmp = tmp_path_factory.mktemp('one-epoch')
    runs = [make_run(fake_data, tmp / f'member{seed}', seed, loss, net, n_epochs=1)
            for seed, loss in MEMBERS]
    with no_onednn():
        fit(PackedRuns(runs))
    return runs


def test_a_pack_resumes_all_its_members_exactly(trained, one_epoch, fake_data, tmp_path):
    net, _, uninterrupted, _ = trained
    runs = [make_run(fake_data, tmp_path / f'r{seed}', seed, loss, net, parent=str(m.run_dir))
            for (seed, loss), m in zip(MEMBERS, one_epoch)]
    assert [r.epoch for r in runs] == [1, 1, 1]
    with no_onednn():
        fit(PackedRuns(runs))
    for run, ref in zip(runs, uninterrupted):
        mine, theirs = (checkpoint.load(r.run_dir / 'last.pt') for r in (run, ref))
        assert mine['epoch'] == 2 and same_state(mine['model'], theirs['model']) == []
        assert same_state(mine['loss'], theirs['loss']) == []


def test_one_member_resumes_alone_as_its_solo_run_would(trained, one_epoch, fake_data,
                                                        tmp_path):
    """The DBT member's epoch 1, resumed alone (a solo run from its last.pt) to epoch 2, ends
    where the solo run of 2 epochs ends, to the bit."""
    net, solo, _, _ = trained
    (seed, loss), member, (alone, _) = MEMBERS[1], one_epoch[1], solo[1]
    run = make_run(fake_data, tmp_path, seed, loss, net, parent=str(member.run_dir))
    assert run.epoch == 1 and run.loss_fn.T > 1
    with no_onednn():
        train_alone(run)
    mine, theirs = (checkpoint.load(r.run_dir / 'last.pt') for r in (run, alone))
    assert same_state(mine['model'], theirs['model']) == []
    assert torch.equal(mine['loss']['temperature'], theirs['loss']['temperature'])


def test_a_member_whose_loss_turns_non_finite_fails_alone(trained, one_epoch, fake_data,
                                                          tmp_path):
    """A global_scale that overflows float32 makes one member's loss infinite from the first
    step: it stops as its solo run would, with nothing saved; the other trains on, to the bit
    as it trains in a healthy fused."""
    net = trained[0]
    (seed, loss), healthy = MEMBERS[0], one_epoch[0]
    runs = [make_run(fake_data, tmp_path / 'ok', seed, loss, net, n_epochs=1),
            make_run(fake_data, tmp_path / 'bad', 1, dict(MEMBERS[2][1], global_scale=1e38),
                     net, n_epochs=1)]
    with no_onednn():
        fit(PackedRuns(runs))
    ok, bad = runs
    assert ok.error is None and isinstance(bad.error, NonFiniteLossError)
    assert str(bad.error) == ('non-finite training loss at epoch 1, step 1; nothing of this '
                              'epoch was saved and no epoch had finished, so there is nothing to '
                              'resume: start the run again: lower the learning rate or check '
                              'the data')
    assert list(bad.run_dir.iterdir()) == []
    assert same_state(checkpoint.load(ok.run_dir / 'last.pt')['model'],
                      checkpoint.load(healthy.run_dir / 'last.pt')['model']) == []


def interrupt_epoch_2(monkeypatch, signal_name):
    """The second training epoch (of the process) stops as ``signal_name`` stops it; returns
    the real ``train_epoch``."""
    real, calls = pack.train_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt(signal_name)
        return real(*args, **kwargs)
    monkeypatch.setattr(pack, 'train_epoch', interrupted)
    return real


def test_a_signal_stops_every_member_as_it_stops_a_solo_run(fake_data, tmp_path, monkeypatch):
    interrupt_epoch_2(monkeypatch, 'SIGTERM')
    runs = [make_run(fake_data, tmp_path / str(seed), seed, loss) for seed, loss in MEMBERS[:2]]
    fit(PackedRuns(runs))
    for run in runs:
        assert isinstance(run.error, TrainingInterrupted) and run.epoch == 1
        assert str(run.error) == (f'SIGTERM during epoch 2; {run.run_dir}/last.pt holds epoch 1; '
                                  f'resume with: python3 <training script> with '
                                  f'parent_snapshot={run.run_dir}')


@pytest.mark.parametrize('change, message', [
    (dict(net=dict(call='WideResNet', depth=10, widen_factor=1, dropout=0.3, out_dim=None)),
     r'a pack cannot train a network with dropout \(p=0.3\)'),
    (dict(n_epochs=3), r'the runs of a pack share n_epochs, but run 2 differs from run 1 in '
                       r'n_epochs 2 -> 3; train them in separate packs'),
])
def test_runs_that_cannot_share_a_pack_are_refused(fake_data, tmp_path, change, message):
    net = change.pop('net', MSDNET)
    runs = [make_run(fake_data, tmp_path / '0', 0, MEMBERS[0][1], net),
            make_run(fake_data, tmp_path / '1', 1, MEMBERS[1][1], net, **change)]
    with pytest.raises(ConfigError, match=message):
        PackedRuns(runs)


def test_a_pack_of_different_methods_resumes_exactly(mixed, fake_data, tmp_path, monkeypatch):
    """The MIXED pack stopped after epoch 1 of 2 and resumed: every member ends where the
    uninterrupted pack's ends, to the bit (the SDN member's resumed epoch has epoch 2's
    weights, the DBT member its temperature)."""
    net, _, uninterrupted, _ = mixed
    real = interrupt_epoch_2(monkeypatch, 'SIGINT')
    first = [make_run(fake_data, tmp_path / f'first{seed}', seed, loss, net)
             for seed, loss in MIXED]
    with no_onednn():
        fit(PackedRuns(first))
    assert all(isinstance(r.error, TrainingInterrupted) and r.epoch == 1 for r in first)
    monkeypatch.setattr(pack, 'train_epoch', real)
    runs = [make_run(fake_data, tmp_path / f'r{seed}', seed, loss, net, parent=str(m.run_dir))
            for (seed, loss), m in zip(MIXED, first)]
    with no_onednn():
        fit(PackedRuns(runs))
    for run, ref in zip(runs, uninterrupted):
        assert_resumed_exactly(run.run_dir / 'last.pt', ref.run_dir / 'last.pt', 2)


def test_distillation_from_later_exits_resumes_alone_exactly(fake_data, tmp_path):
    """The loss has no state: epoch 1 resumed to epoch 2 ends where 2 epochs alone end."""
    loss = dict(call='DistillationFromLaterExits', kd_weight=0.5)
    with no_onednn():
        straight = make_run(fake_data, tmp_path / 'straight', 0, loss)
        train_alone(straight)
        first = make_run(fake_data, tmp_path / 'first', 0, loss, n_epochs=1)
        train_alone(first)
        resumed = make_run(fake_data, tmp_path / 'resumed', 0, loss, parent=str(first.run_dir))
        assert resumed.epoch == 1
        train_alone(resumed)
    mine, theirs = (checkpoint.load(r.run_dir / 'last.pt') for r in (resumed, straight))
    assert mine['epoch'] == theirs['epoch'] == 2 and mine['loss'] == {}
    assert same_state(mine['model'], theirs['model']) == []

# --- train_pack.py: every member a sacred run of its own (in this process) ---

SMOKE = ['smoke', 'cf_trn.n_per_class=3', 'cf_trn.nval_per_class=1', 'n_epochs=2']  # 3 steps


@pytest.fixture(scope='module')
def smoke_data(tmp_path_factory):
    from multiexit.data.cifar import write_fake_cifar
    data = tmp_path_factory.mktemp('smoke-data')
    write_fake_cifar(data, 'Cifar100', n_train_per_class=30, n_test_per_class=2)
    return data


@pytest.fixture()
def snapshots(tmp_path, monkeypatch):
    import training_experiment
    monkeypatch.setattr(training_experiment, 'SNAPSHOT_DIR', str(tmp_path / 'snaps'))
    return tmp_path / 'snaps'


def train_pack_main(*args):
    import train_pack
    return train_pack.main(list(args))


def read(path):
    return json.loads(path.read_text())


@pytest.fixture(scope='module')
def packed_runs(smoke_data, tmp_path_factory):
    """train_pack.py with a standard and a DBT member, 2 epochs."""
    import training_experiment
    snaps = tmp_path_factory.mktemp('packed') / 'snaps'
    saved, training_experiment.SNAPSHOT_DIR = training_experiment.SNAPSHOT_DIR, str(snaps)
    try:
        code = train_pack_main('--member', 'seed=0', 'cf_loss.call=ClassificationOnlyLoss',
                               'snapshot_name=a', '--member', 'seed=1', 'snapshot_name=b', '--',
                               *SMOKE, f'data_dir={smoke_data}')
    finally:
        training_experiment.SNAPSHOT_DIR = saved
    return code, snaps


def test_every_member_is_a_sacred_run_of_its_own(packed_runs):
    from multiexit.runs.table import load_runs
    code, snaps = packed_runs
    assert code == 0
    table = load_runs(snaps).set_index('run')
    assert list(table.index) == ['1', '2']
    for run, (name, method, seed) in zip('12', [('a', 'standard', 0), ('b', 'DBT', 1)]):
        row = table.loc[run]
        assert (row['experiment'], row['status'], row['snapshot_name'], row['method'],
                row['seed'], row['named_configs'], row['final_epoch']) == (
            'train_cifar', 'COMPLETED', name, method, seed, 'smoke', 2)
        folder = snaps / run
        assert {'config.json', 'run.json', 'cout.txt', 'metrics.json', 'last.pt'} <= {
            p.name for p in folder.iterdir()} and len(list(folder.glob('ep*.pt'))) == 1
        cout = (folder / 'cout.txt').read_text()
        assert 'val top-1 of exit' in cout and f'{folder}: trained epochs 1 to 2;' in cout
        assert '[run ' not in cout  # the terminal's prefix is not in the run's own output
        result = read(folder / 'run.json')['result']
        assert result['epoch'] == 2 and result['val.acc1_avg'] == row['final.val.acc1_avg']
    assert 'temperature' in read(snaps / '2' / 'metrics.json')
    assert 'temperature' not in read(snaps / '1' / 'metrics.json')


def test_a_signal_stops_every_member_and_the_pack_resumes_exactly(
        packed_runs, smoke_data, snapshots, monkeypatch, capsys):
    real = interrupt_epoch_2(monkeypatch, 'SIGINT')
    code = train_pack_main('--member', 'seed=0', 'cf_loss.call=ClassificationOnlyLoss',
                           'snapshot_name=a', '--member', 'seed=1', 'snapshot_name=b', '--',
                           *SMOKE, f'data_dir={smoke_data}')
    err = capsys.readouterr().err
    assert code == 130
    lines = [line for line in err.splitlines() if 'interrupted: ' in line]
    for run, name in (('1', 'a'), ('2', 'b')):
        assert read(snapshots / run / 'run.json')['status'] == 'INTERRUPTED'
        folder = snapshots / run
        assert f'[run {run}: {name}] interrupted: SIGINT during epoch 2; {folder}/last.pt holds ' \
               f'epoch 1; resume with: python3 train_cifar.py with {folder}/config.json ' \
               f'parent_snapshot={folder}' in lines
    assert lines[-1] == (f'interrupted: to resume the pack: python3 train_pack.py --member '
                         f'{snapshots}/1/config.json parent_snapshot={snapshots}/1 --member '
                         f'{snapshots}/2/config.json parent_snapshot={snapshots}/2')
    monkeypatch.setattr(pack, 'train_epoch', real)
    assert train_pack_main(*lines[-1].split('python3 train_pack.py ')[1].split()) == 0
    _, uninterrupted = packed_runs
    for resumed, ref in (('3', '1'), ('4', '2')):
        mine, theirs = (checkpoint.load(snaps / r / 'last.pt')
                        for snaps, r in ((snapshots, resumed), (uninterrupted, ref)))
        assert same_state(mine['model'], theirs['model']) == []
        assert read(snapshots / resumed / 'config.json')['parent_snapshot'] == \
            f'{snapshots}/{int(resumed) - 2}'


def test_a_failing_member_is_failed_and_the_other_completes(smoke_data, snapshots, capsys):
    code = train_pack_main('--member', 'snapshot_name=ok', '--member', 'snapshot_name=bad',
                           'cf_loss.global_scale=1e38', '--', *SMOKE, 'n_epochs=1',
                           f'data_dir={smoke_data}')
    err = capsys.readouterr().err
    assert code == 2
    assert read(snapshots / '1' / 'run.json')['status'] == 'COMPLETED'
    failed = read(snapshots / '2' / 'run.json')
    assert failed['status'] == 'FAILED' and 'NonFiniteLossError' in failed['fail_trace'][-1]
    assert '[run 2: bad] error: non-finite training loss at epoch 1, step 1;' in err
    assert 'error: non-finite' in (snapshots / '2' / 'cout.txt').read_text()


def test_bad_input_of_one_member_is_one_line_and_leaves_no_run_folder(smoke_data, snapshots,
                                                                      capsys):
    with pytest.raises(SystemExit) as stopped:
        train_pack_main('--member', 'seed=0', '--member', 'seed=1', 'batch_size=500', '--',
                        *SMOKE, f'data_dir={smoke_data}')
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2
    assert err[-1] == ('error: batch_size=500 exceeds the 200 training examples: no full batch '
                       'per epoch')
    assert [p.name for p in snapshots.iterdir() if p.name != '_sources'] == []


def test_runs_with_other_numbers_of_steps_cannot_share_a_pack(fake_data, tmp_path):
    runs = [make_run(fake_data, tmp_path / '0', 0, MEMBERS[0][1]),
            make_run(fake_data, tmp_path / '1', 1, MEMBERS[1][1])]
    runs[1].train_loader.order.batch_size = 16
    with pytest.raises(ConfigError, match='the members of a pack need the same number of '
                                          'training examples and batches; they have 200 examples '
                                          'in 25 batches, 200 examples in 12 batches'):
        PackedRuns(runs)
    runs[1].train_loader.order.batch_size = 8
    group = PackedRuns(runs)
    runs[1].train_loader.order.batch_size = 16  # a loader that changes after the pack was built
    with pytest.raises(ConfigError, match='200 examples in 25 batches, 200 examples in 12'):
        group.train_loader.set_epoch(1)
