"""Early-exit inference (shrinking batch, streaming, latency) against the budgeted decisions on
the full forward pass."""
import contextlib
import json
import math
import shlex
import subprocess
import sys

import pytest
import torch
from recorded_graphs import RecordedGraphs, SyncsInForward

from helpers import ROOT, TINY
from multiexit import models
from multiexit.early_exit.rule import confidences, exit_indices
from multiexit.early_exit.thresholds import fit_thresholds, geometric_fractions
from multiexit.early_exit.latency import LatencyExit
from multiexit.early_exit.shrinking import early_exit_predict
from multiexit.early_exit.streaming import StreamingExit

# A small MsdNet whose later blocks prune the finer scales (None in the block outputs).
SMALL_NET = dict(call='MsdNet', n_exits=4, nlayers_to_exit=2, nlayers_between_exits=1,
                 nplanes_mulv=[2, 4, 8], exit_width=16, btneck_widths=[2, 2, 2])


@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    return models.build(SMALL_NET)


def images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def block_batch_sizes(model):
    """Records, per block, the batch size it ran on and whether its output had a pruned scale."""
    seen = {k: [] for k in range(len(model.blocks))}

    def hook(k):
        def record(module, inputs, output):
            h = inputs[0]
            h = h if torch.is_tensor(h) else next(t for t in h if t is not None)
            seen[k].append((len(h), any(t is None for t in output)))
        return record

    handles = [b.register_forward_hook(hook(k)) for k, b in enumerate(model.blocks)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize('q', [0.5, 1.0, 2.0])
def test_early_exit_equals_budgeted_decisions_and_skips_computation(net, q):
    n_exits = len(net.exits)
    net.eval()
    with torch.inference_mode():
        val_conf, _ = confidences(torch.stack(net(images(64, seed=1))))
        x = images(48, seed=2)
        logits = torch.stack(net(x))
    thresholds = fit_thresholds(val_conf, geometric_fractions(n_exits, q))
    conf, _ = confidences(logits)
    expected = exit_indices(conf, thresholds)
    assert expected.unique().numel() == n_exits  # every exit is used: the check means something

    net.train()  # early_exit_predict must run in eval mode, and restore the mode
    with block_batch_sizes(net) as seen:
        pred, exits = early_exit_predict(net, x, thresholds)
    assert net.training
    assert torch.equal(exits, expected)
    assert torch.equal(pred, logits.argmax(-1).gather(0, exits[None])[0])
    for k in range(n_exits):  # block k ran once, on the samples that had not left yet
        assert [size for size, _ in seen[k]] == [int((exits >= k).sum())]
    assert any(pruned for k in seen for _, pruned in seen[k])  # the None path was exercised


@pytest.mark.parametrize('k', [0, 1, 2])
def test_a_confidence_equal_to_its_threshold_leaves(net, k):
    """Exit k's threshold is one sample's confidence there, exactly: the earlier exits let
    nobody leave, so exit k sees the whole batch, as in the full forward pass."""
    x = images(16, seed=4)
    with torch.inference_mode():
        conf, _ = confidences(torch.stack(net.eval()(x)))
    n_exits = len(net.exits)
    tied = conf[k].argsort()[len(x) // 2]  # a median sample: some above it leave, some below stay
    thresholds = [math.inf] * n_exits
    thresholds[k], thresholds[-1] = conf[k, tied].item(), -math.inf
    expected = exit_indices(conf, thresholds)
    assert expected[tied] == k and (expected == n_exits - 1).any()
    _, exits = early_exit_predict(net, x, thresholds)
    assert torch.equal(exits, expected)


def test_all_leave_at_the_first_exit(net):
    x = images(8, seed=3)
    with block_batch_sizes(net) as seen:
        pred, exits = early_exit_predict(net, x, [-math.inf] * len(net.exits))
    assert exits.tolist() == [0] * 8
    assert all(not seen[k] for k in range(1, len(net.blocks)))  # nothing computed after exit 0
    with torch.inference_mode():
        assert torch.equal(pred, net.eval()(x)[0].argmax(-1))


def fitted(model, q, seed=1):
    """Thresholds for exit shares ∝ q^k, fitted on the confidences of 48 other images."""
    with torch.inference_mode():
        conf, _ = confidences(torch.stack(model.eval()(images(48, seed))))
    return fit_thresholds(conf, geometric_fractions(len(model.exits), q))


def simulated(model, x, thresholds, batch_size):
    """(predictions, exits, confidences) that the budgeted evaluation decides on the full forward
    pass, run in batches of ``batch_size``."""
    with torch.inference_mode():
        logits = torch.cat([torch.stack(model.eval()(b)) for b in x.split(batch_size)], dim=1)
    conf, pred = confidences(logits)
    exits = exit_indices(conf, thresholds)
    at_exit = lambda t: t.gather(0, exits[None])[0]
    return at_exit(pred), exits, at_exit(conf)


@pytest.fixture(scope='module', params=sorted(models.REGISTRY))
def tiny(request):
    """(model in eval mode, thresholds, 36 images) for every registered model."""
    torch.manual_seed(0)
    model = models.build(TINY[request.param]).eval()
    return model, fitted(model, 1.0), images(36, seed=2)


RUNNERS = {
    'streaming': lambda m, **kw: StreamingExit(m, 4, wave_batches=2, **kw),
    'streaming, tails padded': lambda m, **kw: StreamingExit(m, 4, wave_batches=2, tail_sizes=[],
                                                             **kw),
    'latency': lambda m, **kw: LatencyExit(m, 4, **kw),
}


@pytest.mark.parametrize('mode', sorted(RUNNERS))
def test_every_mode_decides_as_the_simulated_exit(tiny, mode):
    """Predictions, exits and confidences are those of the budgeted decisions on the full forward
    pass in batches of 4. Where every image is computed in a batch of 4 (tails padded, latency)
    they are the same bits; a tail run at its own size may round the heads' matrix products
    otherwise in the last bit (the CPU BLAS blocks by batch size)."""
    model, thresholds, x = tiny
    pred, exits, conf = simulated(model, x, thresholds, 4)
    assert exits.unique().numel() == len(model.exits)  # every exit is used
    runner = RUNNERS[mode](model)
    model.train()  # the runner computes in eval mode and restores the mode
    try:
        got_pred, got_exits, got_conf = runner.run(x, thresholds)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(got_exits, exits) and torch.equal(got_pred, pred)
    if mode == 'streaming':
        torch.testing.assert_close(got_conf, conf, rtol=1e-6, atol=0)
    else:
        assert torch.equal(got_conf, conf)


@pytest.mark.parametrize('tail_sizes', [None, [2]])
def test_streaming_runs_every_block_on_full_batches(net, tail_sizes):
    """Block k runs on batches of 4 but for one last run at the end of the stream (at its size,
    or padded to 2 or 4), and computes each image that reaches it once."""
    x, thresholds = images(37, seed=5), fitted(net, 1.0)
    _, exits, _ = simulated(net, x, thresholds, 37)
    runner = StreamingExit(net, 4, wave_batches=1, tail_sizes=tail_sizes)
    with block_batch_sizes(net) as seen:
        _, got, _ = runner.run(x, thresholds)
    assert torch.equal(got, exits)
    assert int((exits >= 1).sum()) > runner.queues[1].capacity  # queue 1 went round its ring
    for k in range(len(net.blocks)):
        sizes, reached = [size for size, _ in seen[k]], int((exits >= k).sum())
        assert sizes and all(size == 4 for size in sizes[:-1]), (k, sizes)
        if tail_sizes is None:
            assert sum(sizes) == reached, (k, sizes)
        else:
            assert sizes[-1] in (2, 4) and 0 <= sum(sizes) - reached < sizes[-1], (k, sizes)
    assert any(pruned for k in seen for _, pruned in seen[k])  # the None path was exercised


def test_streaming_syncs_once_per_round(net):
    x, thresholds = images(37, seed=5), fitted(net, 1.0)
    runner = StreamingExit(net, 4)
    with block_batch_sizes(net) as seen:
        runner.run(x, thresholds)
    steps = sum(len(sizes) for sizes in seen.values())
    assert 0 < runner.syncs <= runner.rounds_bound(37) < steps, (runner.syncs, steps)


def test_latency_syncs_once_per_block_until_the_image_has_left(net):
    x, thresholds = images(20, seed=6), fitted(net, 1.0)
    _, exits, _ = simulated(net, x, thresholds, 1)
    runner = LatencyExit(net, 1)
    with block_batch_sizes(net) as seen:
        _, got, _ = runner.run(x, thresholds)
    assert torch.equal(got, exits)
    n_exits = len(net.exits)
    assert [len(seen[k]) for k in range(n_exits)] == [int((exits >= k).sum())
                                                      for k in range(n_exits)]
    # after each block but the last, whether to go on; an image at the last exit ran all blocks
    assert runner.syncs == int((exits + 1).clamp(max=n_exits - 1).sum())


@pytest.mark.parametrize('mode', ['streaming', 'latency'])
def test_steps_replayed_as_graphs_decide_as_the_eager_ones(tiny, mode):
    """With steps captured once per batch size and replayed (the tails of a stream captured in
    its middle), for other thresholds and for a longer stream (which captures again)."""
    model, thresholds, x = tiny
    make = ((lambda **kw: StreamingExit(model, 8, wave_batches=1, **kw)) if mode == 'streaming'
            else (lambda **kw: LatencyExit(model, 2, **kw)))
    graphs = RecordedGraphs()
    runner = make(graphs=graphs)
    eager = make(**({'tail_sizes': runner.tail_sizes} if mode == 'streaming' else {}))
    assert runner.graphed and not eager.graphed
    n_exits, all_sizes = len(model.exits), set()
    for thresholds, x in ((thresholds, x), (fitted(model, 0.5), x),
                          (fitted(model, 2.0), torch.cat([x, images(9, seed=7)]))):
        got = runner.run(x, thresholds)
        for a, b in zip(got, eager.run(x, thresholds)):
            assert torch.equal(a, b)
        _, exits, _ = simulated(model, x, thresholds, len(x))
        assert torch.equal(got[1], exits)
        assert runner.graphed and graphs.replays
        sizes = {size for _, size in runner.replays}
        assert len(runner.replays) == n_exits * len(sizes)  # every block of each size, once
        all_sizes |= sizes
    if mode == 'streaming':
        assert all_sizes - {8}  # a tail ran on a smaller graph
        assert runner.captures > len(runner.replays)  # the longer stream captured again
        # a new pool each time the buffers were replaced (at the start, for the first stream and
        # for the longer one), once the old graphs were dropped
        assert graphs.pools == 3
    else:
        assert runner.captures == n_exits


@pytest.mark.parametrize('cls', [StreamingExit, LatencyExit])
def test_a_step_that_cannot_be_captured_warns_once_and_runs_eagerly(cls, capfd):
    torch.manual_seed(0)
    model = models.build(SMALL_NET).eval()
    model.blocks[1] = SyncsInForward(model.blocks[1])
    x, thresholds = images(20, seed=6), fitted(model, 1.0)
    runner = cls(model, 4, graphs=RecordedGraphs())
    for _ in range(2):
        _, got, _ = runner.run(x, thresholds)
        assert torch.equal(got, simulated(model, x, thresholds, 20)[1])
    assert not runner.graphed and runner.captures == 1  # block 0's graph, then none
    assert capfd.readouterr().err.count('warning: CUDA graph capture') == 1


@pytest.mark.parametrize('cls', [StreamingExit, LatencyExit])
def test_timing_the_exits_changes_no_result(net, cls):
    x, thresholds = images(20, seed=6), fitted(net, 1.0)
    runner = cls(net, 4)
    before = runner.run(x, thresholds)
    ms = runner.exit_ms(repeats=2)
    assert len(ms) == len(net.exits) and ms[0] > 0
    assert all(a < b for a, b in zip(ms, ms[1:]))  # a later exit has run more blocks
    for a, b in zip(before, runner.run(x, thresholds)):
        assert torch.equal(a, b)


def test_benchmark_script_writes_json_with_its_command(tmp_path):
    out = tmp_path / 'early_exit.json'
    args = ['--cf-net', json.dumps(SMALL_NET), '--batch-sizes', '1', '4', '--batches', '3',
            '--min-images', '8', '--latency-max-batch', '1', '--calibration', '32',
            '--repeats', '1', '--exit-repeats', '1', '--threads', '1', '--qs', '0.5', '2',
            '--out', str(out)]
    subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'early_exit.py'), *args],
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result['command'].endswith(shlex.join(args)) and result['complete']
    rows = result['cpu_speedup']
    assert [(r['mode'], r['batch_size'], r['q']) for r in rows] == [
        (mode, b, q) for b in (1, 4) for q in (0.5, 2.0)
        for mode in ('streaming', 'latency', 'shrinking') if mode != 'latency' or b == 1]
    assert [r['images'] for r in rows] == [8] * 6 + [12] * 4  # whole batches, at least 8
    for r in rows:
        assert r['identical'] and r['speedup'] > 0 and r['images_per_s'] > 0
        assert sum(r['exit_shares']) == pytest.approx(1)
        assert r['macs_ratio'] == pytest.approx(result['macs_all_heads'][-1] / r['avg_macs'])
    # a larger q sends samples to later exits
    assert all(a['macs_ratio'] > b['macs_ratio'] for a, b in zip(rows[:3], rows[3:6]))
    for b, modes in (('1', ('streaming', 'latency')), ('4', ('streaming',))):
        exits = result['exits'][b]
        assert set(exits) == {'macs_all_heads'} | {f'ms_{m}' for m in modes}
        for m in modes:  # measured time per image of each exit, next to its MACs
            assert exits[f'ms_{m}'][0] > 0 and exits[f'ms_{m}'] == sorted(exits[f'ms_{m}'])
        assert result['full_forward'][b]['images_per_s'] > 0
        assert not result['full_forward'][b]['graph']
    streaming = [r for r in rows if r['mode'] == 'streaming']
    assert all(r['predicted_ms_per_image'] > 0 for r in streaming)
    targets = result['targets']
    assert targets[0] == {'what': 'identical predictions and exits in every row', 'met': True}
    shrinking = {(r['batch_size'], r['q']): r['speedup'] for r in rows if r['mode'] == 'shrinking'}
    assert [t['streaming_over_shrinking'] for t in targets[1:]] == pytest.approx(
        [r['speedup'] / shrinking[r['batch_size'], r['q']] for r in streaming])
