"""Commands refused before they train: a data_dir that is not a folder, a snapshots folder that
cannot be written, a config file that cannot be read, a parent run whose config.json cannot be
read. Each is one ``error:`` line that says what is wrong, exit code 2, no run folder left and
no run announced (sacred's ``Started run with ID``, which the next run would reuse). In
process, through the scripts' command lines, with the smoke settings."""
import importlib
import json

import pytest
import torch

import sacred_setup  # first: it quiets the warning that importing sacred prints
import training_experiment

TRAIN = importlib.import_module('train_cifar').ex


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snapshots/ there is the scripts' default
    (tmp_path / 'afile').write_text('not a folder')
    return tmp_path


def run_folders(work):
    snapshots = work / 'snapshots'
    return sorted(p.name for p in snapshots.iterdir() if p.name.isdigit()) if (
        snapshots.is_dir()) else []


def refused(work, capsys, caplog, run, before=()):
    """The one error line of ``run()``, which must refuse: exit 2, no traceback, no run folder
    but those ``before``, no run announced."""
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert e.value.code == 2 and len(errors) == 1, err
    assert 'Traceback' not in err
    assert run_folders(work) == list(before)
    assert not [r for r in caplog.records if 'Started run' in r.getMessage()]
    return errors[0]


def train(*args):
    return lambda: TRAIN.run_commandline(['train_cifar.py', 'with', *args])


@pytest.mark.parametrize('args', [
    ['smoke', 'data_dir=afile'],  # generated data: once a FileExistsError traceback
    ['smoke', 'data_dir=afile', 'generate_fake_data=False'],  # once "the download failed"
    ['smoke', 'data_dir=afile/cifar'],
    ['smoke', 'data_dir=afile', 'cf_trn.call=ImageFolder', 'cf_val.call=ImageFolder'],
])
def test_a_data_dir_that_is_not_a_folder_is_said_to_be_one(work, capsys, caplog, args):
    error = refused(work, capsys, caplog, train(*args))
    data_dir = args[1].partition('=')[2]
    assert f'data_dir={data_dir} is not a folder' in error
    assert ('(afile is not a folder)' in error) == (data_dir != 'afile')
    assert 'download it' not in error and 'torchvision' not in error  # no advice that fails


def test_a_pack_with_such_a_data_dir_announces_no_run(work, capsys, caplog):
    error = refused(work, capsys, caplog, lambda: training_experiment.run_pack(
        TRAIN, [['smoke', 'data_dir=afile'], ['smoke', 'data_dir=afile', 'seed=1']],
        'train_cifar.py'))
    assert 'data_dir=afile is not a folder' in error


def unwritable_file(work, monkeypatch):
    (work / 'snapshots').write_text('')  # where the run folders go is a regular file


def unwritable_under_a_file(work, monkeypatch):
    for observer in TRAIN.observers:
        monkeypatch.setattr(observer, 'basedir', 'afile/snapshots')


def unwritable_permission(work, monkeypatch):
    """What a user without write permission gets (tests run as root, which has it anyway)."""
    def denied(self, _id):
        raise PermissionError(13, 'Permission denied', f'{self.basedir}/{_id}')
    monkeypatch.setattr(sacred_setup.FileStorageObserver, '_make_dir', denied)


@pytest.mark.parametrize('unwritable', [unwritable_file, unwritable_under_a_file,
                                        unwritable_permission])
def test_a_snapshots_folder_that_cannot_be_written_is_one_line(work, capsys, caplog,
                                                               monkeypatch, unwritable):
    unwritable(work, monkeypatch)
    error = refused(work, capsys, caplog, train('smoke'))
    assert 'cannot write a run folder in ' in error
    assert 'a writable folder, or set MULTIEXIT_SNAPSHOTS=' in error


@pytest.fixture
def parent(work):
    """Run 45: a training state (last.pt) beside a config.json."""
    run = work / 'snapshots' / '45'
    run.mkdir(parents=True)
    torch.save({'epoch': 1}, run / 'last.pt')
    (run / 'config.json').write_text(json.dumps({'snapshot_name': 'smoke'}))
    return run


@pytest.mark.parametrize('text, problem', [('{"n_epochs": 2', 'JSONDecodeError'),
                                           ('[2]', 'holds a list, not settings')])
def test_a_config_file_that_cannot_be_read_is_named(work, parent, capsys, caplog, text,
                                                    problem):
    (parent / 'config.json').write_text(text)
    error = refused(work, capsys, caplog, train('snapshots/45/config.json', 'parent_snapshot=45'),
                    before=['45'])
    assert 'the config file snapshots/45/config.json' in error and problem in error


def test_a_parent_whose_config_json_cannot_be_read_is_refused(work, parent, capsys, caplog):
    (parent / 'config.json').write_text('{"cf_opt": ')
    error = refused(work, capsys, caplog, train('smoke', 'parent_snapshot=45'), before=['45'])
    assert 'snapshots/45/config.json, the settings that run 45 recorded, is unreadable' in error
    assert 'restore the file, or remove it' in error


def test_a_refusal_leaves_the_log_of_the_next_run_alone(work, capsys, caplog):
    """refuse() once silenced the experiment's logger for good: a later run in the same process
    logged nothing."""
    refused(work, capsys, caplog, train('smoke', 'data_dir=afile'))
    run = sacred_setup.Experiment._create_run(TRAIN, config_updates={'data_dir': 'x'},
                                              named_configs=['smoke'])
    run.run_logger.info('Started run with ID "1"')
    run.run_logger.info('Completed after 0:00:01')
    said = [r.getMessage() for r in caplog.records]
    assert said[-2:] == ['Started run with ID "1"', 'Completed after 0:00:01']


def test_a_parent_without_config_json_resumes_saying_there_was_nothing_to_compare(
        work, capsys):
    """Once "resumes exactly, with the settings it was trained with", which nothing recorded."""
    from multiexit import models
    from multiexit.train.checkpoint import model_snapshot, save_atomic

    net = dict(TRAIN._create_run(named_configs=['smoke']).config['cf_net'], out_dim=100)
    (work / 'elsewhere').mkdir()
    save_atomic(model_snapshot(models.build(net), net, 1, {}), work / 'elsewhere' / 'ep1.pt')
    small = ['cf_trn.n_per_class=6', 'cf_val.n_per_class=6', 'batch_size=50']  # one step
    train('smoke', 'parent_snapshot=elsewhere/ep1.pt', 'n_epochs=2', *small)()
    out = capsys.readouterr().out
    assert ('resuming from the weights of elsewhere/ep1.pt at epoch 1 (optimizer state and '
            'temperature start afresh); no config.json beside it, so the settings it was trained '
            'with are unknown: it continues with those given') in out
