"""multiexit.runs: sacred run folders as a table, filters, the command line and training curves."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from helpers import assert_png, pythonpath
from multiexit.errors import ConfigError, SnapshotError
from multiexit.runs.curves import plot_curves, run_history
from multiexit.runs.summary import WIDTH, summary
from multiexit.runs.table import (load_runs, method_label, metric_summary, network_label,
                                  parse_filter, select)

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


def run_json(experiment, result, named=(), status='COMPLETED', minutes=(0, 1.5)):
    start, stop = (f'2026-01-01T10:{int(m):02d}:{int(60 * m) % 60:02d}.000000' for m in minutes)
    return {'experiment': {'name': experiment}, 'status': status, 'start_time': start,
            'stop_time': stop, 'meta': {'named_configs': list(named)}, 'result': result}


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
    assert lines[0].split()[:4] == ['run', 'name', 'experiment', 'status']
    assert lines[1].split()[:4] == ['1', 'grid/dbt/n25/s0', 'train_cifar', 'COMPLETED']
    assert lines[2].startswith('top-1 in %, the mean over the exits')
    assert lines[3] == f'wrote 1 runs x {csv.shape[1]} columns to all.csv'
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
    assert proc.stdout.split()[:3] == ['run', 'name', 'experiment']
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


def test_the_table_fits_120_columns_and_an_evaluation_shows_what_it_tested(tmp_path):
    snaps = tmp_path / 'snapshots'
    name = 'grid-imagenet-quick/a-rather-long-method-name/n1000/s12345'
    config = {'snapshot_name': name, 'n_epochs': 300, 'parent_snapshot': None,
              'cf_net': {'call': 'ResNet', 'depth': 56},
              'cf_loss': {'call': 'DistillationLossConstTemp', 'T': 4.0}}
    write_run(snaps / '1', config, run_json('train_cifar', None, status='INTERRUPTED'),
              sacred_metrics({'val.acc1_avg': [0.2, 0.3012], 'val.acc1_clf0': [0.1, 0.2]}))
    # eval.py's own cf_net (for bare state dicts) and cf_loss are not the tested run's
    evaluation = {'snapshot_name': '1', 'cf_net': {'call': 'MsdNet'},
                  'cf_loss': {'call': '_MultiExitAccuracy'}}
    write_run(snaps / '2', evaluation, run_json('eval', {'acc1_avg': 0.2512, 'acc1_clf0': 0.2}))
    write_run(snaps / '3', dict(evaluation, snapshot_name='["1", "nowhere"]'),
              run_json('eval', {'1': {'acc1_avg': 0.2512}}))
    runs = load_runs(snaps)
    text = summary(runs)
    lines = text.splitlines()
    assert max(map(len, lines)) <= WIDTH
    assert lines[0].split() == ['run', 'name', 'experiment', 'status', 'network', 'method',
                                'epochs', 'val', 'top-1', '%', 'test', 'top-1', '%']
    train, test, both = (line.split('  ') for line in lines[1:])
    train, test, both = ([c.strip() for c in line if c.strip()] for line in (train, test, both))
    assert train[0] == '1' and '…' in train[1]  # shortened in the middle
    assert train[1].startswith('grid-imagen') and train[1].endswith('/s12345')
    assert train[2:] == ['train_cifar', 'INTERRUPTED', 'ResNet-56', 'distillation, T=4', '2/300',
                         '30.12', '-']
    assert test == ['2', '1', 'eval', 'COMPLETED', 'ResNet-56', 'distillation, T=4', '-', '-',
                    '25.12']
    assert both[-1] == '25.12 -' and both[1] == '1, nowhere'
    assert '_MultiExitAccuracy' not in text and 'MsdNet' not in text
    assert runs.set_index('run').loc['2', 'tested_run'] == '1'
    wide = summary(runs, wide=True).splitlines()
    assert name in wide[1] and 'started' in wide[0] and 'duration' in wide[0]
    assert '_MultiExitAccuracy' not in '\n'.join(wide)


@pytest.mark.parametrize('config, method, network', [
    ({'cf_loss.call': 'ClassificationOnlyLoss', 'cf_net.call': 'MsdNet'}, 'standard', 'MsdNet'),
    ({'cf_loss.call': 'DistillationBasedLoss', 'cf_trn.n_unl_per_class': 350,
      'cf_net.call': 'WideResNet', 'cf_net.depth': 28}, 'DBT + unlabelled', 'WideResNet-28'),
    ({'cf_loss.call': 'DistillationLossConstTemp', 'cf_loss.T': 4.0, 'cf_trn.n_unl_per_class': 0},
     'distillation, T=4', None),
    ({'cf_loss.call': 'MyLoss'}, 'MyLoss', None),
    ({'cf_loss.call': 'IMTADistillation', 'cf_net.gradient_equilibrium': True},
     'IMTA distillation, GE', None),
    ({'cf_loss.call': 'ClassificationOnlyLoss', 'cf_net.gradient_equilibrium': False,
      'cf_regime.call': 'joint'}, 'standard', None),
    ({'cf_loss.call': 'ClassificationOnlyLoss', 'cf_net.gradient_equilibrium': True,
      'cf_net.boost_reweight': 0.5}, 'standard, GE, boosted', None),
    ({'cf_loss.call': 'SdnWeightedLoss', 'cf_regime.call': 'disjoint'},
     'SDN weighted CE, disjoint', None),
    ({'cf_loss.call': 'DistillationFromNextExit'}, 'distillation from the next exit', None),
])
def test_method_and_network_labels(config, method, network):
    assert method_label(config) == method and network_label(config) == network


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
    """Run 1 (epochs 1-2) resumed as run 2 (3-4) by id, run 2 as run 3 (5-6) by name; run 4
    restarts from run 1's ep1.pt (epochs 2-3); run 5 evaluates the name."""
    snaps = tmp_path_factory.mktemp('chain') / 'snapshots'
    config = {'snapshot_name': 'long', 'n_epochs': 6, 'parent_snapshot': None,
              'cf_net': {'call': 'MsdNet'}, 'cf_loss': {'call': 'DistillationBasedLoss'}}

    def train(run, parent, epochs, val, status, minutes, name='long'):
        metrics = sacred_metrics({'val.acc1_avg': val, 'val.acc1_clf0': val,
                                  'train.acc1_clf0': val, 'lr': [0.1] * len(val)})
        for m in metrics.values():
            m['steps'] = list(epochs)
        write_run(snaps / run, dict(config, parent_snapshot=parent, snapshot_name=name),
                  run_json('train_cifar', None, status=status, minutes=minutes), metrics)
        (snaps / run / 'last.pt').write_bytes(b'')
        return snaps / run

    first = train('1', None, [1, 2], [0.1, 0.5], 'INTERRUPTED', (0, 2))
    (first / 'ep2.pt').write_bytes(b'')
    (first / 'ep1.pt').write_bytes(b'')
    second = train('2', '1', [3, 4], [0.3, 0.4], 'INTERRUPTED', (3, 5))
    os.utime(first, (1, 1))
    os.utime(second, (2, 2))
    train('3', 'long', [5, 6], [0.2, 0.3], 'COMPLETED', (6, 8))
    train('4', str(first / 'ep1.pt'), [2, 3], [0.2, 0.2], 'COMPLETED', (9, 10), name='branch')
    write_run(snaps / '5', {'snapshot_name': 'long'},
              run_json('eval', {'acc1_avg': 0.25}, minutes=(11, 12)))
    return snaps


