"""Boosted training (``cf_net.boost_reweight``, multiexit.models.boosted) against the authors' own
code (Yu et al., AAAI 2023; tests/data/boosted_reference.json holds its numbers and recipe), and
the boosted rule wherever a model runs: evaluation, real early exit in every mode, costs, packs,
the graphed training step, and the scripts (train, resume, eval)."""
import json
import math

import pytest
import torch
from torch import nn
from recorded_graphs import RecordedGraphs

from experiments import cells, grid
from helpers import DATA, TINY, run_in_process
from multiexit import data, losses, models
from multiexit.checks import ignored_keys
from multiexit.config import TrainConfig
from multiexit.early_exit.latency import LatencyExit
from multiexit.early_exit.rule import confidences, exit_indices
from multiexit.early_exit.shrinking import early_exit_predict
from multiexit.early_exit.streaming import StreamingExit
from multiexit.early_exit.thresholds import fit_thresholds, geometric_fractions, outcome
from multiexit.errors import ConfigError
from multiexit.evaluate.flops import exit_costs
from multiexit.evaluate.passes import exit_logits, load_model
from multiexit.models.base import MultiExitNet
from multiexit.models.boosted import boosted_class, exit_weights
from multiexit.models.fused import fuse
from multiexit.runs import find
from multiexit.runs.table import method_label
from multiexit.train.api import train_alone
from multiexit.train.loop import fit
from multiexit.train.pack import PackedRuns
from multiexit.train.run import Run
from multiexit.train.step import GraphedTrainStep, TrainStep

REFERENCE = json.loads((DATA / 'boosted_reference.json').read_text())
REWEIGHTS = {'w0.5': 0.5, 'linspace0.2,1.0': [0.2, 1.0]}  # the recipe's --ensemble_reweight


class Seeded(MultiExitNet):
    """The recipe's stub backbone: exit k returns the seeded logits o_k (a parameter), whatever
    the image."""

    def __init__(self, outs):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Identity() for _ in outs)
        self.exits = nn.ModuleList(_Fixed(o) for o in outs)


class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, h):
        return self.logits * 1.0


def reference_net(name):
    """(the recipe's stub with boosted exits at ``name``'s reweight, labels)."""
    torch.manual_seed(0)
    outs = torch.randn(4, 16, 10) * 3
    y = torch.randint(0, 10, (16,))
    assert outs.sum().item() == REFERENCE['outs_sum'] and y.tolist() == REFERENCE['y']
    net = boosted_class(Seeded)(outs)
    net.boost_weights = exit_weights(REWEIGHTS[name], 4)
    return net, y


@pytest.mark.parametrize('name', list(REWEIGHTS))
def test_weights_logits_loss_and_gradients_match_the_authors(name):
    expected = REFERENCE[name]
    net, y = reference_net(name)
    assert list(net.boost_weights) == expected['reweight']  # args.py's parsing, numpy's linspace
    x = torch.zeros(16, 3, 32, 32)
    with torch.no_grad():
        boosted = torch.stack(net.eval()(x))
    assert torch.equal(boosted, torch.tensor(expected['boosted_logits']))
    loss = losses.ClassificationOnlyLoss(4)(net.train()(x), y)
    loss.backward()
    assert loss.item() == pytest.approx(expected['loss'], rel=1e-6)
    grads = [head.logits.grad.norm().item() for head in net.exits]
    assert grads == pytest.approx(expected['grad_norm'], rel=1e-5)


@pytest.mark.parametrize('name', list(REWEIGHTS))
def test_early_exit_thresholds_are_the_authors_on_the_boosted_logits(name):
    """adaptive_inference.Tester's thresholds and accuracy, on softmax of the boosted logits."""
    net, y = reference_net(name)
    with torch.no_grad():
        conf, pred = confidences(torch.stack(net.eval()(torch.zeros(16, 3, 32, 32))))
    for q, authors in REFERENCE[name]['thresholds'].items():
        thresholds = fit_thresholds(conf, geometric_fractions(4, float(q)))
        assert thresholds[:-1].tolist() == authors['thresholds'][:-1]
        acc, _, _ = outcome(conf, pred, y, thresholds, [1, 2, 3, 4])
        assert acc * 100 == pytest.approx(authors['acc'])


