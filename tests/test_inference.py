"""Early-exit inference against the budgeted decisions on the full forward pass."""
import json
import math
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from multiexit import budgeted, models
from multiexit.inference import early_exit_predict

# A small MsdNet whose later blocks prune the finer scales (None in the block outputs).
SMALL_NET = dict(call='MsdNet', n_exits=4, nlayers_to_exit=2, nlayers_between_exits=1,
                 nplanes_mulv=[2, 4, 8], exit_width=16, btneck_widths=[2, 2, 2])


@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    return models.build(SMALL_NET)


def images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


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
    return seen, handles


@pytest.mark.parametrize('q', [0.5, 1.0, 2.0])
def test_early_exit_equals_budgeted_decisions_and_skips_computation(net, q):
    n_exits = len(net.exits)
    net.eval()
    with torch.inference_mode():
        val_conf, _ = budgeted.confidences(torch.stack(net(images(64, seed=1))))
        x = images(48, seed=2)
        logits = torch.stack(net(x))
    thresholds = budgeted.fit_thresholds(val_conf, budgeted.geometric_fractions(n_exits, q))
    conf, _ = budgeted.confidences(logits)
    expected = budgeted.exit_indices(conf, thresholds)
    assert expected.unique().numel() == n_exits  # every exit is used: the check means something

    net.train()  # early_exit_predict must run in eval mode, and restore the mode
    seen, handles = block_batch_sizes(net)
    try:
        pred, exits = early_exit_predict(net, x, thresholds)
    finally:
        for h in handles:
            h.remove()
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
        conf, _ = budgeted.confidences(torch.stack(net.eval()(x)))
    n_exits = len(net.exits)
    tied = conf[k].argsort()[len(x) // 2]  # a median sample: some above it leave, some below stay
    thresholds = [math.inf] * n_exits
    thresholds[k], thresholds[-1] = conf[k, tied].item(), -math.inf
    expected = budgeted.exit_indices(conf, thresholds)
    assert expected[tied] == k and (expected == n_exits - 1).any()
    _, exits = early_exit_predict(net, x, thresholds)
    assert torch.equal(exits, expected)


def test_all_leave_at_the_first_exit(net):
    x = images(8, seed=3)
    seen, handles = block_batch_sizes(net)
    try:
        pred, exits = early_exit_predict(net, x, [-math.inf] * len(net.exits))
    finally:
        for h in handles:
            h.remove()
    assert exits.tolist() == [0] * 8
    assert all(not seen[k] for k in range(1, len(net.blocks)))  # nothing computed after exit 0
    with torch.inference_mode():
        assert torch.equal(pred, net.eval()(x)[0].argmax(-1))


def test_benchmark_script_writes_json_with_its_command(tmp_path):
    out = tmp_path / 'early_exit.json'
    args = ['--cf-net', json.dumps(SMALL_NET), '--images', '32', '--calibration', '32',
            '--batch-size', '16', '--repeats', '1', '--threads', '1', '--qs', '0.5', '2',
            '--out', str(out)]
    subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'early_exit.py'), *args],
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result['command'].endswith(shlex.join(args))
    assert [b['q'] for b in result['budgets']] == [0.5, 2.0]
    for b in result['budgets']:
        assert b['same_decisions_as_budgeted'] and b['images_per_s'] > 0
        assert sum(b['exit_shares']) == pytest.approx(1)
    # a larger q sends samples to later exits
    assert result['budgets'][0]['avg_macs'] < result['budgets'][1]['avg_macs']
