"""The speed tools: gpu_check.py's stages fit its budget and name modes that
train_throughput.py has (op_count.py counts what it says: tests/e2e/test_benchmarks.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import gpu_check  # noqa: E402
from train_throughput import TRAIN_MODES  # noqa: E402


def modes(args):
    return args[args.index('--modes') + 1].split(',')


def test_gpu_check_times_known_modes():
    for args in (gpu_check.THROUGHPUT, gpu_check.QUICK_THROUGHPUT):
        assert set(modes(args)) <= set(TRAIN_MODES)
        assert not any('compile' in m or 'autotune' in m for m in modes(args))  # their own stages
    assert {'cuda_graph_compile', 'cuda_graph_max_autotune'} <= set(TRAIN_MODES)


def test_every_stage_of_a_check_gets_its_whole_time_box_within_the_budget():
    """In each check (--check), the stages before max_autotune (which takes what is left):
    each gets its full limit even when every one before it uses its own, within 8 minutes."""
    for quick, budget in ((False, 470), (True, 300)):
        assert gpu_check.BUDGET_S[quick] == budget
        limits = gpu_check.LIMITS[quick]
        for name, stages in gpu_check.CHECKS.items():
            if name == 'all':
                continue
            assert set(stages) <= set(limits)
            boxed = [s for s in limits if s in stages and s != 'max_autotune']
            assert sum(limits[s][0] for s in boxed) <= budget <= 480, stages
            assert [s for s in limits if s in stages][:len(boxed)] == boxed  # autotune last


def test_check_all_runs_the_cuda_tests_then_each_checks_figure_within_one_device_call():
    """--check all: the CUDA tests, then speed, early exit and packs, in this order; each stage
    gets its whole limit even when every one before it uses its own (its reserve is the sum of
    the later limits), within the budget of one call of at most 9 minutes."""
    stages, limits = gpu_check.CHECKS['all'], gpu_check.LIMITS['all']
    assert stages == ('cuda_tests', 'throughput', 'early_exit', 'pack') == tuple(limits)
    assert sum(limit for limit, _ in limits.values()) <= gpu_check.BUDGET_S['all'] <= 540
    for i, stage in enumerate(stages):
        assert limits[stage][1] == sum(limits[s][0] for s in stages[i + 1:]), stage


class StubbedStages:
    """Stands in for subprocess.run in gpu_check: each stage writes the JSON its benchmark
    would, after checking that stages.json already holds every stage before it; ``cut`` is a
    stage that runs out of time (a call cut off there)."""

    def __init__(self, out, cut=None):
        self.out, self.cut, self.seen = out, cut, []

    def __call__(self, cmd, **kwargs):
        cmd = [str(c) for c in cmd]
        if cmd[0] == 'nvidia-smi' or cmd[1:3] == ['-c', 'import sacred']:
            return subprocess.CompletedProcess(cmd, 0, stdout='', stderr='')
        name = {'pytest': 'cuda_tests', 'benchmarks/train_throughput.py': 'throughput',
                'benchmarks/early_exit.py': 'early_exit',
                'benchmarks/pack_throughput.py': 'pack'}[cmd[2] if cmd[1] == '-m' else cmd[1]]
        rows = json.loads((self.out / 'stages.json').read_text())['rows']
        assert [r['stage'] for r in rows] == ['versions', 'sacred'] + self.seen
        self.seen.append(name)
        if name == self.cut:
            raise subprocess.TimeoutExpired(cmd, kwargs['timeout'], output='')
        if name == 'cuda_tests':
            junit = next(c for c in cmd if c.startswith('--junitxml=')).split('=', 1)[1]
            Path(junit).write_text('<testsuite tests="3" failures="0" errors="0" skipped="1"/>')
            assert 'tests/test_cuda.py' in cmd
        else:
            path = Path(cmd[cmd.index('--out' if name == 'early_exit' else '--json') + 1])
            path.write_text(json.dumps(RESULTS[name]))
        return subprocess.CompletedProcess(cmd, 0, stdout=f'{name} ran\n')


RESULTS = {
    'throughput': dict(date='d', device='GPU', command='c', train_images_per_s={'default': 9.0},
                       eval_images_per_s={}),
    'early_exit': dict(gpu_speedup=[], complete=True, full_forward={}, targets=[]),
    'pack': dict(date='d', device='GPU'),
}


@pytest.mark.parametrize('cut', [None, 'early_exit'])
def test_check_all_writes_each_stages_json_as_it_ends(tmp_path, monkeypatch, cut):
    """The stages stubbed: they run in the order of CHECKS['all'], each after stages.json
    records the ones before it; a stage cut off by its time limit leaves what the earlier
    ones wrote, and the later ones still run."""
    out = tmp_path / 'check'
    stub = StubbedStages(out, cut)
    monkeypatch.setattr(gpu_check.subprocess, 'run', stub)
    monkeypatch.setattr(gpu_check, 'RESULTS', tmp_path / 'results')
    (tmp_path / 'results').mkdir()
    monkeypatch.setattr(sys, 'argv', ['gpu_check.py', str(out), '--check', 'all'])
    with pytest.raises(SystemExit) as e:
        gpu_check.main()
    assert stub.seen == list(gpu_check.CHECKS['all'])
    rows = json.loads((out / 'stages.json').read_text())['rows']
    statuses = {r['stage']: r['status'] for r in rows}
    assert list(statuses) == ['versions', 'sacred', *gpu_check.CHECKS['all']]
    assert statuses['versions'] == 'FAILED'  # no CUDA device here: the exit code says so
    assert e.value.code == 1
    assert statuses['cuda_tests'] == 'PASSED'
    assert json.loads((out / 'cuda_tests.json').read_text())['passed_failed_skipped'] == [2, 0, 1]
    assert statuses['early_exit'] == ('TIMEOUT' if cut else 'PASSED')
    for name in ('throughput', 'pack'):
        assert json.loads((out / f'{name}.json').read_text()) == RESULTS[name]
    assert (out / 'early_exit.json').is_file() == (cut is None)
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['rows'] == rows
    assert sorted(p.name for p in (tmp_path / 'results').iterdir()) == ['d-gpu.json',
                                                                        'd-pack-gpu.json']
