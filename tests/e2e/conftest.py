"""The end-to-end layer: what must be a real process (scripts and grids as a user types them,
torchrun, SIGKILL, the docs' commands, a fresh interpreter). Every test here is marked ``e2e``:
the README's test command leaves them out, ``pytest -m e2e tests`` runs them (.ci/run does,
after the default layer)."""
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
E2E_TIMEOUT_S = 900  # a module's first test pays for its fixture's script starts


@pytest.hookimpl(tryfirst=True)  # before -m selects
def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))
