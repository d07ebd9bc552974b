"""The fixtures every test module may use; what the modules share otherwise is in helpers.py."""
import json
import os

import pytest
import torch

from helpers import DATA, REQUIRE_REFERENCE, SHARED_REFERENCE, refused_downloads

# The scripts run in this process write to snapshots/ of the folder a test gives them (the
# scripts' default), never to one that this variable names.
os.environ.pop('MULTIEXIT_SNAPSHOTS', None)

if os.environ.get('PYTEST_XDIST_WORKER'):  # pytest -n N: N test processes share the cores
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which turns -n into --dist load
def pytest_cmdline_main(config):
    """With -n, the tests of an xdist group go to one worker (``--dist loadgroup``) unless
    --dist says otherwise. Set here, not in pyproject.toml's addopts: a machine without
    pytest-xdist (the GPU check's) runs the tests one at a time all the same."""
    if getattr(config.option, 'numprocesses', None) and config.option.dist == 'no':
        config.option.dist = 'loadgroup'


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist, as it starts a worker: tell it (which parses the command line again)
    whether the tests are distributed by group."""
    node.workerinput['loadgroup'] = node.config.option.dist == 'loadgroup'


def pytest_configure(config):
    if getattr(config, 'workerinput', {}).get('loadgroup'):
        config.option.loadgroup = True  # the nodes of a group get its name, for the scheduler


@pytest.hookimpl(tryfirst=True)  # before -m selects and xdist groups
def pytest_collection_modifyitems(items):
    """tests/test_cuda.py is the GPU check's: marked ``cuda`` (its tests skip without one).
    The tests that share a module's fixture, directly or through another test's, are an xdist
    group (``--dist loadgroup``): they go to one worker, so that each fixture runs once; every
    other test goes where there is room."""
    group = {}  # (module, fixture) -> its group, as a chain that ends at the group's name

    def name(key):
        while group.setdefault(key, key) != key:
            key = group[key]
        return key
    uses = []
    for item in items:
        if item.path.name == 'test_cuda.py':
            item.add_marker(pytest.mark.cuda)
        fixtures = sorted((item.module.__name__, defs[-1].argname)
                          for defs in item._fixtureinfo.name2fixturedefs.values()
                          if defs[-1].scope == 'module')
        for other in fixtures[1:]:
            group[name(other)] = name(fixtures[0])
        uses.append((item, fixtures))
    for item, fixtures in uses:
        if fixtures:
            item.add_marker(pytest.mark.xdist_group('::'.join(name(fixtures[0]))))


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


@pytest.fixture
def no_download():
    """Environment variables under which every download fails (helpers.refused_downloads)."""
    with refused_downloads() as env:
        yield env
