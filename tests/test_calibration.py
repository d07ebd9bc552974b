"""Per-exit temperature scaling against the authors' code (Guo et al. 2017,
gpleiss/temperature_scaling; the numbers in data/temperature_scaling_reference.json), and what
it leaves alone: accuracy and unlabelled examples."""
import json
from pathlib import Path

import pytest
import torch

from multiexit.evaluate.calibration import fit_temperature, fit_temperatures, scaled
from multiexit.evaluate.report import (anytime_frame, exit_report, expected_calibration_error,
                                       per_exit_table)
from multiexit.losses import IGNORE
from multiexit.metrics import metric_names

REFERENCE = json.loads((Path(__file__).parent / 'data' /
                        'temperature_scaling_reference.json').read_text())
COSTS = [{'macs': c, 'macs_all_heads': c, 'params': 1} for c in (1, 2, 4)]


def reference_inputs():
    """The logits and labels of the reference, by its recipe ('inputs')."""
    torch.manual_seed(0)
    labels = torch.randint(10, (200,))
    logits = []
    for scale in REFERENCE['scales']:
        z = torch.randn(200, 10)
        z[torch.arange(200), labels] += 1.0
        logits.append(scale * z)
    return torch.stack(logits), labels


def test_temperatures_and_scaled_ece_match_the_authors_code():
    """rel 1e-3 on T: the same float32 L-BFGS path gives their T to the last bit here, and
    rounding elsewhere (another BLAS or torch) moves it far less; a change of the method
    (objective, start, step size, iterations) moves it by more (exit 0 stops short of its
    optimum, so every step counts). ECE: theirs in float32, ours in float64."""
    logits, labels = reference_inputs()
    temperatures = fit_temperatures(logits, labels)
    assert temperatures == pytest.approx(REFERENCE['temperature'], rel=1e-3)
    assert len(set(round(t, 2) for t in temperatures)) == 3  # the scales give 3 temperatures
    assert expected_calibration_error(logits, labels) == pytest.approx(
        REFERENCE['ece_before'], abs=1e-6)
    report = exit_report(logits, labels, COSTS, temperatures=temperatures)
    assert [report[f'ece_ts_clf{k}'] for k in range(3)] == pytest.approx(
        REFERENCE['ece_after'], abs=1e-5)
    assert [report[f'temperature_clf{k}'] for k in range(3)] == temperatures


def test_accuracy_is_unchanged_by_the_temperatures():
    logits, labels = reference_inputs()
    temperatures = fit_temperatures(logits, labels)
    assert torch.equal(scaled(logits, temperatures).argmax(-1), logits.argmax(-1))
    plain = exit_report(logits, labels, COSTS)
    calibrated = exit_report(logits, labels, COSTS, temperatures=temperatures)
    accuracy = metric_names(3, (1, 5))
    assert {k: calibrated[k] for k in accuracy} == {k: plain[k] for k in accuracy}
    assert set(calibrated) - set(plain) == {f'{m}_clf{k}' for m in ('ece_ts', 'temperature')
                                             for k in range(3)}


def test_logits_of_an_inference_pass_are_fitted():
    """eval.py's logits come from ``passes.exit_logits``, in inference mode."""
    logits, labels = reference_inputs()
    with torch.inference_mode():
        frozen = logits * 1, labels * 1
    assert fit_temperatures(*frozen) == fit_temperatures(logits, labels)


def test_unlabelled_examples_do_not_move_the_temperature():
    logits, labels = reference_inputs()
    extra = torch.cat([logits[1], 10 * torch.randn(50, 10)])
    assert fit_temperature(extra, torch.cat([labels, torch.full((50,), IGNORE)])) == \
        pytest.approx(fit_temperature(logits[1], labels), rel=1e-6)


def test_the_table_and_frame_show_the_scaled_ece_beside_the_plain_one():
    logits, labels = reference_inputs()
    temperatures = fit_temperatures(logits, labels)
    frame = anytime_frame(exit_report(logits, labels, COSTS, temperatures=temperatures), 3)
    assert frame['ece_ts'].tolist() == pytest.approx(REFERENCE['ece_after'], abs=1e-5)
    assert frame['temperature'].tolist() == temperatures
    head, *rows = per_exit_table(frame).splitlines()
    columns = [c.strip() for c in head.split('  ') if c.strip()]
    at = columns.index('ECE TS %')
    assert columns[at - 1:at + 2] == ['ECE %', 'ECE TS %', 'T']
    assert rows[0].split()[at:at + 2] == [f'{100 * frame["ece_ts"][0]:.2f}',
                                          f'{temperatures[0]:.3f}']


def test_a_fit_that_diverges_falls_back_to_the_nll_minimum_and_says_so(monkeypatch, capsys):
    """The authors' L-BFGS step can take T below 0 (a smoke network's exits did, at their lr;
    here a larger lr forces it): the NLL's minimum over [0.05, 20] is used, with one warning,
    and never a T <= 0."""
    import multiexit.evaluate.calibration as calibration
    logits, labels = reference_inputs()
    monkeypatch.setattr(calibration, 'LR', 20.0)
    T = fit_temperature(logits[0], labels)
    grid = torch.linspace(0.05, 3.0, 2000)
    best = grid[torch.stack([torch.nn.functional.cross_entropy(logits[0] / t, labels)
                             for t in grid]).argmin()].item()
    assert T == pytest.approx(best, rel=2e-3)
    warning, = capsys.readouterr().err.splitlines()
    assert warning.startswith('warning: temperature scaling diverged (T=-')
