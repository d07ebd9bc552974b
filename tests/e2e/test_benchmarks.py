"""benchmarks/op_count.py as a user runs it."""
import json
import subprocess
import sys

from helpers import ROOT, pythonpath


def test_op_count_counts_the_batchnorm_counters(tmp_path):
    out = tmp_path / 'ops.json'
    subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'op_count.py'), '--variants',
                    'fp32,torch_batchnorm', '--count-batch', '2', '--json', str(out)],
                   check=True, capture_output=True, timeout=300,
                   env={'PYTHONPATH': pythonpath(), 'OMP_NUM_THREADS': '1', 'PATH': ''})
    r = json.loads(out.read_text())
    ops = r['ops_per_step']
    assert ops['torch_batchnorm'] - ops['fp32'] == 263  # one per BatchNorm of the paper's net
    assert r['ops_by_name']['fp32']['convolution'] == 263
    assert 'op_count.py --variants fp32,torch_batchnorm' in r['command']
    assert r['ops_per_image']['fp32'] == ops['fp32'] / 64
