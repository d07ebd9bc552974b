"""SDN's weighted cross-entropy against the authors' own sdn_train (Kaya et al.;
tests/data/sdn_reference.json holds its numbers and recipe), its schedule over a run's epochs,
and an SDN run that resumes exactly, in this process on generated data."""
import json

import pytest
import torch

from helpers import (DATA, SMALL_NET, TINY, assert_resumed_exactly, run_in_process,
                     train_epochs_of_steps)
from multiexit import losses, models
from multiexit.config import TrainConfig
from multiexit.errors import ConfigError, TrainingInterrupted
from multiexit.losses.sdn import default_final_weights, ramp
from multiexit.train import solo
from multiexit.train.api import train_alone
from multiexit.train.run import Run
from multiexit.train.step import GraphedTrainStep, TrainStep
from recorded_graphs import RecordedGraphs
from tools.kernel_count import count_ops

REFERENCE = json.loads((DATA / 'sdn_reference.json').read_text())
AUTHORS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)  # their max_coeffs, model_funcs.py


def reference_batch(n_exits):
    """The recipe's inputs: n_exits x 16 examples x 10 classes of logits, and labels."""
    torch.manual_seed(0)
    logits = torch.randn(n_exits, 16, 10) * 3
    y = torch.randint(0, 10, (16,))
    assert y.tolist() == REFERENCE[f'exits{n_exits}_epochs10']['y']
    return [z.clone().requires_grad_() for z in logits.unbind()], y


CASES = [(case, epoch) for case in ('exits7_epochs100', 'exits7_epochs10', 'exits4_epochs10')
         for epoch in REFERENCE[case]['at']]


@pytest.mark.parametrize('case, epoch', CASES)
def test_loss_and_gradients_match_the_authors(case, epoch):
    """At the authors' 1-based epoch e of their ``epochs``, set_epoch(e - 1, epochs) gives their
    weights, loss and per-exit gradient norms; 4 exits take the first three of their weights,
    as their code does."""
    setting, expected = REFERENCE[case], REFERENCE[case]['at'][epoch]
    n_exits = len(expected['grad_norm'])
    loss_fn = losses.SdnWeightedLoss(n_exits, final_weights=None if n_exits == 7
                                     else AUTHORS[:n_exits - 1])
    loss_fn.set_epoch(int(epoch) - 1, setting['epochs'])
    assert loss_fn.weights.tolist() == torch.tensor([*expected['coeffs'], 1.0]).tolist()
    logits, y = reference_batch(n_exits)
    loss = loss_fn(logits, y)
    loss.backward()
    assert loss.item() == pytest.approx(expected['loss'], rel=1e-6)
    assert [z.grad.norm().item() for z in logits] == pytest.approx(expected['grad_norm'],
                                                                  rel=1e-5)


def test_the_schedule_is_the_authors_to_the_bit():
    """Every epoch of their 100: the float64 weights are theirs exactly (the final ones reached
    only in the last epochs), and their six ICs' final weights are the default for 7 exits."""
    assert default_final_weights(7) == AUTHORS
    every = REFERENCE['exits7_epochs100']['coeffs_every_epoch']
    assert [ramp(AUTHORS, e, 100) for e in range(100)] == every
    assert every[-1] == list(AUTHORS) and every[92][0] < AUTHORS[0] == every[93][0]


def test_default_final_weights_rise_in_equal_steps_to_the_authors_last():
    assert default_final_weights(11) == pytest.approx([0.09 * i for i in range(1, 11)])
    assert default_final_weights(3) == (0.45, 0.9) and default_final_weights(1) == ()


def test_ramp_epochs_sets_the_ramp_whatever_the_run_s_length():
    """ramp_epochs=10 in a run of 300 epochs: the authors' 10-epoch ramp, then the final
    weights."""
    loss_fn = losses.SdnWeightedLoss(7, ramp_epochs=10)
    for epoch, expected in REFERENCE['exits7_epochs10']['at'].items():
        loss_fn.set_epoch(int(epoch) - 1, 300)
        assert loss_fn.weights.tolist() == torch.tensor([*expected['coeffs'], 1.0]).tolist()
    loss_fn.set_epoch(200, 300)
    assert loss_fn.weights.tolist() == torch.tensor([*AUTHORS, 1.0]).tolist()


def test_unlabelled_examples_add_nothing():
    logits, y = reference_batch(7)
    loss_fn = losses.SdnWeightedLoss(7)
    assert loss_fn(logits, torch.full_like(y, losses.IGNORE)).item() == 0
    half = y.clone()
    half[8:] = losses.IGNORE
    labelled = loss_fn([z[:8] for z in logits], y[:8])
    assert loss_fn(logits, half).item() == pytest.approx(labelled.item(), rel=1e-6)


def test_a_loss_runs_its_ops_once_for_all_exits():
    def ops(n):
        logits = [z.requires_grad_() for z in torch.randn(n, 8, 100).unbind()]
        y = torch.randint(0, 100, (8,))
        return count_ops(lambda: losses.SdnWeightedLoss(n)(logits, y).backward())[0]
    assert ops(11) == ops(3)


@pytest.mark.parametrize('weights', [[0.5], [0.1, -0.2], [0.1, float('nan')], [0.1, True], 0.5])
def test_final_weights_are_one_per_early_exit(weights):
    with pytest.raises(ConfigError, match=r'^final_weights=.*: expected 2 numbers >= 0, one per '
                                          r'early exit, or None$'):
        losses.SdnWeightedLoss(3, final_weights=weights)