def test_a_resumed_run_follows_its_parents_back_to_the_first_run(chain):
    runs = load_runs(chain).set_index('run')
    last = runs.loc['3']
    assert (last['parent_run'], last['first_run']) == ('2', '1')
    assert last['final_epoch'] == 6 and last['best_epoch'] == 2  # in run 1
    assert last['best.val.acc1_avg'] == 0.5 and last['final.val.acc1_avg'] == 0.3
    assert last['total_duration_s'] == 3 * 120 and last['duration_s'] == 120
    assert runs.loc['2', 'parent_run'] == '1' and runs.loc['2', 'total_duration_s'] == 240
    branch = runs.loc['4']  # from run 1's epoch 1, not the epoch 2 that run 1 also trained
    assert (branch['parent_run'], branch['first_run']) == ('1', '1')
    assert branch['final_epoch'] == 3 and branch['best.val.acc1_avg'] == 0.2
    assert runs.loc['5', 'tested_run'] == '3'  # the newest COMPLETED run of that name
    frame, ids = run_history(chain, '3')
    assert ids == ['1', '2', '3'] and list(frame.index) == [1, 2, 3, 4, 5, 6]
    assert list(frame['val.acc1_avg']) == [0.1, 0.5, 0.3, 0.4, 0.2, 0.3]
    frame, ids = run_history(chain, '4')
    assert ids == ['1', '4'] and list(frame['val.acc1_avg']) == [0.1, 0.2, 0.2]
    line = next(line for line in summary(load_runs(chain)).splitlines() if line.startswith('3 '))
    assert ' 6/6 ' in line and ' 50.00 ' in line


def test_plot_takes_a_snapshot_name_and_draws_the_whole_chain(chain, monkeypatch):
    drawn = []
    monkeypatch.setattr('multiexit.runs.curves.Figure.savefig', lambda fig, path: drawn.append(fig))
    plot_curves(chain / '3', chain / '3' / 'curves.png')
    [fig] = drawn
    assert list(fig.axes[1].lines[0].get_xdata()) == [1, 2, 3, 4, 5, 6]  # val top-1, exit 0
    assert fig._suptitle.get_text() == 'run 3 <- 2 <- 1 long'
    proc = runs_cli(str(chain), '--plot', 'long', cwd=chain.parent)
    assert proc.returncode == 0, proc.stderr
    assert "snapshot_name='long': run 3 (COMPLETED, the newest of 3 runs with that name)" in \
        proc.stdout
    assert_png(chain / '3' / 'curves.png')