def test_the_training_rule_is_the_evaluation_rule_for_one_weight_but_not_for_a_linspace():
    for name, same in (('w0.5', True), ('linspace0.2,1.0', False)):
        net, _ = reference_net(name)
        x = torch.zeros(16, 3, 32, 32)
        with torch.no_grad():
            train, evaluation = torch.stack(net.train()(x)), torch.stack(net.eval()(x))
        assert torch.equal(train[0], evaluation[0])
        assert torch.allclose(train, evaluation) == same


def test_each_exit_learns_only_through_its_own_logits():
    net, y = reference_net('w0.5')
    logits = net.train()(torch.zeros(16, 3, 32, 32))
    losses.ClassificationOnlyLoss(4)(logits[2:3], y).backward()
    assert [head.logits.grad is not None and bool(head.logits.grad.any())
            for head in net.exits] == [False, False, True, False]


def test_weights_zero_is_plain_training():
    torch.manual_seed(0)
    plain = models.build(TINY['ResNet'])
    boosted = models.build(dict(TINY['ResNet'], boost_reweight=0))
    boosted.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    for mode in (True, False):
        for a, b in zip(plain.train(mode)(x), boosted.train(mode)(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize('reweight, n_exits, expected', [
    (0.5, 3, (0.5, 0.5, 0.5)), ([0.5], 2, (0.5, 0.5)), ([0.0, 1.0], 3, (0.0, 0.5, 1.0)),
    ([0.2, 0.4], 2, (0.2, 0.4)), ([0.3, 0.9], 1, (0.3,)), ([1, 2, 3], 3, (1.0, 2.0, 3.0))])
def test_reweight_is_parsed_as_the_authors_parse_it(reweight, n_exits, expected):
    assert exit_weights(reweight, n_exits) == expected


def test_bad_reweights_are_one_clear_error():
    with pytest.raises(ConfigError, match=r'3 weights for 4 exits; give one, two'):
        models.build(dict(TINY['MsdNet'], n_exits=4, boost_reweight=[0.1, 0.2, 0.3]))
    for bad in (-0.5, 'half', [], [0.5, math.nan]):
        with pytest.raises(ConfigError, match='cf_net.boost_reweight='):
            TrainConfig.check({'cf_net': dict(TINY['MsdNet'], boost_reweight=bad)})
    TrainConfig.check({'cf_net': dict(TINY['ResNet'], boost_reweight=[0.2, 1.0])})
    assert ignored_keys('cf_net', dict(TINY['ResNet'], boost_reweight=0.5),
                        ['boost_reweight']) == []


@pytest.fixture(scope='module', params=sorted(models.REGISTRY))
def tiny(request):
    """(boosted model in eval mode, thresholds that use every exit, 36 images), for every
    registered model, with a linspace of weights (the two rules differ there)."""
    torch.manual_seed(0)
    model = models.build(dict(TINY[request.param], boost_reweight=[0.3, 1.0])).eval()
    x = torch.randn(36, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        conf, _ = confidences(torch.stack(model(x)))
    return model, fit_thresholds(conf, geometric_fractions(len(model.exits), 1.0)), x


def simulated(model, x, thresholds):
    """(predictions, exits) of the exit rule on the boosted full forward pass, in batches of 4."""
    with torch.inference_mode():
        logits = torch.cat([torch.stack(model(b)) for b in x.split(4)], dim=1)
    conf, pred = confidences(logits)
    exits = exit_indices(conf, thresholds)
    return pred.gather(0, exits[None])[0], exits


RUNNERS = {
    'shrinking': lambda m, x, t: early_exit_predict(m, x, t),
    'streaming': lambda m, x, t: StreamingExit(m, 4, wave_batches=2, tail_sizes=[]).run(x, t)[:2],
    'latency': lambda m, x, t: LatencyExit(m, 4).run(x, t)[:2],
    'streaming, graphed': lambda m, x, t: StreamingExit(m, 4, wave_batches=2, tail_sizes=[],
                                                        graphs=RecordedGraphs()).run(x, t)[:2],
    'latency, graphed': lambda m, x, t: LatencyExit(m, 4, graphs=RecordedGraphs()).run(x, t)[:2],
}


@pytest.mark.parametrize('mode', sorted(RUNNERS))
def test_real_early_exit_predicts_with_the_running_ensemble(tiny, mode):
    """Every image leaves where the boosted full forward pass's confidence says, predicting its
    boosted logits there, which are not the exit's own."""
    model, thresholds, x = tiny
    pred, exits = simulated(model, x, thresholds)
    assert exits.unique().numel() == len(model.exits)
    got_pred, got_exits = RUNNERS[mode](model, x, thresholds)
    assert torch.equal(got_exits, exits) and torch.equal(got_pred, pred)
    with torch.inference_mode():
        own = [head(model.exit_features(h)) for head, h in zip(model.exits, _block_outputs(
            model, x))]
        assert not torch.allclose(torch.stack(own[1:]), torch.stack(model(x)[1:]))


def _block_outputs(model, x):
    outs = []
    for block in model.blocks:
        x = block(x)
        outs.append(x)
    return outs


def test_a_boosted_exit_costs_every_head_up_to_it():
    torch.manual_seed(0)
    plain = exit_costs(models.build(TINY['MsdNet']))
    model = models.build(dict(TINY['MsdNet'], boost_reweight=0.5))
    boosted = exit_costs(model)
    for p, b in zip(plain, boosted):
        assert b['macs'] == b['macs_all_heads'] == p['macs_all_heads']
    assert boosted[0]['params'] == plain[0]['params']
    assert boosted[-1]['params'] == sum(p.numel() for p in model.parameters()) > plain[-1]['params']


def test_a_pack_of_boosted_members_computes_each_members_logits():
    torch.manual_seed(0)
    members = [models.build(dict(TINY['MsdNet'], boost_reweight=[0.2, 1.0])) for _ in range(2)]
    fused = fuse(members)
    x = torch.randn(2, 3, 32, 32)
    for mode in (True, False):
        packed = fused.train(mode)(torch.cat([x, x], dim=1))
        for k, member in enumerate(members):
            for a, b in zip(packed, member.train(mode)(x)):
                torch.testing.assert_close(a[k], b, rtol=1e-5, atol=1e-6)


def test_a_graphed_training_step_trains_a_boosted_model_as_the_eager_one():
    def training(graphs):
        torch.manual_seed(0)
        model = models.build(dict(TINY['MsdNet'], boost_reweight=[0.2, 1.0]))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        args = (model, losses.ClassificationOnlyLoss(3), opt, 3, (1,), 'cpu')
        return model, (TrainStep(*args) if graphs is None
                       else GraphedTrainStep(*args, warmup=1, graphs=graphs))

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
            for _ in range(3)]
    results = []
    for graphs in (None, RecordedGraphs()):
        model, step = training(graphs)
        step.start_epoch()
        for x, y in data:
            step(x, y)
        results.append((step.finish_epoch(), model.state_dict()))
    (eager, eager_state), (graphed, graphed_state) = results
    assert eager == graphed
    for name, value in eager_state.items():
        assert torch.equal(value, graphed_state[name]), name


BOOSTED = ['smoke', 'cf_loss.call=ClassificationOnlyLoss', 'cf_net.boost_reweight=0.5',
           'cf_trn.n_per_class=8', 'cf_trn.nval_per_class=2', 'cf_scheduler.milestones=[1]']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Runs 1: 2 epochs; 2: 1 epoch; 3: run 2 resumed to 2 epochs; 4: eval.py of run 1."""
    work = tmp_path_factory.mktemp('boosted')
    run = lambda script, *a: run_in_process(script, *a, cwd=work)
    procs = [run('train_cifar.py', 'with', *BOOSTED, 'n_epochs=2', 'seed=1', 'snapshot_name=b'),
             run('train_cifar.py', 'with', *BOOSTED, 'n_epochs=1', 'seed=1'),
             run('train_cifar.py', 'with', *BOOSTED, 'n_epochs=2', 'parent_snapshot=2'),
             run('eval.py', 'with', 'snapshot_name=b')]
    return work / 'snapshots', procs


def test_a_boosted_run_trains_from_the_command_line_and_resumes_exactly(trained):
    snaps, _ = trained
    config = json.loads((snaps / '1' / 'config.json').read_text())
    assert config['cf_net']['boost_reweight'] == 0.5
    full = torch.load(snaps / '1' / 'last.pt', weights_only=True)
    resumed = torch.load(snaps / '3' / 'last.pt', weights_only=True)
    assert full['epoch'] == resumed['epoch'] == 2
    for name, value in full['model'].items():
        assert torch.equal(value, resumed['model'][name]), name
    for a, b in zip(full['optimizer']['state'].values(), resumed['optimizer']['state'].values()):
        assert torch.equal(a['momentum_buffer'], b['momentum_buffer'])


def test_eval_py_evaluates_the_boosted_predictions(trained):
    """eval.py's per-exit accuracy and cost are those of the boosted logits of the snapshot it
    tested (run 1's best), on the training run's test split."""
    snaps, _ = trained
    result = json.loads((snaps / '4' / 'run.json').read_text())['result']
    config = json.loads((snaps / '1' / 'config.json').read_text())
    model, _, _ = load_model(find.pick_checkpoint(snaps / '1', 'best'), 'cpu')
    assert type(model).__name__ == 'BoostedMsdNet' and model.boost_weights == (0.5,) * 3
    test = data.build(config['cf_trn'], 'test').loader(
        'test', snaps.parent / config['data_dir'], 250, torch.device('cpu'))
    logits, labels = exit_logits(model, test)
    # the authors' F_i = o_i + 0.5 F_{i-1}, from the exits' own logits
    with torch.inference_mode():
        x = torch.cat([x for x, _ in test])
        own = [head(model.exit_features(h)) for head, h in zip(model.exits,
                                                                _block_outputs(model, x))]
    expected = [own[0]]
    for o in own[1:]:
        expected.append(o + expected[-1] * 0.5)
    torch.testing.assert_close(logits, torch.stack(expected))
    accuracy = (logits.argmax(-1) == labels).double().mean(dim=1)
    assert [result[f'acc1_clf{k}'] for k in range(3)] == pytest.approx(accuracy.tolist())
    assert [result[f'macs_clf{k}'] for k in range(3)] == [
        c['macs_all_heads'] for c in exit_costs(model)]


def test_boosted_members_train_in_a_pack_as_alone(fake_data, tmp_path):
    """Two boosted runs (standard and DBT losses, two seeds) as one fused network: each member's
    weights after an epoch are its solo run's, within 1e-3 relative (oneDNN off, as in
    tests/test_pack.py: the fused grouped convolutions then round as the solo ones)."""
    net = dict(TINY['MsdNet'], out_dim=None, boost_reweight=[0.2, 1.0])
    trn = dict(call='Cifar10', n_per_class=6, nval_per_class=2, augment=True)

    def make(name, seed, loss):
        (tmp_path / name).mkdir()
        cfg = TrainConfig(cf_net=net, cf_loss=dict(loss, acc_tops=[1]),
                          cf_trn=dict(trn, seed=seed), cf_val=dict(trn, seed=seed, augment=False),
                          cf_opt=dict(call='SGD', lr=0.05, momentum=0.9),
                          cf_scheduler=dict(call='MultiStepLR', milestones=[1]), batch_size=8,
                          val_batch_size=20, n_epochs=1, data_dir=fake_data, gpu=-1, seed=seed)
        return Run(cfg, tmp_path / name, log=lambda *a: None)

    members = [(0, dict(call='ClassificationOnlyLoss')),
               (1, dict(call='DistillationBasedLoss', C=0.5, maxprob=0.13, global_scale=10 / 3))]
    saved, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        solo = [make(f'solo{seed}', seed, loss) for seed, loss in members]
        for run in solo:
            train_alone(run)
        packed = [make(f'member{seed}', seed, loss) for seed, loss in members]
        assert fit(PackedRuns(packed))[0] and [r.error for r in packed] == [None, None]
    finally:
        torch.backends.mkldnn.enabled = saved
    for alone, member in zip(solo, packed):
        assert type(member.model).__name__ == 'BoostedMsdNet'
        mine = member.model.state_dict()
        for name, value in alone.model.state_dict().items():
            if value.is_floating_point():
                assert float((mine[name] - value).norm() / value.norm().clamp(min=1e-12)) < 1e-3


def test_the_grid_trains_boosted_cells_in_packs_of_their_own():
    quick = grid.PRESETS['cifar100', True]
    planned = grid.plan(quick, ['standard', 'boosted'], quick.sizes, (0, 1), 1)
    boosted = [c for c in planned if c.method == 'boosted']
    assert all({'cf_loss.call=ClassificationOnlyLoss', 'cf_net.boost_reweight=0.5'}
               <= set(c.settings) for c in boosted)
    for unit in cells.packed(planned, None):
        assert len({c.method for c in unit.cells}) == 1 and len(unit.cells) == 2


def test_the_runs_table_names_boosted_runs():
    assert method_label({'cf_loss.call': 'ClassificationOnlyLoss',
                         'cf_net.boost_reweight': 0.5}) == 'standard, boosted'
    assert method_label({'cf_loss.call': 'ClassificationOnlyLoss'}) == 'standard'
