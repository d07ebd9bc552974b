"""The CUDA defaults are what a GPU measured: a speed switch is on by default only where a
committed decision (multiexit/accel/cuda_defaults.json) says so and names the measurement, whose
JSON says so by the rule of benchmarks/decide_defaults.py; a check's decisions.json, committed, is
what turns a switch on."""
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT
from multiexit.accel import cuda_defaults
from multiexit.config import FIELDS, shared_defaults, shared_docs

sys.path.insert(0, str(ROOT / 'benchmarks'))
import decide_defaults  # noqa: E402
import gpu_check  # noqa: E402

CUDA_SWITCHES = [f.name for f in FIELDS if (f.metadata['doc'] or '').startswith('CUDA')
                 and f.name != 'gpu']


def throughput(streams_ips, failed=0):
    """A throughput JSON as gpu_check --check all leaves it: streams at ``streams_ips`` against
    the graph's 2,000 images/s."""
    return dict(date='2027-01-02', device='Some GPU', command='c', run_defaults=dict(
        amp=True, channels_last=True, cuda_graph=True, cuda_streams=False, compile=False,
        cudnn_benchmark=False), train_images_per_s=dict(
        reference=350.0, cuda_graph=2000.0, cuda_graph_streams=streams_ips, default=2000.0),
        first_step_s=dict(cuda_graph=1.0, cuda_graph_streams=1.0), eval_images_per_s={},
        errors={}, cuda_tests=dict(passed=30, failed=failed, skipped=0))


