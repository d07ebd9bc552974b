import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / 'data'
SHARED_REFERENCE = ROOT.parent / 'shared' / 'reference'
# Set by .ci/run: there the reference is always present, so a test that needs it must not skip.
REQUIRE_REFERENCE = 'MULTIEXIT_REQUIRE_REFERENCE'

# A temperature that moves: maxprob far below the confidence of a fresh 100-class teacher (about
# 0.02) makes DBT raise T from the first step, so a resume that lost T does not go unnoticed.
RISING_T = 'cf_loss.maxprob=0.015'

if os.environ.get('PYTEST_XDIST_WORKER'):  # pytest -n N: N test processes share the cores
    torch.set_num_threads(1)


@pytest.fixture(scope='session')
def semantics():
    return json.loads((DATA / 'reference_semantics.json').read_text())


@pytest.fixture(scope='session')
def reference_checkpoint():
    path = SHARED_REFERENCE / 'msdnet_cifar100_reference.pt'
    if not path.is_file():
        message = f'{path} not present'
        if os.environ.get(REQUIRE_REFERENCE):
            pytest.fail(f'{message}, and {REQUIRE_REFERENCE} is set', pytrace=False)
        pytest.skip(message)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope='session')
def fake_data(tmp_path_factory):
    """A generated CIFAR-100 and CIFAR-10 in the python-pickle format."""
    from multiexit.data.cifar import write_fake_cifar

    root = tmp_path_factory.mktemp('data')
    write_fake_cifar(root, 'Cifar100', n_train_per_class=12, n_test_per_class=3)
    write_fake_cifar(root, 'Cifar10', n_train_per_class=30, n_test_per_class=5)
    return root


def pythonpath():
    """PYTHONPATH for a script's subprocess: the repository first, then what this process has
    (packages installed aside, e.g. sacred from wheels on a GPU machine)."""
    return os.pathsep.join([str(ROOT)] + ([os.environ['PYTHONPATH']]
                                          if os.environ.get('PYTHONPATH') else []))


def run_script(script, *args, cwd, snapshots, check=True, env=None):
    """Run train_cifar.py / eval.py as a user would, with ``env`` added to the environment;
    returns the CompletedProcess."""
    # one thread: tiny networks gain nothing from two, and parallel runs would oversubscribe
    env = dict(os.environ, MULTIEXIT_SNAPSHOTS=str(snapshots), PYTHONPATH=pythonpath(),
               OMP_NUM_THREADS='1', **(env or {}))
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return proc
