"""CUDA-graph capture (multiexit.accel.cuda_graph) checked on the CPU: the training step and the
evaluation forward, captured and replayed by a stand-in for CUDA graphs (``RecordedGraphs``:
nothing runs at a capture, a replay runs the captured ops again on the same memory), compute
what their eager functions do, bit for bit; the warm-up, the static inputs, the re-capture at a
new learning rate, the shape checks and the failure policy. Only the capture itself needs a GPU
(tests/test_cuda.py)."""
import pytest
import torch
from recorded_graphs import RecordedGraphs, SyncsInForward
from helpers import TINY

from multiexit import losses, models
from multiexit.accel.cuda_graph import GraphedCall
from multiexit.data.cifar import DATASETS, DeviceLoader
from multiexit.evaluate.passes import GraphedForward, evaluate
from multiexit.train.step import GraphedTrainStep, TrainStep

NET = dict(TINY['MsdNet'], out_dim=10)
# maxprob below a fresh 10-class teacher's confidence: DBT raises T at every step
LOSS = dict(call='DistillationBasedLoss', n_exits=3, C=0.5, maxprob=0.02, global_scale=10 / 3)
SPEC = DATASETS['Cifar10']


def batches(n, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n * size, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n * size,), generator=g)
    return list(DeviceLoader(images, labels, size, SPEC.mean, SPEC.std, 'cpu'))


def training(graphs=None, warmup=2):
    """(model, loss, step): eager, or graphed on ``graphs``."""
    torch.manual_seed(0)
    model = models.build(NET)
    loss_fn = losses.build(LOSS)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4,
                          nesterov=True)
    args = (model, loss_fn, opt, 3, (1, 5), 'cpu')
    step = (TrainStep(*args, T=loss_fn.temperature) if graphs is None else
            GraphedTrainStep(*args, T=loss_fn.temperature, warmup=warmup, graphs=graphs))
    return model, loss_fn, step


def epochs(model, loss_fn, step, data, new_lr_after=None):
    """Each batch as one epoch (to read every step's loss); the lr set to a tenth after
    ``new_lr_after`` steps. Returns the per-step (losses, metrics, first_bad, T)."""
    out = []
    for i, (x, y) in enumerate(data):
        if i == new_lr_after:
            for group in step.optimizer.param_groups:
                group['lr'] /= 10
        step.start_epoch()
        step(x, y)
        out.append((*step.finish_epoch(), loss_fn.T))
    return out


def test_a_replayed_training_step_trains_as_the_eager_one_bit_for_bit():
    """2 eager warm-up steps, a capture, replays, a re-capture at a new lr, replays: the same
    losses, metrics, temperature and weights as the eager step, exactly."""
    data = batches(8)
    eager_model, eager_loss, eager = training()
    expected = epochs(eager_model, eager_loss, eager, data, new_lr_after=5)
    graphs = RecordedGraphs()
    model, loss_fn, step = training(graphs)
    got = epochs(model, loss_fn, step, data, new_lr_after=5)
    assert graphs.warm_ups == 2 and step.captures == 2 and not step.eager_only
    assert graphs.replays == 6  # every step after the warm-up
    assert graphs.pools == 2  # each capture in a pool of its own, the old graph dropped
    assert got == expected
    assert expected[-1][-1] > 1.05 ** 6  # T moved
    for a, b in zip(model.state_dict().values(), eager_model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_captured_step_copies_each_batch_into_its_static_inputs():
    """A replay reads the batch of its call, copied into the graph's inputs."""
    data = batches(5)
    _, _, step = training(RecordedGraphs(), warmup=1)
    step.start_epoch()
    for x, y in data:
        step(x, y)
    static_x, static_y = step.graph.static_inputs
    assert torch.equal(static_x, data[-1][0]) and torch.equal(static_y, data[-1][1])
    assert static_x is not data[-1][0]


def test_a_captured_step_refuses_another_shape():
    data = batches(3)
    _, _, step = training(RecordedGraphs(), warmup=1)
    step.start_epoch()
    for x, y in data[:2]:
        step(x, y)
    with pytest.raises(ValueError, match=r'the training step was captured for inputs of '
                                         r'\[\(8, 3, 32, 32\), \(8,\)\], got \[\(4, 3, 32, 32\)'):
        step(data[2][0][:4], data[2][1][:4])


def test_a_step_that_cannot_be_captured_warns_once_and_trains_eagerly(capfd):
    data = batches(5)
    eager_model, eager_loss, eager = training()
    eager.model = SyncsInForward(eager_model)
    expected = epochs(eager_model, eager_loss, eager, data)
    model, loss_fn, step = training(RecordedGraphs())
    step.model = SyncsInForward(model)
    assert epochs(model, loss_fn, step, data) == expected
    assert step.eager_only and step.captures == 0
    err = capfd.readouterr().err
    assert err.count('warning: CUDA graph capture') == 1
    assert ('warning: CUDA graph capture of the training step failed '
            '(aten._local_scalar_dense.default needs a host sync') in err
    assert 'training goes on eagerly (set cuda_graph=False to skip the attempt)' in err


def test_off_cuda_without_a_stand_in_the_call_is_the_function():
    calls = []
    graphed = GraphedCall(lambda x: calls.append(x) or x + 1, 'a sum', 'adding eagerly')
    assert torch.equal(graphed(torch.ones(2)), torch.full((2,), 2.0))
    assert len(calls) == 1 and graphed.captures == 0 and graphed.graphs is None
    with pytest.raises(ValueError, match='needs a CUDA device'):
        GraphedTrainStep(torch.nn.Linear(1, 1), torch.nn.Identity(), None, 1, (1,), 'cpu')


@pytest.mark.parametrize('amp', [False, True])
def test_the_graphed_evaluation_forward_evaluates_as_the_eager_one(amp):
    """Batches of 8 and a last one of 4 (eager: another shape): the metrics of the eager
    evaluation, exactly; the weights are read in place, so a later change shows."""
    torch.manual_seed(0)
    model = models.build(NET)
    data = batches(3) + [tuple(t[:4] for t in batches(1, seed=1)[0])]
    loader = type('Loader', (), dict(device=torch.device('cpu'), world_size=1,
                                     __iter__=lambda self: iter(data)))()
    graphs = RecordedGraphs()
    forward = GraphedForward(model, amp=amp, graphs=graphs)
    for _ in range(2):
        assert (evaluate(model, loader, 3, amp=amp, forward=forward)
                == evaluate(model, loader, 3, amp=amp))
        with torch.no_grad():
            model.exits[0][-1].bias.add_(1.0)  # trains on: the graph reads the new weights
    assert forward.captures == 1 and graphs.warm_ups == 1 and graphs.replays == 2 + 3
    with torch.inference_mode():
        out = forward(data[0][0])
        assert forward(data[1][0]) is out  # the static outputs of the graph
