"""eval.py times each architecture once: two snapshots of one network share one measurement of
the time per exit, so budgeted_ms.png cannot show the noise of two timings as one snapshot
being faster."""
import importlib
import shutil
from pathlib import Path

import pandas as pd

from multiexit.data.cifar import write_fake_cifar
from multiexit.early_exit import timing
from multiexit.evaluate import plots

LEGACY = Path(__file__).resolve().parent / 'data' / 'legacy_run'  # the smoke MsdNet, 2 epochs


class NoisyClock:
    """Stands in for timing.exit_ms: each measurement twice as slow as the one before, as CPU
    noise made two identical smoke networks differ."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, input_size, streaming_batch, repeats=5, **kwargs):
        self.calls += 1
        per_exit = [self.calls * (k + 1) for k in range(len(model.exits))]
        return {name: list(per_exit) for name in timing.TIME_COLUMNS}


def test_two_snapshots_of_one_architecture_are_drawn_with_one_measurement(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for run in ('1', '2'):  # the same network, trained once, as two runs
        shutil.copytree(LEGACY, tmp_path / 'snapshots' / run,
                        ignore=shutil.ignore_patterns('expected.json'))
    write_fake_cifar(tmp_path / 'data', 'Cifar100', n_train_per_class=30, n_test_per_class=10)
    clock = NoisyClock()
    monkeypatch.setattr(timing, 'exit_ms', clock)
    figures = {}
    monkeypatch.setattr(plots.Figure, 'savefig', lambda fig, path: figures.update({
        Path(path).name: fig}))
    importlib.import_module('eval').ex.run_commandline(
        ['eval.py', 'with', "snapshot_name=['1', '2']", 'time_repeats=1', 'data_dir=data'])
    assert clock.calls == 1
    run_dir = next(p for p in (tmp_path / 'snapshots').iterdir() if p.name not in ('1', '2'))
    for name in ('anytime.csv', 'budgeted.csv'):  # the same weights: the same rows, times too
        frame = pd.read_csv(run_dir / name)
        one, two = (frame[frame['snapshot'] == run].drop(columns='snapshot') for run in (1, 2))
        assert one.reset_index(drop=True).equals(two.reset_index(drop=True)), name
    fig = figures['budgeted_ms.png']
    for ax in fig.axes[1:]:  # the panels in ms: each snapshot's single exits at the same times
        assert 'once per architecture' in ax.get_xlabel()
        exits = {line.get_label(): list(line.get_xdata()) for line in ax.lines
                 if line.get_label().endswith('single exits')}
        assert len(exits) == 2
        first, second = exits.values()
        assert first == second == [k + 1.0 for k in range(len(first))]


def test_each_architecture_is_timed_once(monkeypatch):
    clock = NoisyClock()
    monkeypatch.setattr(timing, 'exit_ms', clock)
    timer = timing.PerArchitecture(streaming_batch=8, repeats=1)

    class Model:
        exits = [None, None]

    small, large = dict(call='MsdNet', n_exits=2), dict(call='MsdNet', n_exits=2, nplanes_init=2)
    a = timer.exit_ms(Model(), small, (3, 32, 32))
    assert timer.exit_ms(Model(), dict(small), (3, 32, 32)) == a
    assert timer.exit_ms(Model(), large, (3, 32, 32)) != a  # another architecture: timed
    assert timer.exit_ms(Model(), small, (3, 64, 64)) != a  # another input size: timed
    assert clock.calls == 3
