"""The speed tools: gpu_check.py's stages fit its budget and name modes that
train_throughput.py has (op_count.py counts what it says: tests/e2e/test_benchmarks.py)."""
import sys

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
        limits = gpu_check.LIMITS[quick]
        for stages in gpu_check.CHECKS.values():
            assert set(stages) <= set(limits)
            boxed = [s for s in limits if s in stages and s != 'max_autotune']
            assert sum(limits[s][0] for s in boxed) <= budget <= 480, stages
            assert [s for s in limits if s in stages][:len(boxed)] == boxed  # autotune last
