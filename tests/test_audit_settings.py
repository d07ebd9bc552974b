"""cf_loss.C, the weight of the distillation terms, is a fraction: above 1 the cross-entropy's
weight (1 - C) turns negative. A C above 1 is refused, on its own and from the command line (one
line, exit 2, no run folder); C = 1 (distillation only) is allowed."""
import importlib

import pytest

from multiexit.config import TrainConfig
from multiexit.errors import ConfigError


@pytest.mark.parametrize('call', ['DistillationBasedLoss', 'DistillationLossConstTemp'])
@pytest.mark.parametrize('C', [1.0000001, 1.5, 2, 10.0])
def test_a_loss_weight_above_1_is_refused(call, C):
    with pytest.raises(ConfigError, match=rf"^cf_loss\.C={C}: expected a number in \[0, 1\]$"):
        TrainConfig.check({'cf_loss': dict(call=call, C=C)})


@pytest.mark.parametrize('C', [0, 0.5, 1, 1.0])
def test_a_loss_weight_up_to_1_is_allowed(C):
    TrainConfig.check({'cf_loss': dict(call='DistillationBasedLoss', C=C)})


def test_train_cifar_refuses_a_loss_weight_above_1_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # snapshots/ and data/ there
    ex = importlib.import_module('train_cifar').ex
    with pytest.raises(SystemExit) as stopped:
        ex.run_commandline(['train_cifar.py', 'with', 'smoke', 'cf_loss.C=1.2'])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2
    assert err[-1] == 'error: cf_loss.C=1.2: expected a number in [0, 1]'
    assert not any('Traceback' in line for line in err)
    snapshots = tmp_path / 'snapshots'
    assert not snapshots.exists() or [p for p in snapshots.iterdir() if p.name.isdigit()] == []
