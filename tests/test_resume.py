"""Resuming with settings that differ from the parent's: what carries over, what takes the new
value, and what is refused (multiexit.train.run.Run, in this process, on generated data)."""
import json

import pytest

from multiexit.data.cifar import write_fake_cifar
from multiexit.errors import ConfigError
from multiexit.config import TrainConfig
from multiexit.train.api import train_alone
from multiexit.train.run import Run

DBT_RISING = dict(call='DistillationBasedLoss', maxprob=0.015)  # T rises from the first step


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """train_cifar.py's smoke configuration, on a generated data set of 3 images per class."""
    import train_cifar

    config = dict(train_cifar.ex.run('print_config', named_configs=['smoke']).config)
    data = tmp_path_factory.mktemp('data')
    write_fake_cifar(data, 'Cifar100', n_train_per_class=30, n_test_per_class=2)
    small = dict(n_per_class=3, nval_per_class=1)  # 3 steps an epoch
    return dict(config, data_dir=str(data), seed=3, parent_snapshot=None,
                cf_trn=dict(config['cf_trn'], **small), cf_val=dict(config['cf_val'], **small))


def run(config, run_dir, log=print, **changes):
    """A Run of ``config`` with ``changes`` (dicts are merged, as sacred merges them)."""
    config = {**config, **{k: dict(config[k], **v) if isinstance(v, dict) else v
                           for k, v in changes.items()}}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'config.json').write_text(json.dumps(config))  # what sacred records
    return Run(TrainConfig.of(config), run_dir, run_dir.parent, log=log)


def trained(config, run_dir, **changes):
    """The folder of a run of one epoch."""
    train_alone(run(config, run_dir, n_epochs=1, **changes))
    return run_dir


def test_a_constant_temperature_is_the_one_given_on_resume(smoke, tmp_path):
    parent = trained(smoke, tmp_path / 'p', cf_loss=dict(call='DistillationLossConstTemp', T=4.0))
    resumed = run(smoke, tmp_path / 'r', n_epochs=2, parent_snapshot=str(parent),
                  cf_loss=dict(call='DistillationLossConstTemp', T=2.0))
    assert resumed.epoch == 1 and resumed.loss_fn.T == 2.0


def test_dbt_continues_its_temperature_only_from_dbt(smoke, tmp_path):
    dbt = trained(smoke, tmp_path / 'dbt', cf_loss=DBT_RISING)
    resumed = run(smoke, tmp_path / 'x', n_epochs=2, parent_snapshot=str(dbt), cf_loss=DBT_RISING)
    assert resumed.loss_fn.T > 1  # the parent's, not a fresh 1.0
    const = trained(smoke, tmp_path / 'const',
                    cf_loss=dict(call='DistillationLossConstTemp', T=4.0))
    from_const = run(smoke, tmp_path / 'y', n_epochs=2, parent_snapshot=str(const),
                     cf_loss=DBT_RISING)
    assert from_const.loss_fn.T == 1.0  # DBT starts at T = 1, not at the constant 4


def test_another_optimizer_cannot_take_over_the_state(smoke, tmp_path):
    parent = trained(smoke, tmp_path / 'p')
    with pytest.raises(ConfigError, match="cf_opt.call='Adam', but .* holds the state of SGD, "
                                          'which Adam cannot take over'):
        run(smoke, tmp_path / 'r', n_epochs=2, parent_snapshot=str(parent),
            cf_opt=dict(call='Adam', lr=1e-3))


def test_what_a_run_fills_in_is_no_change_of_settings(smoke, tmp_path):
    """cf_net.out_dim None (the data set's classes, which the run fills in) is no change when
    it resumes: only n_epochs changes."""
    said = []
    parent = trained(smoke, tmp_path / 'p', cf_net=dict(out_dim=None))
    resumed = run(smoke, tmp_path / 'r', said.append, n_epochs=2, parent_snapshot=str(parent),
                  cf_net=dict(out_dim=None))
    assert resumed.epoch == 1
    assert said == [f'resuming {parent}/last.pt at epoch 1; these settings change from epoch 2 '
                    'on: n_epochs 1 -> 2']
