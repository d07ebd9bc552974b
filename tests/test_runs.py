"""multiexit.runs: sacred run folders as a table, filters, the command line and training curves."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT, pythonpath
from multiexit.errors import ConfigError, SnapshotError
from multiexit.runs import load_runs, metric_summary, parse_filter, plot_curves, select
from test_anytime import assert_png

VAL_AVG = [0.10, 0.30, 0.20]  # the best epoch is 2, not the last
TRAIN_CONFIG = {'snapshot_name': 'grid/dbt/n25/s0', 'seed': 0, 'n_epochs': 3, 'amp': False,
                'cf_loss': {'call': 'DistillationLossConstTemp', 'T': 4.0, 'C': 0.5,
                            'n_exits': None},
                'cf_trn': {'n_per_class': 75, 'nval_per_class': 50, 'lab_unl_ratio': [1, 1]}}


def sacred_metrics(columns):
    steps = list(range(1, len(next(iter(columns.values()))) + 1))
    return {name: {'steps': steps, 'timestamps': ['2026-01-01T00:00:00'] * len(steps),
                   'values': values} for name, values in columns.items()}


def write_run(folder, config=None, run=None, metrics=None):
    """A run folder as sacred's FileStorageObserver writes it; a str is written as is."""
    folder.mkdir(parents=True)
    for name, content in (('config.json', config), ('run.json', run), ('metrics.json', metrics)):
        if content is not None:
            text = content if isinstance(content, str) else json.dumps(content)
            (folder / name).write_text(text)


def run_json(experiment, result, named=(), status='COMPLETED'):
    return {'experiment': {'name': experiment}, 'status': status,
            'start_time': '2026-01-01T10:00:00.000000', 'stop_time': '2026-01-01T10:01:30.000000',
            'meta': {'named_configs': list(named)}, 'result': result}


@pytest.fixture(scope='module')
def snaps(tmp_path_factory):
    root = tmp_path_factory.mktemp('runs') / 'snapshots'
    metrics = sacred_metrics({
        'val.acc1_avg': VAL_AVG, 'val.acc1_clf0': [0.05, 0.25, 0.15],
        'val.acc1_clf1': [0.15, 0.35, 0.25], 'train.acc1_clf0': [0.1, 0.4, 0.6],
        'train.acc1_clf1': [0.2, 0.5, 0.7], 'lr': [0.1, 0.1, 0.01],
        'temperature': [1.0, 1.2, 1.5]})
    write_run(root / '1', TRAIN_CONFIG, run_json('train_cifar', {'best_epoch': 2}, ['smoke']),
              metrics)
    write_run(root / '2', {'snapshot_name': 1, 'checkpoint': 'best'},
              run_json('eval', {'acc1_clf0': 0.21, 'acc1_clf1': 0.33}), {})
    write_run(root / '10', {'snapshot_name': 'other', 'seed': 5},
              run_json('train_cifar', None, status='FAILED'))
    write_run(root / '3', '{"seed": 1,', run_json('train_cifar', None))  # garbled config
    write_run(root / '4', {'seed': 1})  # no run.json: sacred had not started it
    write_run(root / '5', {'seed': 1}, '[1, 2]')  # not an object
    write_run(root / '6', {'seed': 1}, run_json('train_cifar', None), '{"lr": 3}')
    write_run(root / '_sources')  # sacred's copies of the sources: not a run
    return root


@pytest.fixture(scope='module')
def table(snaps):
    warnings = []
    return load_runs(snaps, warn=warnings.append), warnings


def test_one_row_per_readable_run_in_id_order(table):
    runs, _ = table
    assert list(runs['run']) == ['1', '2', '10']
    assert list(runs['experiment']) == ['train_cifar', 'eval', 'train_cifar']
    assert list(runs['status']) == ['COMPLETED', 'COMPLETED', 'FAILED']
    assert runs['duration_s'].tolist() == [90.0] * 3
    assert runs['named_configs'].tolist() == ['smoke', '', '']


def test_malformed_run_folders_are_skipped_with_a_warning(table, snaps):
    _, warnings = table
    expected = {'3': 'config.json is not valid JSON (', '4': 'no run.json (not a sacred run',
                '5': 'run.json is not a JSON object', '6': "metrics.json is not sacred's"}
    assert len(warnings) == len(expected)
    for warning, (run, reason) in zip(warnings, expected.items()):
        assert warning.startswith(f'skipped {snaps / run}: {reason}')


def test_config_is_flattened_to_dotted_keys(table):
    train = table[0].set_index('run').loc['1']
    assert train['cf_loss.call'] == 'DistillationLossConstTemp'
    assert train['cf_loss.T'] == 4.0 and train['cf_trn.n_per_class'] == 75
    assert json.loads(train['cf_trn.lab_unl_ratio']) == [1, 1]  # one cell, JSON text
    assert train['result.best_epoch'] == 2


def test_final_and_best_epoch_metrics(table):
    train = table[0].set_index('run').loc['1']
    best = VAL_AVG.index(max(VAL_AVG))
    assert train['final_epoch'] == 3 and train['best_epoch'] == best + 1
    assert train['final.val.acc1_clf1'] == 0.25 and train['best.val.acc1_clf1'] == 0.35
    assert train['best.temperature'] == 1.2 and train['final.lr'] == 0.01