def fresh_config(monkeypatch, decisions):
    """multiexit/config.py imported afresh (not registered: the tests' TrainConfig stays) with
    the CUDA decisions at ``decisions``."""
    monkeypatch.setattr(cuda_defaults, 'PATH', Path(decisions))
    spec = importlib.util.spec_from_file_location('multiexit._fresh_config',
                                                  ROOT / 'multiexit' / 'config.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_streams_are_off_by_default_and_print_config_says_where_that_comes_from(capsys):
    assert shared_defaults()['cuda_streams'] is False
    importlib.import_module('train_cifar').ex.run_commandline(['train_cifar.py', 'print_config'])
    line = next(line for line in capsys.readouterr().out.splitlines()
                if line.strip().startswith('cuda_streams = '))
    assert 'cuda_streams = False' in line
    assert '# CUDA, one process: ' in line and line.split('; ')[-1].startswith(
        'default off: not measured on a GPU yet (multiexit/accel/cuda_defaults.json)')


def test_the_measured_switches_are_on_and_the_others_off():
    """The 2026-11-26 H100 check measured the graph, bf16 and channels-last (the default path,
    fused SGD included, which is not a switch); streams, compile and cuDNN autotuning were not
    measured."""
    d = shared_defaults()
    assert {name: d[name] for name in CUDA_SWITCHES} == dict(
        amp=True, channels_last=True, compile=False, cuda_graph=True, cuda_streams=False,
        deterministic=False, cudnn_benchmark=False)
    assert shared_docs()['cuda_graph'].endswith(
        'default on: measured on NVIDIA H100 80GB HBM3, 2026-11-26 '
        '(multiexit/accel/cuda_defaults.json)')


@pytest.mark.parametrize('name', CUDA_SWITCHES)
def test_a_default_is_on_only_where_a_measured_json_says_so(name):
    """Every CUDA switch on by default has a decision naming a committed measurement, and the
    rule decides the same from that measurement alone (no earlier decision to fall back on)."""
    if not shared_defaults()[name]:
        return
    decision = cuda_defaults.load()[name]
    assert decision['verdict'] == 'on'
    measured = json.loads((ROOT / decision['measured_by']).read_text())
    redone = decide_defaults.decide(measured, decision['measured_by'])[name]
    assert redone == decision
    assert redone['cuda_tests']['failed'] == 0


def test_a_check_that_shows_streams_correct_and_faster_turns_them_on(tmp_path, monkeypatch):
    """gpu_check --check all writes decisions.json; with that file committed as the decisions,
    cuda_streams is on by default, and its comment names the measurement."""
    out = tmp_path / 'check'
    monkeypatch.setattr(gpu_check.subprocess, 'run', StubbedStages(throughput(2300.0)))
    monkeypatch.setattr(gpu_check, 'RESULTS', tmp_path / 'results')
    (tmp_path / 'results').mkdir()
    monkeypatch.setattr(sys, 'argv', ['gpu_check.py', str(out), '--check', 'all'])
    with pytest.raises(SystemExit):
        gpu_check.main()
    decided = json.loads((out / 'decisions.json').read_text())['switches']
    assert decided['cuda_streams']['verdict'] == 'on'
    assert decided['cuda_streams']['measured_by'] == 'benchmarks/results/2027-01-02-some-gpu.json'
    assert decided['cuda_streams']['figures'] == dict(cuda_graph_streams=2300.0, cuda_graph=2000.0)
    assert (tmp_path / 'results' / '2027-01-02-some-gpu.json').is_file()
    config = fresh_config(monkeypatch, out / 'decisions.json')
    assert config.shared_defaults()['cuda_streams'] is True
    assert config.TrainConfig.__dataclass_fields__['cuda_streams'].default is True
    assert config.shared_docs()['cuda_streams'].endswith(
        'default on: measured on Some GPU, 2027-01-02 (multiexit/accel/cuda_defaults.json)')
    # what the check did not measure keeps its committed decision
    assert config.shared_defaults()['compile'] is False
    assert decided['compile'] == cuda_defaults.load()['compile']


@pytest.mark.parametrize('streams_ips, failed, why', [
    (2020.0, 0, 'below x1.02'),  # within the noise: not faster
    (1800.0, 0, 'below x1.02'),  # slower
    (2300.0, 1, 'not measured on a GPU yet'),  # faster, but a CUDA test failed
])
def test_streams_stay_off_unless_correct_and_faster(streams_ips, failed, why):
    decided = decide_defaults.decide(throughput(streams_ips, failed), 'r.json',
                                     cuda_defaults.load())
    assert decided['cuda_streams']['verdict'] == 'off'
    assert why in decided['cuda_streams']['why']


def test_a_measured_switch_that_is_slower_turns_off():
    t = throughput(2300.0)
    t['train_images_per_s']['cuda_graph_fp32'] = 2500.0  # fp32 faster than bf16: amp off
    t['train_images_per_s']['cuda_graph_fp32_streams'] = 2400.0  # streams at fp32: slower
    decided = decide_defaults.decide(t, 'r.json', cuda_defaults.load())
    assert decided['amp']['verdict'] == 'off' and decided['cuda_streams']['verdict'] == 'off'
    assert decided['cuda_streams']['figures'] == dict(cuda_graph_fp32_streams=2400.0,
                                                      cuda_graph_fp32=2500.0)


def test_a_decision_on_without_its_measurement_is_refused(tmp_path):
    path = tmp_path / 'decisions.json'
    path.write_text(json.dumps({'switches': {'cuda_streams': {'verdict': 'on'}}}))
    with pytest.raises(ValueError, match='cuda_streams is on but names no measurement'):
        cuda_defaults.load(path)


class StubbedStages:
    """Stands in for subprocess.run in gpu_check --check all: the CUDA tests pass, the
    throughput stage writes ``throughput``, the others what their benchmark would."""

    def __init__(self, throughput):
        self.throughput = throughput

    def __call__(self, cmd, **kwargs):
        cmd = [str(c) for c in cmd]
        if '--junitxml' in ' '.join(cmd):
            junit = next(c for c in cmd if c.startswith('--junitxml=')).split('=', 1)[1]
            Path(junit).write_text('<testsuite tests="30" failures="0" errors="0" skipped="0"/>')
        elif 'benchmarks/train_throughput.py' in cmd:
            Path(cmd[cmd.index('--json') + 1]).write_text(json.dumps(self.throughput))
        elif 'benchmarks/early_exit.py' in cmd:
            Path(cmd[cmd.index('--out') + 1]).write_text(json.dumps(dict(
                gpu_speedup=[], complete=True, full_forward={}, targets=[])))
        elif 'benchmarks/pack_throughput.py' in cmd:
            Path(cmd[cmd.index('--json') + 1]).write_text(json.dumps(dict(date='d', device='G')))
        return subprocess.CompletedProcess(cmd, 0, stdout='', stderr='')
