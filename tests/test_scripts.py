"""train_cifar.py and eval.py through their command lines, in this process, on generated data,
on CPU (as processes of their own: tests/e2e/test_scripts.py)."""
import importlib
import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import RISING_T, assert_png, run_in_process
from multiexit import data
from multiexit.early_exit.rule import confidences
from multiexit.early_exit.thresholds import fit_thresholds, geometric_fractions
from multiexit.evaluate.calibration import fit_temperatures
from multiexit.evaluate.passes import exit_logits, load_model
from multiexit.metrics import metric_names

SMALL = ['smoke', 'cf_scheduler.milestones=[1]', RISING_T]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp('work')


@pytest.fixture(scope='module')
def trained(workdir):
    """Runs 1: 2 epochs; 2: 1 epoch; 3: run 2 resumed to 2 epochs; 4: eval of run 1."""
    snaps = workdir / 'snapshots'  # the scripts' default
    run = lambda script, *a: run_in_process(script, *a, cwd=workdir)
    procs = {
        'full': run('train_cifar.py', 'with', *SMALL, 'n_epochs=2', 'snapshot_name=full', 'seed=1'),
        'part': run('train_cifar.py', 'with', *SMALL, 'n_epochs=1', 'seed=1'),
        'resumed': run('train_cifar.py', 'with', *SMALL, 'n_epochs=2', 'parent_snapshot=2'),
        'eval': run('eval.py', 'with', 'snapshot_name=full'),
        'eval_id': run('eval.py', 'with', 'snapshot_name=1', 'checkpoint=last'),
    }
    return snaps, procs


def test_first_commands_print_no_sacred_warnings(trained):
    """A run id, an epoch number or the smoke config must not read as 'Changed type of config
    entry' warnings: the defaults have the types (or None) that users give. sacred's dict of
    the result is not printed either: a training run ends with a line of its own."""
    snaps, procs = trained
    for name, proc in procs.items():
        assert 'WARNING' not in proc.stderr and 'Result:' not in proc.stderr, \
            (name, proc.stderr[-2000:])
        script = 'eval' if name.startswith('eval') else 'train_cifar'
        assert f'INFO - {script} - Started run' in proc.stderr  # where a warning would be
    summary = procs['full'].stdout.strip().splitlines()[-1]
    assert summary == (f'snapshots/1: trained epochs 1 to 2; best validation top-1 (mean over '
                       f'exits) {100 * read(snaps / "1" / "run.json")["result"]["best_val_acc1_avg"]:.2f} % '
                       f'at epoch {read(snaps / "1" / "run.json")["result"]["best_epoch"]}; '
                       f'evaluate it with: python3 eval.py with snapshot_name=snapshots/1')


def test_run_files_are_strict_json(trained):
    """No NaN or Infinity, which json.loads takes but jq and JavaScript reject."""
    snaps, _ = trained

    def refuse(constant):
        raise ValueError(constant)
    files = [p for run in snaps.iterdir() if run.name.isdigit() for p in run.glob('*.json')]
    assert len(files) >= 12
    for path in files:
        json.loads(path.read_text(), parse_constant=refuse)


def test_left_behind_keys_are_silent_and_set_ones_one_warning(trained, workdir):
    """The grid's standard cells switch the loss: the default DBT keys stay in cf_loss and
    are dropped without a word; a key set on the command line that the loss ignores is one
    line. A named config that switches the network prints no sacred warnings either."""
    snaps, _ = trained
    # gpu=3 (none here) stops the run just after the warnings, before any training
    proc = run_in_process('train_cifar.py', 'with', 'smoke', 'cf_loss.call=ClassificationOnlyLoss',
                          'cf_loss.C=0.3', 'gpu=3', cwd=workdir, check=False)
    warnings = [line for line in proc.stderr.splitlines() if 'warn' in line.lower()]
    assert warnings == ['warning: cf_loss.C=0.3 is ignored: ClassificationOnlyLoss takes no C']
    assert proc.returncode == 2 and 'error: gpu=3 but this machine has' in proc.stderr
    config = run_in_process('train_cifar.py', 'print_config', 'with', 'resnet56', cwd=workdir)
    assert 'WARNING' not in config.stderr and "call = 'ResNet'" in config.stdout