def test_best_epoch_is_the_first_of_a_tie_as_training_keeps_it():
    frame = pd.DataFrame({'val.acc1_avg': [0.1, 0.3, 0.2, 0.3],
                          'val.acc1_clf0': [0.1, 0.2, 0.3, 0.4]}, index=[1, 2, 3, 4])
    summary = metric_summary(frame)
    assert summary['best_epoch'] == 2 and summary['best.val.acc1_clf0'] == 0.2
    assert summary['final_epoch'] == 4 and summary['final.val.acc1_clf0'] == 0.4

def test_evaluation_results_are_columns(table):
    evaluation = table[0].set_index('run').loc['2']
    assert evaluation['result.acc1_clf0'] == 0.21 and evaluation['result.acc1_clf1'] == 0.33
    assert pd.isna(evaluation['best_epoch'])


@pytest.mark.parametrize('text, runs', [
    ('cf_loss.T=4', ['1']),  # values, not text: 4 == 4.0
    ('cf_trn.lab_unl_ratio=[1,1]', ['1']),
    ('amp=False', ['1']),
    ('snapshot_name=1', ['2']),  # the evaluation of run 1 (an int in its config)
    ('snapshot_name=grid/*', ['1']),
    ('snapshot_name=GRID/*', []),  # globs match the text as it is
    ('status=COMPLETED', ['1', '2']),
    ('experiment=eval', ['2']),
    ('seed=7', []),
    ('cf_loss.n_exits=3', []),
])
def test_filters(table, text, runs):
    assert list(select(table[0], [parse_filter(text)])['run']) == runs


@pytest.mark.parametrize('none', ['None', 'null'])
def test_none_matches_a_setting_that_is_none_or_absent(table, none):
    runs = table[0]
    train = [('experiment', 'train_cifar')]
    assert list(select(runs, train + [('cf_loss.n_exits', none)])['run']) == ['1', '10']
    assert list(select(runs, [('cf_loss.n_exits', none)])['run']) == ['1', '2', '10']
    assert list(select(runs, [('seed', none)])['run']) == ['2']  # an evaluation has no seed
    # a key that no run has: absent everywhere (the grid looks for its cells this way)
    assert list(select(runs, [('cf_nope', none)], strict=False)['run']) == ['1', '2', '10']


def test_bad_filters(table):
    with pytest.raises(ConfigError, match='malformed filter'):
        parse_filter('cf_loss.call')
    with pytest.raises(ConfigError, match="no column 'cf_nope'"):
        select(table[0], [('cf_nope', '1')])
    assert select(table[0], [('cf_nope', '1')], strict=False).empty


def test_missing_folder(tmp_path):
    with pytest.raises(SnapshotError, match='no snapshots folder'):
        load_runs(tmp_path / 'nope')


def test_training_curves_png(snaps, tmp_path):
    plot_curves(snaps / '1', tmp_path / 'curves.png')
    assert_png(tmp_path / 'curves.png')
    with pytest.raises(SnapshotError, match='no per-exit metrics'):
        plot_curves(snaps / '2', tmp_path / 'eval.png')


def runs_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=pythonpath())
    env.pop('MULTIEXIT_SNAPSHOTS', None)
    return subprocess.run([sys.executable, '-m', 'multiexit.runs', *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_command_line_lists_filters_and_writes_csv(snaps, tmp_path):
    proc = runs_cli(str(snaps), '--filter', 'experiment=train_cifar', 'status=COMPLETED',
                    '--csv', 'all.csv', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    csv = pd.read_csv(tmp_path / 'all.csv')
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ['run', 'experiment', 'status']
    assert lines[1].split()[:3] == ['1', 'train_cifar', 'COMPLETED']
    assert lines[2] == f'wrote 1 runs x {csv.shape[1]} columns to all.csv'
    assert [line for line in proc.stderr.splitlines() if 'skipped' in line][0].startswith(
        f'warning: skipped {snaps / "3"}: config.json is not valid JSON')
    assert list(csv['run']) == [1]
    assert {'cf_trn.nval_per_class', 'final.train.acc1_clf1', 'result.best_epoch'} <= set(csv)
    assert csv.loc[0, 'best.val.acc1_clf0'] == 0.25 and csv.loc[0, 'cf_loss.call'] == \
        'DistillationLossConstTemp'


def test_command_line_filters_on_none(snaps, tmp_path):
    proc = runs_cli(str(snaps), '--filter', 'experiment=train_cifar', 'cf_loss.n_exits=None',
                    '--csv', 'none.csv', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(pd.read_csv(tmp_path / 'none.csv')['run']) == [1, 10]


def test_command_line_default_folder_and_plot(snaps, tmp_path):
    proc = runs_cli('--plot', '1', cwd=snaps.parent)  # ./snapshots
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:3] == ['run', 'experiment', 'status']
    assert_png(snaps / '1' / 'curves.png')


@pytest.mark.parametrize('args, message', [
    (['nope'], 'error: no snapshots folder nope'),
    (['snapshots', '--filter', 'seed'], "error: malformed filter 'seed'"),
    (['snapshots', '--filter', 'sed=1'], "error: no column 'sed'"),
])
def test_command_line_bad_input_is_one_line(snaps, args, message):
    proc = runs_cli(*args, cwd=snaps.parent)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if not line.startswith('warning:')]
    assert len(errors) == 1 and errors[0].startswith(message)
