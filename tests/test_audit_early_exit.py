"""Early exit at the edges users rely on: an image whose confidence equals its exit's threshold
leaves there in every mode (streaming, latency, shrinking) as under the rule that the budgets
are fitted with (``rule.exit_indices``: >=, not >), and the fixed-size steps' times per image per
exit are milliseconds. On a stub network whose confidences are exact, elementwise functions of
the image, so that every mode sees the very same numbers."""
import time

import pytest
import torch
from torch import nn

from multiexit.early_exit import timing
from multiexit.early_exit.latency import LatencyExit
from multiexit.early_exit.rule import confidences, exit_indices
from multiexit.early_exit.shrinking import early_exit_predict
from multiexit.early_exit.streaming import StreamingExit

N_EXITS, FEATURES = 3, (3,)


class Pick(nn.Module):
    """Exit head k: two logits, feature k and 0, so its confidence is sigmoid(|feature k|)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, h):
        a = h[:, self.k]
        return torch.stack([a, torch.zeros_like(a)], dim=-1)


class Stub(nn.Module):
    """The model contract (``blocks``, ``exits``, ``exit_features``) with identity blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(N_EXITS))
        self.exits = nn.ModuleList(Pick(k) for k in range(N_EXITS))
        self.weight = nn.Parameter(torch.zeros(1))  # the runners find the device from it

    def exit_features(self, h):
        return h

    def forward(self, x):
        return [head(x) for head in self.exits]


def streaming(model, x, thresholds):
    return StreamingExit(model, batch_size=4, input_size=FEATURES).run(x, thresholds)[1]


def latency(model, x, thresholds):
    return LatencyExit(model, batch_size=1, input_size=FEATURES).run(x, thresholds)[1]


def latency_batched(model, x, thresholds):
    return LatencyExit(model, batch_size=3, input_size=FEATURES).run(x, thresholds)[1]


def shrinking(model, x, thresholds):
    return early_exit_predict(model, x, thresholds)[1]


@pytest.mark.parametrize('mode', [streaming, latency, latency_batched, shrinking])
def test_an_image_whose_confidence_equals_its_threshold_leaves_there(mode):
    torch.manual_seed(0)
    model, x = Stub(), torch.randn(23, *FEATURES)
    conf, _ = confidences(torch.stack(model(x)))  # (exits, images), as the budgets see them
    order = conf[0].argsort()
    at_0 = int(order[12])  # leaves at exit 0 only because its confidence equals the threshold
    at_1 = next(int(i) for i in order[:12] if conf[1, i] < 1)
    thresholds = [conf[0, at_0].item(), conf[1, at_1].item(), 0.0]
    rule = exit_indices(conf, thresholds)
    assert rule[at_0] == 0 and rule[at_1] == 1 and set(rule.tolist()) == {0, 1, 2}
    assert mode(model, x, thresholds).tolist() == rule.tolist()
    # at the threshold just above its confidence, each goes on
    higher = [torch.nextafter(torch.tensor(t), torch.tensor(2.0)).item() for t in thresholds]
    later = mode(model, x, higher[:2] + [0.0])
    assert later.tolist() == exit_indices(conf, higher[:2] + [0.0]).tolist()
    assert later[at_0] > 0 and later[at_1] > 1


# --- the time per image per exit is in milliseconds ---

SLEEP_S = [0.02, 0.04, 0.06]  # the stub step of block k sleeps this long


def sleeping(runner, k):
    time.sleep(SLEEP_S[k])


def close_to(measured, expected):
    """Each measured time within what sleeping adds (late wake-ups, a loaded machine)."""
    return all(e <= m <= 1.5 * e + 5 for m, e in zip(measured, expected))


@pytest.mark.parametrize('batch', [1, 4])
def test_the_time_per_image_of_an_exit_is_in_milliseconds(monkeypatch, batch):
    """A step of block k that takes SLEEP_S[k] seconds: a prediction at exit k costs
    1e3 * sum(SLEEP_S[:k + 1]) / batch milliseconds per image."""
    monkeypatch.setattr(StreamingExit, 'timed_step', sleeping)
    runner = StreamingExit(Stub(), batch_size=batch, input_size=FEATURES)
    expected = [1e3 * sum(SLEEP_S[:k + 1]) / batch for k in range(N_EXITS)]
    measured = runner.exit_ms(repeats=2)
    assert len(measured) == N_EXITS and close_to(measured, expected), (measured, expected)


def test_both_modes_report_milliseconds_per_image(monkeypatch):
    for cls in (StreamingExit, LatencyExit):
        monkeypatch.setattr(cls, 'timed_step', sleeping)
    ms = timing.exit_ms(Stub(), FEATURES, streaming_batch=4, repeats=2)
    assert set(ms) == set(timing.TIME_COLUMNS)
    for name, batch in (('ms_streaming', 4), ('ms_latency', timing.LATENCY_BATCH)):
        expected = [1e3 * sum(SLEEP_S[:k + 1]) / batch for k in range(N_EXITS)]
        assert close_to(ms[name], expected), (name, ms[name], expected)
