import pytest
import torch
import torch.nn.functional as F

from helpers import SMALL_NET
from multiexit import losses, models
from multiexit.metrics import MultiExitAccuracy, metric_names
from multiexit.train.step import TrainStep


def brute_force(logits_list, y, tops, T):
    """Per-example loops, following the metric definitions literally."""
    lab = [i for i in range(len(y)) if y[i] != -100]
    out = {}
    probs = [F.softmax(z, 1) for z in logits_list]
    for t in tops:
        clf = [sum(int(y[i] in z[i].topk(t).indices) for i in lab) / len(lab) for z in logits_list]
        out[f'acc{t}_avg'] = sum(clf) / len(clf)
        for k, a in enumerate(clf):
            out[f'acc{t}_clf{k}'] = a
        for k in range(1, len(logits_list)):
            ens = sum(probs[:k + 1]) / (k + 1)
            out[f'acc{t}_ens{k}'] = sum(int(y[i] in ens[i].topk(t).indices) for i in lab) / len(lab)
    out['avg_maxprob'] = probs[-1].max(1).values.mean().item()
    out['adj_maxprob'] = F.softmax(logits_list[-1] / T, 1).max(1).values.mean().item()
    return out


def test_names_follow_the_original():
    assert metric_names(3, (1, 5), with_temperature=True) == [
        'acc1_avg', 'acc5_avg', 'acc1_clf0', 'acc1_clf1', 'acc1_clf2', 'acc1_ens1', 'acc1_ens2',
        'acc5_clf0', 'acc5_clf1', 'acc5_clf2', 'acc5_ens1', 'acc5_ens2', 'avg_maxprob',
        'adj_maxprob']


def test_values_over_several_batches_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(50, 10, generator=g) * 2 for _ in range(4)]
    y = torch.randint(0, 10, (50,), generator=g)
    y[[3, 17, 40]] = -100  # unlabelled: skipped by accuracies, counted by probabilities
    T = torch.tensor(3.0)
    m = MultiExitAccuracy(4, (1, 5))
    for sl in (slice(0, 20), slice(20, 45), slice(45, 50)):
        m.update([z[sl] for z in logits], y[sl], T)
    [got] = m.compute()
    expected = brute_force(logits, y, (1, 5), 3.0)
    assert list(got) == metric_names(4, (1, 5), True)
    accuracies = [k for k in got if k.startswith('acc')]
    assert {k: got[k] for k in accuracies} == pytest.approx({k: expected[k] for k in accuracies},
                                                            abs=1e-12)
    assert got['avg_maxprob'] == pytest.approx(expected['avg_maxprob'], rel=1e-6)
    assert got['adj_maxprob'] == pytest.approx(expected['adj_maxprob'], rel=1e-6)
    assert 0 < got['acc1_avg'] < got['acc5_avg'] < 1


def test_reset_and_no_temperature():
    m = MultiExitAccuracy(2, (1,))
    m.update([torch.eye(3), torch.eye(3)], torch.tensor([0, 1, 2]))
    [got] = m.compute()
    assert got['acc1_clf1'] == 1.0 and 'adj_maxprob' not in got
    m.reset()
    m.update([torch.eye(3), torch.eye(3)], torch.tensor([1, 2, 0]))
    assert m.compute()[0]['acc1_avg'] == 0.0


def test_training_step_reports_adj_maxprob_at_the_temperature_it_trained_with():
    """The step's adj_maxprob is the teacher's confidence at the T its loss used (what DBT
    compares to maxprob), not at the T that the loss then raised."""
    torch.manual_seed(0)
    model = models.build(dict(SMALL_NET, out_dim=10))
    loss = losses.build(dict(call='DistillationBasedLoss', n_exits=3, C=0.5, maxprob=0.0))
    step = TrainStep(model, loss, torch.optim.SGD(model.parameters(), lr=0.0), 3, (1,), 'cpu',
                     T=loss.temperature)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    step.start_epoch()
    with torch.no_grad():
        teacher = model(x)[-1]  # training mode, as in the step: the same logits
    step(x, y)
    _, [metrics], _ = step.finish_epoch()
    assert loss.T == pytest.approx(1.05)  # raised once, after the step's metrics
    expected = F.softmax(teacher, dim=1).amax(dim=1).mean().item()
    assert metrics['adj_maxprob'] == pytest.approx(expected, rel=1e-6)
    assert metrics['adj_maxprob'] != pytest.approx(
        F.softmax(teacher / 1.05, dim=1).amax(dim=1).mean().item(), rel=1e-6)