def read(path):
    return json.loads(path.read_text())


def test_smoke_writes_a_complete_sacred_run(trained, workdir):
    snaps, procs = trained
    run = snaps / '1'
    for name in ('config.json', 'run.json', 'cout.txt', 'metrics.json', 'last.pt'):
        assert (run / name).is_file(), name
    assert (workdir / 'data' / 'smoke' / 'cifar-100-python' / 'train').is_file()
    assert read(run / 'run.json')['status'] == 'COMPLETED'
    assert read(run / 'config.json')['snapshot_name'] == 'full'


def test_metrics_logged_per_epoch(trained):
    snaps, _ = trained
    metrics = read(snaps / '1' / 'metrics.json')
    names = metric_names(3, (1, 5), with_temperature=True) + ['temperature']
    expected = {'train.loss', 'lr', 'temperature'} | {f'{s}.{n}' for s in ('train', 'val')
                                                      for n in names}
    assert expected <= set(metrics)
    assert all(metrics[k]['steps'] == [1, 2] for k in expected)
    # torch-0.4 schedule: the drop at milestone 1 applies from the second epoch on
    assert metrics['lr']['values'] == pytest.approx([0.1, 0.01])
    T = metrics['temperature']['values']
    assert metrics['train.temperature']['values'] == metrics['val.temperature']['values'] == T
    steps = [math.log(t) / math.log(1.05) for t in T]  # T is 1.05 to the number of raises
    assert steps == pytest.approx([round(n) for n in steps], abs=1e-6) and 0 < steps[0] <= steps[1]


def test_cout_has_the_table_but_no_progress_bars(trained):
    snaps, procs = trained
    cout = (snaps / '1' / 'cout.txt').read_text()
    assert 'val top-1 of exit' in cout and '\r' not in cout and 'it/s' not in cout
    header = cout.index('val top-1 of exit')  # the units and what the first columns average
    assert cout[:header].splitlines()[-2] == ('accuracies in %; trn@1, val@1 and val@5: the mean '
                                              'over the exits')
    assert 'it/s' in procs['full'].stderr  # the terminal did get a progress bar


def test_best_snapshot_is_kept(trained):
    snaps, _ = trained
    files = sorted(p.name for p in (snaps / '1').glob('ep*.pt'))
    assert len(files) == 1
    ckpt = torch.load(snaps / '1' / files[0], weights_only=True)
    metrics = read(snaps / '1' / 'metrics.json')['val.acc1_avg']['values']
    assert ckpt['val_metrics']['acc1_avg'] == max(metrics)
    assert ckpt['epoch'] == metrics.index(max(metrics)) + 1


def test_resume_continues_exactly(trained):
    snaps, procs = trained
    full = torch.load(snaps / '1' / 'last.pt', weights_only=True)
    resumed = torch.load(snaps / '3' / 'last.pt', weights_only=True)
    assert full['epoch'] == resumed['epoch'] == 2
    parent_T = torch.load(snaps / '2' / 'last.pt', weights_only=True)['loss']['temperature']
    assert parent_T > 1  # the resumed run has a temperature to continue from
    for k, v in full['model'].items():
        assert torch.equal(v, resumed['model'][k]), k
    assert torch.equal(full['loss']['temperature'], resumed['loss']['temperature'])
    assert full['optimizer']['param_groups'][0]['lr'] == resumed['optimizer']['param_groups'][0]['lr']
    a = read(snaps / '1' / 'metrics.json')
    b = read(snaps / '3' / 'metrics.json')
    assert b['train.loss']['steps'] == [2]
    assert b['train.loss']['values'] == pytest.approx(a['train.loss']['values'][1:], rel=1e-6)
    assert 'these settings change from epoch 2 on: n_epochs 1 -> 2\n' in procs['resumed'].stdout
    # resumed without the parent's config.json: the seed is the parent's, and recorded so
    assert read(snaps / '3' / 'config.json')['seed'] == read(snaps / '2' / 'config.json')['seed'] == 1


