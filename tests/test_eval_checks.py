"""eval.py checks a snapshot against the data it is to be tested on, before any image is read:
the model's classes and input size against the test split and the validation split that fits
its thresholds; and a training run's config.json that cannot be read is an error that names
it, never the default settings. Each refusal is one line, exit 2, no run folder, no run
announced. In process, through eval.py's command line, on snapshots written here."""
import importlib
import json

import pytest
import torch

from multiexit import models
from multiexit.config import PAPER_NET
from multiexit.data import cifar
from multiexit.data.folders import write_fake_image_folders
from multiexit.train.checkpoint import model_snapshot, save_atomic

EVAL = importlib.import_module('eval').ex
SMOKE_NET = dict(PAPER_NET, n_exits=3, nlayers_to_exit=2, nlayers_between_exits=1,
                 nplanes_mulv=[2, 4, 8], exit_width=16, btneck_widths=[2, 2, 2])


def trained_on(run_dir, call, config=True):
    """A run folder as training writes it, of the smoke network trained on ``call``; with
    ``config``, its config.json."""
    n_classes = cifar.dataset_spec(call).n_classes
    net = dict(SMOKE_NET, out_dim=n_classes)
    torch.manual_seed(0)
    run_dir.mkdir(parents=True)
    save_atomic(model_snapshot(models.build(net), net, 1, {'acc1_avg': 0.5}), run_dir / 'ep1.pt')
    cf_trn = dict(call=call, n_per_class=8, nval_per_class=2, augment=True, seed=0,
                  n_unl_per_class=0, lab_unl_ratio=[0, 0])
    if config:
        (run_dir / 'config.json').write_text(json.dumps(dict(
            cf_net=net, cf_trn=cf_trn, cf_val=dict(cf_trn, augment=False), data_dir='data',
            snapshot_name=f'{call.lower()}:0')))
    return run_dir


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder (snapshots/ there is eval.py's default) with generated CIFAR-10 and
    CIFAR-100 in data/, and run 1 trained on CIFAR-10, run 2 on CIFAR-100."""
    monkeypatch.chdir(tmp_path)
    for call in ('Cifar10', 'Cifar100'):
        cifar.write_fake_cifar(tmp_path / 'data', call, n_train_per_class=10, n_test_per_class=2)
    trained_on(tmp_path / 'snapshots' / '1', 'Cifar10')
    trained_on(tmp_path / 'snapshots' / '2', 'Cifar100')
    return tmp_path


@pytest.fixture
def no_image_read(monkeypatch):
    """Reading a CIFAR file fails the test: a refusal must come before."""
    def read(path):
        raise AssertionError(f'{path} was read before the check')
    monkeypatch.setattr(cifar, '_unpickle', read)


def run_folders(work):
    return sorted(p.name for p in (work / 'snapshots').iterdir() if p.name.isdigit())


def refused(work, capsys, caplog, *args):
    """(the error line, stdout) of ``eval.py with *args``, which must be refused as bad input:
    one line, exit 2, no new run folder, no run announced."""
    before = run_folders(work)
    with pytest.raises(SystemExit) as e:
        EVAL.run_commandline(['eval.py', 'with', 'time_repeats=0', *args])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert e.value.code == 2 and len(errors) == 1, err
    assert 'Traceback' not in err
    assert run_folders(work) == before
    assert not [r for r in caplog.records if 'Started run' in r.getMessage()]
    return errors[0], out


def test_a_10_class_model_on_cifar100_is_refused_before_any_image_is_read(
        work, no_image_read, capsys, caplog):
    error, _ = refused(work, capsys, caplog, 'snapshot_name=1', 'cf_test.call=Cifar100')
    assert "snapshots/1/ep1.pt classifies 10 classes but cf_test call='Cifar100' has 100" in error
    assert "leave cf_test unset to use the training run's (Cifar10)" in error


def test_a_100_class_model_on_cifar10_is_refused(work, no_image_read, capsys, caplog):
    error, _ = refused(work, capsys, caplog, 'snapshot_name=2', 'cf_test.call=Cifar10')
    assert "classifies 100 classes but cf_test call='Cifar10' has 10" in error


def test_thresholds_fitted_on_a_validation_split_of_other_classes_are_refused(
        work, no_image_read, capsys, caplog):
    error, _ = refused(work, capsys, caplog, 'snapshot_name=2',
                    "cf_val={'call': 'Cifar10', 'n_per_class': 8, 'nval_per_class': 2}")
    assert "classifies 100 classes but cf_val call='Cifar10' has 10" in error


def test_of_several_snapshots_one_that_does_not_fit_is_refused_before_any_is_evaluated(
        work, no_image_read, capsys, caplog):
    error, _ = refused(work, capsys, caplog, "snapshot_name=['1', '2']", 'cf_test.call=Cifar10')
    assert 'snapshots/2/ep1.pt classifies 100 classes' in error


def test_another_input_size_is_refused(work, no_image_read, capsys, caplog):
    # an image folder of CIFAR-10's 10 classes, read at ImageFolder's default 224x224
    write_fake_image_folders(work / 'data' / 'folders', n_classes=10, n_train_per_class=2,
                             n_val_per_class=1)
    error, _ = refused(work, capsys, caplog, 'snapshot_name=1', 'cf_test.call=ImageFolder',
                    'data_dir=data/folders')
    assert ("snapshots/1/ep1.pt takes images of 32x32 but cf_test call='ImageFolder' gives "
            "224x224") in error


def test_a_data_dir_that_is_a_file_is_refused(work, no_image_read, capsys, caplog):
    (work / 'afile').write_text('')
    error, _ = refused(work, capsys, caplog, 'snapshot_name=1', 'data_dir=afile')
    assert 'data_dir=afile is not a folder' in error


@pytest.mark.parametrize('text', ['{"cf_trn": ', '[1, 2]'])
def test_an_unreadable_config_json_is_named_not_replaced_by_the_defaults(work, capsys, caplog,
                                                                         text):
    (work / 'snapshots' / '1' / 'config.json').write_text(text)
    error, _ = refused(work, capsys, caplog, 'snapshot_name=1')
    assert 'snapshots/1/config.json, the settings that run 1 recorded, is unreadable' in error
    assert 'restore the file, or remove it and give them: cf_test.call' in error


def test_a_snapshot_without_config_json_says_it_takes_the_papers_data(work, capsys, caplog):
    trained_on(work / 'elsewhere', 'Cifar100', config=False)
    # the paper's data ask for 150 training images per class, which the generated data lack
    error, out = refused(work, capsys, caplog, 'snapshot_name=elsewhere/ep1.pt')
    assert 'n_per_class=150' in error
    assert ("no config.json beside elsewhere/ep1.pt (not in a training run's folder): the data "
            "are the paper's unless set") in out


def test_a_model_on_its_own_data_is_evaluated_and_announced_once_it_passed(work, capsys,
                                                                           caplog):
    refused(work, capsys, caplog, 'snapshot_name=1', 'cf_test.call=Cifar100')
    result = EVAL.run_commandline(['eval.py', 'with', 'time_repeats=0', 'snapshot_name=1']).result
    assert 0 <= result['acc1_avg'] <= 1
    started = [r.getMessage() for r in caplog.records if 'Started run' in r.getMessage()]
    assert started == ['Started run with ID "3"']  # the refused one had no id to reuse
    assert (work / 'snapshots' / '3' / 'anytime.csv').is_file()


def test_a_crash_after_a_refusal_is_recorded_and_its_run_announced(work, capsys, caplog,
                                                                   monkeypatch):
    """A crash (a bug, not bad input) keeps its FAILED run folder, and says which run it was
    before sacred's "Failed after": nothing of the refused run before it carries over."""
    refused(work, capsys, caplog, 'snapshot_name=1', 'cf_test.call=Cifar100')

    def crash(*args, **kwargs):
        raise RuntimeError('a bug')
    monkeypatch.setattr(importlib.import_module('eval'), 'exit_logits', crash)
    with pytest.raises(RuntimeError):
        EVAL.run_commandline(['eval.py', 'with', 'time_repeats=0', 'snapshot_name=1', '--debug'])
    assert json.loads((work / 'snapshots' / '3' / 'run.json').read_text())['status'] == 'FAILED'
    said = [r.getMessage() for r in caplog.records]
    assert said[-2:] == ['Started run with ID "3"', said[-1]] and 'Failed after' in said[-1]
