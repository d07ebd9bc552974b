"""A run folder written by the code before the layout change (tests/data/legacy_run: the smoke
MsdNet with DBT, 2 epochs, written by main at 88f3cbe) still evaluates and resumes, with the
numbers that code gave (expected.json, measured then)."""
import importlib
import json
import shutil
from pathlib import Path

import pytest

from multiexit.data.cifar import write_fake_cifar

LEGACY = Path(__file__).resolve().parent / 'data' / 'legacy_run'


@pytest.fixture
def legacy(tmp_path, monkeypatch):
    """A working folder whose snapshots/1 is the legacy run, with the generated data it was
    trained on in data/."""
    monkeypatch.chdir(tmp_path)  # snapshots/ there is the scripts' default
    shutil.copytree(LEGACY, tmp_path / 'snapshots' / '1', ignore=shutil.ignore_patterns(
        'expected.json'))
    # what generate_fake_data wrote then
    write_fake_cifar(tmp_path / 'data', 'Cifar100', n_train_per_class=30, n_test_per_class=10)
    return tmp_path, json.loads((LEGACY / 'expected.json').read_text())


def run(script, *args):
    ex = importlib.import_module(script).ex
    return ex.run_commandline([f'{script}.py', 'with', *args])


def test_a_legacy_run_evaluates_with_the_same_numbers(legacy):
    _, expected = legacy
    result = run('eval', 'snapshot_name=1', 'time_repeats=0', 'data_dir=data').result
    # the stored keys with their values; keys added since (post-hoc rules) may come too
    assert set(expected['eval']) <= set(result)
    stored = {key: result[key] for key in expected['eval']}
    assert stored == pytest.approx(expected['eval'], rel=1e-6, abs=1e-9)


def test_a_legacy_run_resumes_with_the_same_numbers(legacy):
    work, expected = legacy
    run('train_cifar', 'snapshots/1/config.json', 'parent_snapshot=1', 'n_epochs=3',
        'data_dir=data')
    metrics = json.loads((work / 'snapshots' / '2' / 'metrics.json').read_text())
    assert {k: v['steps'][-1] for k, v in metrics.items()} == {k: 3 for k in metrics}
    got = {k: v['values'][-1] for k, v in metrics.items()}
    assert set(got) == set(expected['resumed_epoch3'])
    assert got == pytest.approx(expected['resumed_epoch3'], rel=1e-5, abs=1e-7)