def newest(snaps):
    return max((p for p in snaps.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def test_resume_trains_with_the_settings_it_records(trained, workdir):
    """New optimizer and scheduler settings on resume take effect from the resumed epoch: the
    lr of every epoch follows the new config.json, the restored optimizer has the new
    momentum, and the resume line names each change."""
    snaps, _ = trained
    proc = run_in_process('train_cifar.py', 'with', str(snaps / '2' / 'config.json'),
                          'parent_snapshot=2', 'n_epochs=3', 'cf_opt.lr=0.05',
                          'cf_opt.momentum=0.5', 'cf_scheduler.milestones=[2]', cwd=workdir)
    run = newest(snaps)
    config = read(run / 'config.json')
    opt, sched = config['cf_opt'], config['cf_scheduler']
    assert (opt['lr'], opt['momentum'], sched['milestones']) == (0.05, 0.5, [2])
    metrics = read(run / 'metrics.json')
    assert metrics['lr']['steps'] == [2, 3]
    # 1-based epoch e runs at lr * gamma ** (milestones below e): the torch-0.4 schedule
    expected = [opt['lr'] * sched['gamma'] ** sum(m < e for m in sched['milestones'])
                for e in (2, 3)]
    assert metrics['lr']['values'] == pytest.approx(expected) == [0.05, 0.005]
    group = torch.load(run / 'last.pt', weights_only=True)['optimizer']['param_groups'][0]
    assert (group['momentum'], group['initial_lr']) == (0.5, 0.05)
    assert group['lr'] == pytest.approx(0.005)
    line = next(line for line in proc.stdout.splitlines() if line.startswith('resuming'))
    for change in ('cf_opt.lr 0.1 -> 0.05', 'cf_opt.momentum 0.9 -> 0.5',
                   'cf_scheduler.milestones [1] -> [2]', 'n_epochs 1 -> 3'):
        assert change in line, line


PER_EXIT = {f'{m}_clf{k}' for m in ('ece', 'ece_ts', 'temperature', 'macs', 'macs_all_heads',
                                    'params', 'ms_streaming', 'ms_latency') for k in range(3)} | {
    f'acc1_poe{k}' for k in range(3)}


def test_eval_prints_table_and_returns_metrics(trained):
    snaps, procs = trained
    out = procs['eval'].stdout
    assert 'top-1 %' in out and 'ensemble top-1 %' in out and 'ECE %' in out and 'MMACs' in out
    assert 'ECE TS %' in out and 'PoE top-1 %' in out
    assert 'ms streaming' in out and 'ms latency' in out
    eval_run = snaps / '4'
    result = read(eval_run / 'run.json')['result']
    assert set(result) == set(metric_names(3, (1, 5))) | PER_EXIT
    assert 0 <= result['acc1_avg'] <= 1


def test_eval_writes_anytime_and_budgeted_tables_and_figures(trained, workdir):
    snaps, _ = trained
    eval_run = snaps / '4'
    result = read(eval_run / 'run.json')['result']
    anytime = pd.read_csv(eval_run / 'anytime.csv')
    assert anytime['exit'].tolist() == [0, 1, 2]
    for k, row in anytime.iterrows():
        for col, key in (('acc1', 'acc1_clf'), ('acc1_poe', 'acc1_poe'), ('ece', 'ece_clf'),
                         ('macs', 'macs_clf'), ('ece_ts', 'ece_ts_clf'),
                         ('temperature', 'temperature_clf')):
            assert row[col] == pytest.approx(result[f'{key}{k}'])
    assert anytime['macs_all_heads'].is_monotonic_increasing
    for mode in ('streaming', 'latency'):  # measured time per image of each exit, in both modes
        times = anytime[f'ms_{mode}']
        assert times.iloc[0] > 0 and times.is_monotonic_increasing
        assert times.tolist() == pytest.approx([result[f'ms_{mode}_clf{k}'] for k in range(3)])
    budget = pd.read_csv(eval_run / 'budgeted.csv')
    assert set(budget['snapshot'].astype(str)) == {'full'}
    geometric = budget[budget['method'] == 'geometric']
    glob = budget[budget['method'] == 'global']
    assert len(geometric) and len(glob) and len(geometric) + len(glob) == len(budget)
    # more budget, more compute: on the fitting split for per-exit thresholds, everywhere for
    # a single one
    assert geometric['param'].is_monotonic_increasing
    assert geometric['val_avg_macs'].is_monotonic_increasing
    assert geometric['avg_macs'].iloc[0] < geometric['avg_macs'].iloc[-1]
    assert glob['avg_macs'].is_monotonic_increasing
    assert glob['avg_macs'].iloc[-1] == anytime['macs_all_heads'].iloc[-1]
    assert glob['acc1'].iloc[-1] == pytest.approx(result['acc1_clf2'])
    # the thresholds are fitted on the training run's validation split (its cf_val), not test
    model, _, _ = load_model(next((snaps / '1').glob('ep*.pt')), 'cpu')
    cf_val = read(snaps / '1' / 'config.json')['cf_val']
    val_loader = data.build(cf_val).loader('val', workdir / 'data' / 'smoke', 250, 'cpu')
    val_logits, val_labels = exit_logits(model, val_loader)
    val_conf = confidences(val_logits)[0]
    # and so are the temperatures of the temperature-scaled ECE
    assert anytime['temperature'].tolist() == pytest.approx(
        fit_temperatures(val_logits, val_labels), rel=1e-5)
    for row in geometric.itertuples():
        fitted = fit_thresholds(val_conf, geometric_fractions(3, row.param))
        assert [row.threshold0, row.threshold1] == pytest.approx(fitted[:2].tolist(), rel=1e-5)
    for mode in ('streaming', 'latency'):  # the budgeted curves in ms per image
        shares = budget[[f'exited{k}' for k in range(3)]].to_numpy()
        assert (shares @ anytime[f'ms_{mode}'].to_numpy()).tolist() == pytest.approx(
            budget[f'avg_ms_{mode}'].tolist())
    for name in ('anytime.png', 'budgeted.png', 'budgeted_ms.png'):
        assert_png(eval_run / name)


def test_eval_of_several_snapshots_overlays_them(trained, workdir):
    snaps, _ = trained
    proc = run_in_process('eval.py', 'with', "snapshot_name=['full', '2']", cwd=workdir)
    eval_run = workdir / proc.stdout.strip().splitlines()[-1].split(' to ')[-1]
    result = read(eval_run / 'run.json')['result']
    assert set(result) == {'full', '2'}
    assert all(set(r) == set(metric_names(3, (1, 5))) | PER_EXIT for r in result.values())
    untimed = lambda r: {k: v for k, v in r.items() if not k.startswith('ms_')}  # measured
    earlier = read(snaps / '4' / 'run.json')['result']
    assert untimed(result['full']) == pytest.approx(untimed(earlier))
    for name in ('anytime.csv', 'budgeted.csv'):
        assert set(pd.read_csv(eval_run / name)['snapshot'].astype(str)) == {'full', '2'}
    assert_png(eval_run / 'budgeted.png')


def test_eval_names_the_run_a_name_took_and_labels_figures_by_run_name_and_method(trained,
                                                                                 monkeypatch):
    snaps, procs = trained
    assert "snapshot_name='full': run 1 (COMPLETED)" in procs['eval'].stdout
    script = importlib.import_module('eval')
    monkeypatch.setattr(script, 'SNAPSHOT_DIR', str(snaps))
    assert script.snapshot_label('full') == 'DBT: full (run 1)'
    assert script.snapshot_label('2') == 'DBT: smoke (run 2)'  # the smoke config's name
    best = next((snaps / '1').glob('ep*.pt'))
    assert script.snapshot_label(str(best)) == f'DBT: full (run 1, {best.stem})'


def test_eval_of_a_named_run_without_checkpoint_or_without_a_name_says_so(tmp_path):
    snaps = tmp_path / 'snapshots'  # the scripts' default, which the messages name as given
    (snaps / '1').mkdir(parents=True)  # a training run that failed before its first epoch
    (snaps / '1' / 'config.json').write_text(json.dumps({'snapshot_name': 'broken'}))
    (snaps / '1' / 'run.json').write_text(json.dumps({'status': 'FAILED',
                                                      'experiment': {'name': 'train_cifar'}}))
    for args, message in (
            (['with', 'snapshot_name=broken'],
             "error: snapshot_name='broken' is the name of training run 1 (FAILED) in snapshots/, "
             'but no epoch of it finished, so there is no checkpoint'),
            ([], 'error: no snapshot_name given, and no training run in snapshots/ has the '
                 'default one, test:0 (the name of a training run that sets none): set '
                 'snapshot_name=')):
        proc = run_in_process('eval.py', *args, cwd=tmp_path, check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
        assert errors[0].startswith(message)


def test_eval_accepts_run_dir_and_checkpoint_path(trained, workdir):
    snaps, _ = trained
    ckpt = next((snaps / '1').glob('ep*.pt'))
    for name in (str(snaps / '1'), str(ckpt)):
        proc = run_in_process('eval.py', 'with', f'snapshot_name={name}', cwd=workdir)
        assert str(ckpt) in proc.stdout


# refused before a run starts (sacred's config hook, or sacred itself): checked in this process
CONFIG_REFUSALS = [
    ('eval.py', ['snapshot=1'], 'unknown setting snapshot (did you mean snapshot_name?)'),
    ('train_cifar.py', ['smoke', 'n_epochs=-3'], 'n_epochs=-3: expected an integer >= 1'),
    ('train_cifar.py', ['smoke', 'n_epochs=0'], 'n_epochs=0: expected an integer >= 1'),
    ('train_cifar.py', ['smoke', 'n_epoch=1'], 'unknown setting n_epoch (did you mean n_epochs?)'),
    ('train_cifar.py', ['smok'], "no named config or config file 'smok' (did you mean smoke?)"),
    ('train_cifar.py', ['smoke', 'cf_loss.C=high'], "cf_loss.C='high': expected a number in [0, 1]"),
    ('train_cifar.py', ['smoke', 'cf_opt.lr=[0.1]'], 'cf_opt.lr=[0.1]: expected a number > 0'),
    ('train_cifar.py', ['smoke', 'cf_scheduler.milestones=5'],
     'cf_scheduler.milestones=5: expected a list of integers >= 0'),
    ('train_cifar.py', ['smoke', 'cf_net.call=ResNet9000'], "cf_net.call='ResNet9000': unknown"),
    ('train_cifar.py', ['smoke', 'parent_snapshot=404'], "no snapshot '404'"),
]
# refused once the run has started (by the data, a snapshot, the model): a script each
RUN_REFUSALS = [
    ('eval.py', ['snapshot_name=nowhere'], "no snapshot 'nowhere'"),
    ('eval.py', ['snapshot_name=1', 'cf_loss.acc_tops=[1,101]'],
     'cf_loss acc_tops=[1, 101]: top-101 needs as many classes, '),
    ('eval.py', ['snapshot_name=1', 'time_repeats=-1'], 'time_repeats must be an int >= 0'),
    ('train_cifar.py', ['smoke', 'cf_trn.n_per_class=40'],
     'cf_trn asks for n_per_class=40 images per class, but class 0 of data/smoke/cifar-100-python '
     'has 30; lower n_per_class'),
    ('train_cifar.py', ['semisup', 'smoke'],  # a smoke-sized one: cf_trn.n_unl_per_class=10
     'cf_trn asks for n_per_class=20 + n_unl_per_class=350 = 370 images per class, but class 0 '),
    ('train_cifar.py', [str(Path('snapshots') / '1' / 'config.json'), 'parent_snapshot=1'],
     'has trained 2 epochs already and n_epochs=2: there is nothing to train; to train longer: '),
    ('train_cifar.py', ['smoke', 'cf_loss.n_exits=5'], 'cf_loss n_exits=5 but the model has 3'),
    ('train_cifar.py', ['smoke', 'gpu=3'], 'gpu=3 but this machine has'),
    ('train_cifar.py', ['smoke', 'gpu=[0, 1]'], 'under torchrun: torchrun --nproc_per_node=2 '),
]


def assert_one_error_line(code, stderr, message):
    assert code == 2
    errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert 'Traceback' not in stderr


@pytest.mark.parametrize('script, args, message', CONFIG_REFUSALS)
def test_bad_settings_are_one_line_before_a_run_starts(trained, workdir, monkeypatch, capsys,
                                                        script, args, message):
    snaps, _ = trained
    monkeypatch.chdir(workdir)  # snapshots/ there is the scripts' default, and the trained runs
    before = sorted(p.name for p in snaps.iterdir())
    ex = importlib.import_module(Path(script).stem).ex
    with pytest.raises(SystemExit) as e:
        ex.run_commandline([script, 'with', *args])
    assert_one_error_line(e.value.code, capsys.readouterr().err, message)
    assert before == sorted(p.name for p in snaps.iterdir())  # no run folder


@pytest.mark.parametrize('script, args, message', RUN_REFUSALS)
def test_bad_input_is_one_line_and_nonzero_exit(trained, workdir, monkeypatch, capsys, script,
                                                args, message):
    """Refused once the run has started (data, snapshots, devices): in this process, as the
    script's command line runs it (a script start costs seconds; ``CONFIG_REFUSALS``)."""
    snaps, _ = trained
    monkeypatch.chdir(workdir)  # snapshots/ there is the scripts' default, and the trained runs
    argv = [script, 'with', *args]
    monkeypatch.setattr(sys, 'argv', argv)  # the torchrun hint repeats the command line
    before = sorted(p.name for p in snaps.iterdir())
    ex = importlib.import_module(Path(script).stem).ex
    with pytest.raises(SystemExit) as e:
        ex.run_commandline(argv)
    assert_one_error_line(e.value.code, capsys.readouterr().err, message)
    # nothing written earlier is lost, and the refused run leaves no folder
    assert before == sorted(p.name for p in snaps.iterdir())


def test_missing_data_whose_download_fails_is_one_line(tmp_path, no_download):
    proc = run_in_process('train_cifar.py', 'with', 'data_dir=empty', 'n_epochs=1', cwd=tmp_path,
                          check=False, env=no_download)
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert 'no cifar-100-python/ in empty and the download failed' in errors[0]
    assert 'Connection refused' in errors[0]  # our proxy's refusal, not a lack of network
    assert 'Traceback' not in proc.stderr


def test_semi_supervised_run(tmp_path):
    snaps = tmp_path / 'snapshots'
    run_in_process('train_cifar.py', 'with', 'smoke', 'cf_trn.n_unl_per_class=5',
                   'cf_trn.lab_unl_ratio=[1, 1]', cwd=tmp_path)
    config = read(snaps / '1' / 'config.json')
    assert config['cf_val']['n_unl_per_class'] == 5  # the validation split matches training's
    assert read(snaps / '1' / 'run.json')['status'] == 'COMPLETED'
