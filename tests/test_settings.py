"""multiexit.config and multiexit.checks: every setting written once, its type and range checked
before anything is built; the scripts' settings, the checks and the resume comparison agree."""
import dataclasses
import importlib

import pytest

from multiexit import checks
from multiexit.checks import Section
from multiexit.config import (FIELDS, PACK_SHARED, RUN_SETTINGS, SHARED, TrainConfig,
                              shared_defaults, shared_docs)
from multiexit.errors import ConfigError


def defaults(script):
    """The configuration a training script runs with when nothing is changed."""
    config = {}
    for scope in importlib.import_module(script).ex.configurations:
        config.update(scope(preset=config))
    return config


def with_value(config, key, value):
    section, _, sub = key.rpartition('.')
    changed = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    (changed[section] if section else changed)[sub] = value
    return changed


RULES = {f.name: f.metadata['rule'] for f in FIELDS if f.metadata['rule'] is not None}


@pytest.mark.parametrize('script', ['train_cifar', 'train_imagenet'])
def test_the_defaults_pass(script):
    TrainConfig.check(defaults(script))
    TrainConfig.of(dict(defaults(script), seed=0))


def bad_values():
    """(key, bad value) for every rule: a wrong type, and a value out of its range."""
    out = []
    for key, rule in RULES.items():
        rules = rule.rules.items() if isinstance(rule, Section) else [(None, rule)]
        for sub, (what, ok) in rules:
            name = f'{key}.{sub}' if sub else key
            candidates = ['abc', 3, -1, 0, 1.5, [0.1], 5, float('nan'), True]
            out += [(name, v) for v in candidates if not ok(v)][:3]
    return out


# the classes that take the settings the defaults' SGD, MultiStepLR and Cifar100 do not
CALLS = {'cf_opt.eps': 'Adam', 'cf_opt.betas': 'Adam', 'cf_opt.amsgrad': 'Adam',
         'cf_opt.alpha': 'RMSprop', 'cf_scheduler.step_size': 'StepLR',
         'cf_scheduler.T_max': 'CosineAnnealingLR', 'cf_scheduler.eta_min': 'CosineAnnealingLR',
         'cf_loss.T': 'DistillationLossConstTemp'}


@pytest.mark.parametrize('key, value', bad_values())
def test_every_bad_value_names_the_key_the_value_and_what_is_expected(key, value):
    config = defaults('train_imagenet' if key.endswith(('image_size', 'n_workers'))
                      else 'train_cifar')
    if key in CALLS:
        config = with_value(config, f'{key.partition(".")[0]}.call', CALLS[key])
    with pytest.raises(ConfigError) as e:
        TrainConfig.check(with_value(config, key, value))
    assert str(e.value).startswith(f'{key}={value!r}: expected ')


def test_sacred_containers_do_not_show_in_the_message():
    from sacred.config.custom_containers import ReadOnlyList

    config = with_value(defaults('train_cifar'), 'cf_opt.lr', ReadOnlyList([0.1]))
    with pytest.raises(ConfigError, match=r'^cf_opt.lr=\[0.1\]: expected a number > 0$'):
        TrainConfig.check(config)


@pytest.mark.parametrize('key, value, message', [
    ('cf_opt.call', 'Adamm', "cf_opt.call='Adamm': not a class of torch.optim (did you mean Adam?)"),
    ('cf_scheduler.call', 'Counter', "cf_scheduler.call='Counter': not a class of"),
    ('cf_loss.call', 'DBT', "cf_loss.call='DBT': unknown"),
    ('cf_opt.lrr', 0.1, 'cf_opt.lrr: SGD takes no such setting (did you mean lr?)'),
    ('cf_trn.n_per_clas', 10, 'cf_trn.n_per_clas: Cifar100 takes no such setting (did you mean '
                              'n_per_class?)'),
    ('cf_net.nplanes_mul', [1], 'did you mean nplanes_mulv?'),
    ('cf_trn.nval_per_class', 150, 'cf_trn.nval_per_class=150 must be below cf_trn.n_per_class'),
    ('cf_trn.n_unl_per_class', 10, 'needs cf_trn.lab_unl_ratio'),
])
def test_unknown_calls_and_keys_and_inconsistent_sizes(key, value, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig.check(with_value(defaults('train_cifar'), key, value))
    assert message in str(e.value)


def test_ignored_keys_are_those_the_call_does_not_take():
    cf_loss = dict(defaults('train_cifar')['cf_loss'], call='ClassificationOnlyLoss')
    assert checks.ignored_keys('cf_loss', cf_loss, {'C', 'acc_tops', 'nope'}) == ['C']
    assert checks.ignored_keys('cf_loss', cf_loss, {'call', 'n_exits'}) == []


@pytest.mark.parametrize('script', ['train_cifar', 'train_imagenet'])
def test_every_setting_of_the_defaults_has_a_rule(script):
    """cf_net's values are its model's to check, gpu's resolve_device's; names are free text."""
    for key, value in defaults(script).items():
        if key in ('cf_net', 'gpu', 'snapshot_name', 'parent_snapshot'):
            continue
        if isinstance(value, dict):
            assert {k for k in value if k != 'call'} <= set(RULES[key].rules), key
        else:
            assert key in RULES, key


def test_a_train_config_checks_itself_when_made():
    config = dict(defaults('train_cifar'), seed=0)
    assert TrainConfig(**config).n_epochs == 300
    with pytest.raises(ConfigError, match=r'^n_epochs=0: expected an integer >= 1$'):
        TrainConfig(**dict(config, n_epochs=0))


@pytest.mark.parametrize('script', ['train_cifar', 'train_imagenet'])
def test_the_scripts_settings_are_the_train_config(script):
    """Every setting of a training script is a field of TrainConfig and back (sacred adds
    ``seed``); the shared ones have the config's defaults, and print_config shows its
    comments."""
    config = defaults(script)
    assert set(config) | {'seed'} == {f.name for f in FIELDS}
    assert {k: config[k] for k in SHARED} == shared_defaults()
    docs = {}
    for scope in importlib.import_module(script).ex.configurations:
        docs.update(scope(preset=config).docs)
    assert {k: docs[k] for k in SHARED} == shared_docs()
    assert all(shared_docs().values())


def test_the_resume_comparison_and_the_pack_derive_from_the_train_config():
    """A resume compares what a run is built from: every field but the scripts' own; the
    settings a pack shares are among those."""
    script_only = {f.name for f in FIELDS if f.metadata['script']}
    assert script_only == {'snapshot_name', 'parent_snapshot', 'generate_fake_data',
                           'ddp_timeout_s'}
    assert set(RUN_SETTINGS) == {f.name for f in FIELDS} - script_only
    assert set(PACK_SHARED) < set(RUN_SETTINGS)
    assert {'cf_loss', 'cf_trn', 'cf_val', 'seed', 'data_dir', 'save_interval'}.isdisjoint(
        PACK_SHARED)
    config = TrainConfig(**{f.name: defaults('train_cifar').get(f.name, 0) for f in FIELDS})
    assert list(config.run_settings()) == list(RUN_SETTINGS)
    assert dataclasses.replace(config, snapshot_name='x').run_settings() == config.run_settings()