def test_build():
    loss = losses.build(dict(call='SdnWeightedLoss', n_exits=4, final_weights=[0.1, 0.2, 0.3],
                             ramp_epochs=5, C=0.5))
    assert isinstance(loss, losses.SdnWeightedLoss) and loss.final_weights == (0.1, 0.2, 0.3)
    assert loss.ramp_epochs == 5 and loss.state_dict() == {}  # the weights follow the epoch


def graphed_epochs(loss_fn, graphs=None, n_epochs=4):
    """``n_epochs`` epochs of 3 steps of the tiny MsdNet with ``loss_fn``, eager or captured on
    ``graphs`` (``RecordedGraphs``) after one eager step, setting the loss's epoch before each:
    every step's loss and the weights at the end."""
    torch.manual_seed(0)
    model = models.build(dict(TINY['MsdNet'], out_dim=10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    args = (model, loss_fn, opt, 3, (1,), 'cpu')
    step = TrainStep(*args) if graphs is None else GraphedTrainStep(*args, warmup=1,
                                                                    graphs=graphs)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
            for _ in range(3)]
    return train_epochs_of_steps(step, loss_fn, data, n_epochs), model.state_dict()


def test_a_captured_step_reads_each_epoch_s_weights():
    """A CUDA graph (its CPU stand-in) replays the step's ops on the weights' buffer where it
    lies: each epoch trains with its own weights, as the eager step does, to the bit."""
    graphs = RecordedGraphs()
    got, weights = graphed_epochs(losses.SdnWeightedLoss(3), graphs)
    expected, eager_weights = graphed_epochs(losses.SdnWeightedLoss(3))
    assert graphs.replays == 11 and got == expected
    assert all(torch.equal(weights[k], v) for k, v in eager_weights.items())


# --- a run: the weights of each epoch, and a resume ---

SDN = dict(call='SdnWeightedLoss', acc_tops=[1])


def make_run(data_dir, run_dir, n_epochs=3, parent=None):
    """An SDN run of the small MsdNet (3 exits) on 4 images per class, batch 8: 5 steps an
    epoch."""
    run_dir.mkdir(parents=True, exist_ok=True)
    trn = dict(call='Cifar10', n_per_class=5, nval_per_class=1, augment=True, seed=0)
    cfg = TrainConfig(cf_net=dict(SMALL_NET, out_dim=None), cf_loss=SDN, cf_trn=trn,
                      cf_val=dict(trn, augment=False), cf_opt=dict(call='SGD', lr=0.05,
                                                                   momentum=0.9),
                      cf_scheduler=dict(call='MultiStepLR', milestones=[2], gamma=0.5),
                      batch_size=8, val_batch_size=10, n_epochs=n_epochs, data_dir=data_dir,
                      gpu=-1, seed=1, parent_snapshot=parent)
    return Run(cfg, run_dir, log=lambda *a: None)


def test_each_epoch_trains_with_its_weights(fake_data, tmp_path):
    run, weights = make_run(fake_data, tmp_path), []
    run.loss_fn.register_forward_hook(lambda m, args, out: weights.append(m.weights.tolist()))
    train_alone(run)
    expected = [torch.tensor([*ramp((0.45, 0.9), e, 3), 1.0]).tolist() for e in range(3)]
    assert weights == [w for w in expected for _ in range(5)]


def test_an_interrupted_run_resumes_exactly(fake_data, tmp_path, monkeypatch):
    """Stopped after epoch 2 of 3 and resumed, it ends where the uninterrupted run ends, to the
    bit: the resumed epoch trains with epoch 3's weights."""
    straight = make_run(fake_data, tmp_path / 'straight')
    train_alone(straight)
    real, calls = solo.train_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt('SIGINT')
        return real(*args, **kwargs)
    monkeypatch.setattr(solo, 'train_epoch', interrupted)
    first = make_run(fake_data, tmp_path / 'first')
    with pytest.raises(TrainingInterrupted):
        train_alone(first)
    assert first.epoch == 2
    monkeypatch.setattr(solo, 'train_epoch', real)
    resumed = make_run(fake_data, tmp_path / 'resumed', parent=str(first.run_dir))
    assert resumed.epoch == 2
    train_alone(resumed)
    assert_resumed_exactly(resumed.run_dir / 'last.pt', straight.run_dir / 'last.pt', 3)


def test_trains_from_the_command_line(tmp_path):
    ran = run_in_process('train_cifar.py', 'with', 'smoke', 'cf_loss.call=SdnWeightedLoss',
                         'cf_loss.final_weights=[0.2,0.4]', 'cf_loss.ramp_epochs=4',
                         'cf_trn.n_per_class=3', 'cf_trn.nval_per_class=1', 'n_epochs=2',
                         cwd=tmp_path)
    config = json.loads((tmp_path / 'snapshots' / '1' / 'config.json').read_text())
    assert config['cf_loss']['call'] == 'SdnWeightedLoss' and ran.returncode == 0
    assert torch.load(tmp_path / 'snapshots' / '1' / 'last.pt', weights_only=True)['epoch'] == 2
    bad = run_in_process('train_cifar.py', 'with', 'smoke', 'cf_loss.call=SdnWeightedLoss',
                         'cf_loss.final_weights=[0.2]', cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        'error: cf_loss for SdnWeightedLoss: final_weights=[0.2]: expected 2 numbers >= 0, one '
        'per early exit, or None')
