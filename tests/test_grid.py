"""experiments/grid.py: the cells it plans, and the quick grid end to end on generated data."""
import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT, pythonpath
from experiments import grid
from multiexit.errors import ConfigError
from multiexit.runs import load_runs
from test_anytime import assert_png

QUICK = grid.PRESETS['quick']


def run_grid(*args, cwd):
    # One thread per process: the smoke network gains nothing from more, and on shared cores
    # oversubscribed threads make each run many times slower.
    env = dict(os.environ, PYTHONPATH=pythonpath(), OMP_NUM_THREADS='1')
    env.pop('MULTIEXIT_SNAPSHOTS', None)
    proc = subprocess.run([sys.executable, '-m', 'experiments.grid', *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def by_name(runs):
    train = runs[runs['experiment'] == 'train_cifar']
    return {name: rows for name, rows in train.groupby('snapshot_name')}


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    """The quick grid; then, with DBT n20 marked as killed, again with --semisup on size 20."""
    work = tmp_path_factory.mktemp('grid')
    first = run_grid('--quick', '--snapshots', 'snaps', cwd=work)
    before = load_runs(work / 'snaps')
    killed = by_name(before)['grid-quick/dbt/n20/s0'].iloc[0]['run']
    run_json = work / 'snaps' / killed / 'run.json'
    run_json.write_text(json.dumps(dict(json.loads(run_json.read_text()), status='INTERRUPTED')))
    second = run_grid('--quick', '--semisup', '--sizes', '20', '--snapshots', 'snaps',
                      '--out', 'results2', '--', 'gpu=-1', cwd=work)
    return work, first, before, killed, second, load_runs(work / 'snaps')


def test_plan_of_the_full_grid():
    full = grid.PRESETS['full']
    methods = ['standard', 'dbt', 'const_t4', 'semisup']
    cells = grid.plan(full, methods, full.sizes, full.seeds, 7)
    # semi-supervised needs images left over: not at the largest size
    full_sizes = [s for s in full.sizes if s + full.nval < full.images_per_class]
    assert len(cells) == (3 * len(full.sizes) + len(full_sizes)) * len(full.seeds)
    assert len({c.name for c in cells}) == len(cells)
    const = next(c for c in cells if c.method == 'const_t4' and c.size == 25 and c.seed == 2)
    assert const.name == 'grid/const_t4/n25/s2' and const.named_configs == ()
    assert {'cf_loss.call=DistillationLossConstTemp', 'cf_loss.T=4.0', 'seed=2', 'cf_trn.seed=2',
            f'cf_trn.n_per_class={25 + full.nval}', f'cf_trn.nval_per_class={full.nval}',
            'cf_trn.n_unl_per_class=0', 'n_epochs=7'} <= set(const.settings)
    semi = next(c for c in cells if c.method == 'semisup' and c.size == 100)
    assert semi.named_configs == ('semisup',)
    assert f'cf_trn.n_unl_per_class={full.images_per_class - 100 - full.nval}' in semi.settings


def test_extra_updates_join_every_cell_but_gpu_is_not_part_of_a_cell():
    cell, = grid.plan(QUICK, ['dbt'], [10], [0], 1, ['resnet56', 'gpu=1', 'cf_opt.lr=0.05'])
    assert cell.named_configs == ('smoke', 'resnet56')
    assert cell.updates[:2] == ['smoke', 'resnet56'] and cell.updates[-2:] == ['gpu=1',
                                                                               'cf_opt.lr=0.05']
    assert ('cf_opt.lr', '0.05') in cell.identity and 'gpu' not in dict(cell.identity)
    with pytest.raises(ConfigError, match="'n_epochs=5' after --: the grid sets that itself"):
        grid.plan(QUICK, ['dbt'], [10], [0], 1, ['n_epochs=5'])


@pytest.mark.parametrize('args, message', [
    (['--quick', '--sizes', '26'], 'error: size 26: need 0 < size and size + 5 validation'),
    (['--quick', '--epochs', '0'], 'error: seeds must be >= 0 and epochs > 0'),
])
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        grid.main(args + ['--dry-run'])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().startswith(message)


def test_quick_grid_trains_and_tests_every_cell_once(quick):
    _, _, before, _, _, _ = quick
    train = by_name(before)
    assert sorted(train) == sorted(f'grid-quick/{m}/n{s}/s0' for m in QUICK.methods
                                   for s in QUICK.sizes)
    evals = before[before['experiment'] == 'eval']
    for name, rows in train.items():
        run = rows.iloc[0]
        method, size = name.split('/')[1], int(name.split('/')[2][1:])
        assert len(rows) == 1 and run['status'] == 'COMPLETED' and run['named_configs'] == 'smoke'
        assert run['cf_loss.call'] == grid.METHODS[method].settings[0].split('=')[1]
        assert (run['cf_trn.n_per_class'], run['cf_trn.nval_per_class']) == (size + QUICK.nval,
                                                                              QUICK.nval)
        assert run['cf_val.n_per_class'] == size + QUICK.nval  # cf_val follows cf_trn
        assert run['seed'] == run['cf_trn.seed'] == 0 and run['final_epoch'] == QUICK.epochs
        # metrics.json read back: the last epoch is the one the sacred result reports
        assert run['final.val.acc1_clf0'] == run['result.val.acc1_clf0']
        tested = evals[evals['snapshot_name'].astype(str) == run['run']]
        assert len(tested) == 1 and tested.iloc[0]['status'] == 'COMPLETED'


def test_table_and_figure_hold_the_test_accuracies(quick):
    work, first, before, _, _, _ = quick
    results = pd.read_csv(work / 'results' / 'grid.csv')
    evals = before[before['experiment'] == 'eval']
    tests = evals.set_index(evals['snapshot_name'].astype(str))
    exits = sorted(int(c.rsplit('clf', 1)[1]) for c in before if c.startswith('result.acc1_clf'))
    assert len(results) == len(QUICK.methods) * len(QUICK.sizes) * len(exits)
    for row in results.itertuples():
        assert row.acc1 == pytest.approx(100 * tests.loc[str(row.train_run),
                                                         f'result.acc1_clf{row.exit}'])
    markdown = (work / 'results' / 'grid.md').read_text()
    acc = results.set_index(['method', 'size', 'exit'])['acc1']
    for size in QUICK.sizes:
        dbt = ' | '.join(f'{acc["dbt", size, k]:.1f}' for k in exits)
        diff = ' | '.join(f'{acc["dbt", size, k] - acc["standard", size, k]:+.1f}' for k in exits)
        assert f'| {size} | DBT | 1 | {dbt} |' in markdown
        assert f'| {size} | DBT − standard | 1 | {diff} |' in markdown
    assert markdown in first.stdout
    assert_png(work / 'results' / 'grid.png')


def test_rerun_skips_done_cells_resumes_killed_ones_and_adds_semisup(quick):
    work, _, before, killed, second, after = quick
    new = after[~after['run'].isin(before['run'])]
    new_train = by_name(new)
    assert sorted(new_train) == ['grid-quick/dbt/n20/s0', 'grid-quick/semisup/n20/s0']
    assert re.search(r'grid-quick/standard/n20/s0: done \(training run \d+, test run \d+\)',
                     second.stdout)
    resumed = new_train['grid-quick/dbt/n20/s0'].iloc[0]
    assert int(resumed['parent_snapshot']) == int(killed) and resumed['status'] == 'COMPLETED'
    semi = new_train['grid-quick/semisup/n20/s0'].iloc[0]
    assert semi['named_configs'] == 'smoke,semisup'
    assert all(' gpu=-1' in line for line in second.stdout.splitlines()
               if 'train_cifar.py with' in line)
    assert semi['cf_trn.n_unl_per_class'] == QUICK.images_per_class - 20 - QUICK.nval
    assert json.loads(semi['cf_trn.lab_unl_ratio']) == [1, 1]
    assert json.loads(semi['cf_val.lab_unl_ratio']) == [1, 1]
    tested = new.loc[new['experiment'] == 'eval', 'snapshot_name'].astype(str)
    assert sorted(tested) == sorted([resumed['run'], semi['run']])
    markdown = (work / 'results2' / 'grid.md').read_text()
    assert '| 20 | DBT + unlabelled | 1 |' in markdown
    assert '| 20 | DBT + unlabelled − standard | 1 |' in markdown
    assert '| 10 |' not in markdown
