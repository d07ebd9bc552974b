"""experiments/grid.py: the cells it plans, and the quick grid end to end on generated data:
one cell after another, --jobs, --cluster local, failures, interruptions and preemption."""
import ast
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types

import pandas as pd
import pytest
import submitit
import torch
from test_anytime import assert_png
from test_scripts import no_download  # noqa: F401 (a fixture)

from helpers import ROOT, pythonpath, run_script
from experiments import cells, grid, local, tables
from experiments.cells import Outcome
from experiments.schedule import Schedule
from multiexit.errors import ConfigError
from multiexit.runs.table import load_runs, parse_filter

QUICK = grid.PRESETS['cifar100', True]
# The row of epoch 1 in a training run's output: printed once last.pt holds that epoch.
EPOCH_1 = re.compile(r'^ {3}1 +\d\.\d{4} ', re.M)
# Cells that train for 3 epochs, to be interrupted after the first; DBT's is the reference's.
LONG = ('--quick', '--sizes', '20', '--epochs', '3', '--snapshots', 'snaps')
DBT = 'grid-quick/dbt/n20/s0'
SIZE_20 = ('--quick', '--sizes', '20', '--snapshots', 'snaps')  # both methods' cells of size 20


def grid_env():
    # One thread per process: the smoke network gains nothing from more, and on shared cores
    # oversubscribed threads make each run many times slower. Unbuffered: every line at once,
    # as on a terminal, for the tests that watch the output.
    env = dict(os.environ, PYTHONPATH=pythonpath(), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('MULTIEXIT_SNAPSHOTS', None)
    return env


def run_grid(*args, cwd, code=0):
    proc = subprocess.run([sys.executable, '-m', 'experiments.grid', *args], cwd=cwd,
                          env=grid_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def start_grid(*args, cwd):
    """The grid in the background, its output in cwd/stdout.txt and cwd/stderr.txt."""
    with open(cwd / 'stdout.txt', 'w') as out, open(cwd / 'stderr.txt', 'w') as err:
        return subprocess.Popen([sys.executable, '-m', 'experiments.grid', *args], cwd=cwd,
                                env=grid_env(), stdout=out, stderr=err)


def submit_grid(*args, cwd):
    """A grid that submits to the local executor: it returns while its tasks run, and they
    keep its output open, so that it goes to files (pipes would wait for the tasks)."""
    proc = start_grid(*args, cwd=cwd)
    assert proc.wait(120) == 0, text(cwd / 'stderr.txt')[-3000:]
    return text(cwd / 'stdout.txt')


def wait_for(condition, proc=None, timeout=300):
    """Polls until ``condition()`` holds; fails if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f'ended with {proc.returncode} first'
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.05)


def text(path):
    return path.read_text() if path.is_file() else ''


def log_of(work, name):
    return work / 'results' / 'logs' / f'{name}.log'


def weights(run_dir):
    return torch.load(run_dir / 'last.pt', weights_only=True)


def by_name(runs):
    train = runs[runs['experiment'] == 'train_cifar']
    return {name: rows for name, rows in train.groupby('snapshot_name')}


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    """The quick grid, one cell after another; then again with --semisup on size 20."""
    work = tmp_path_factory.mktemp('grid')
    first = run_grid('--quick', '--snapshots', 'snaps', cwd=work)
    before = load_runs(work / 'snaps')
    second = run_grid('--quick', '--semisup', '--sizes', '20', '--snapshots', 'snaps',
                      '--out', 'results2', '--', 'gpu=-1', cwd=work)
    return work, first, before, second, load_runs(work / 'snaps')


def test_plan_of_the_full_grid():
    full = grid.PRESETS['cifar100', False]
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


def test_plan_of_the_imagenet_grid():
    imagenet = grid.PRESETS['imagenet', False]
    cells = grid.plan(imagenet, imagenet.methods, [grid.ALL, 100], [0], 90)
    assert [c.name for c in cells] == ['grid-imagenet/standard/nall/s0',
                                       'grid-imagenet/standard/n100/s0',
                                       'grid-imagenet/dbt/nall/s0', 'grid-imagenet/dbt/n100/s0']
    assert {c.script for c in cells} == {'train_imagenet.py'}
    assert ('experiment', 'train_imagenet') in cells[0].identity
    assert {'cf_trn.n_per_class=None', 'cf_trn.nval_per_class=50', 'n_epochs=90',
            'cf_loss.call=ClassificationOnlyLoss'} <= set(cells[0].settings)
    assert 'cf_trn.n_per_class=150' in cells[1].settings
    # ImageNet's classes differ in size: no upper bound to check
    assert grid.plan(imagenet, ['dbt'], [5000], [0], 1)[0].size == 5000


def test_extra_updates_join_every_cell_but_gpu_is_not_part_of_a_cell():
    cell, = grid.plan(QUICK, ['dbt'], [10], [0], 1, ['resnet56', 'gpu=1', 'cf_opt.lr=0.05'])
    assert cell.named_configs == ('smoke', 'resnet56')
    assert cell.updates[:2] == ['smoke', 'resnet56'] and cell.updates[-2:] == ['gpu=1',
                                                                               'cf_opt.lr=0.05']
    assert ('cf_opt.lr', '0.05') in cell.identity and 'gpu' not in dict(cell.identity)
    with pytest.raises(ConfigError, match="'n_epochs=5' after --: the grid sets that itself"):
        grid.plan(QUICK, ['dbt'], [10], [0], 1, ['n_epochs=5'])


def test_output_names_tell_grids_apart_but_not_their_seeds():
    full, imagenet = grid.PRESETS['cifar100', False], grid.PRESETS['imagenet', False]
    name = lambda preset, methods=None, sizes=None, epochs=None, extra=(): grid.output_name(
        preset, methods or preset.methods, sizes or preset.sizes, epochs or preset.epochs, extra)
    names = [name(full), name(QUICK), name(imagenet), name(grid.PRESETS['imagenet', True]),
             name(full, [*full.methods, 'semisup']), name(full, ['dbt', 'standard']),
             name(full, sizes=[50, 25]), name(full, epochs=30), name(full, extra=['resnet56']),
             name(full, extra=['cf_opt.lr=0.05', 'data_dir=/datasets/cifar'])]
    assert names == ['grid', 'grid-quick', 'grid-imagenet', 'grid-imagenet-quick',
                     'grid_standard+dbt+const_t4+semisup', 'grid_standard+dbt', 'grid_n25+50',
                     'grid_30ep', 'grid_resnet56', 'grid_cf_opt.lr=0.05+data_dir=-datasets-cifar']
    # the same cells in another order, or on another GPU: the same files
    assert name(QUICK, ['dbt', 'standard'], [20, 10], extra=['gpu=1']) == 'grid-quick'
    assert name(imagenet, sizes=[grid.ALL, 100]) == 'grid-imagenet_n100+all'
    long = name(full, extra=[f'cf_scheduler.milestones=[{", ".join(map(str, range(40)))}]'])
    assert len(long) < 80 and long.startswith('grid_cf_scheduler.milestones=-0--1')


def done_cell(snaps, cell, run, acc, epochs=None):
    """A finished cell as its runs leave it: a COMPLETED training run with the cell's settings
    (run id ``run``) and a COMPLETED evaluation of it (``run + 1``), of test top-1 ``acc``."""
    config = {'cf_net': {'call': 'MsdNet'}, 'data_dir': 'data/smoke', 'parent_snapshot': None}
    for key, text in map(parse_filter, cell.settings):
        *parents, last = key.split('.')
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[last] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            node[last] = text
    config['cf_trn']['call'] = 'Cifar100'
    if epochs is not None:
        config['n_epochs'] = epochs
    for run_id, experiment, cf, result in (
            (run, 'train_cifar', config, None),
            (run + 1, 'eval', {'snapshot_name': str(run), 'checkpoint': None},
             {'acc1_clf0': acc, 'acc1_clf1': acc})):
        folder = snaps / str(run_id)
        folder.mkdir(parents=True)
        (folder / 'config.json').write_text(json.dumps(cf))
        (folder / 'run.json').write_text(json.dumps({
            'experiment': {'name': experiment}, 'status': 'COMPLETED', 'result': result,
            'meta': {'named_configs': list(cell.named_configs) * (experiment != 'eval')}}))


def test_a_grid_over_more_seeds_gathers_every_finished_seed_of_its_cells(tmp_path, capsys):
    """--seeds 1 after --seeds 0: one table of both; a run of other settings stays out."""
    snaps, out = tmp_path / 'snaps', tmp_path / 'results'
    run = 1
    for cell in grid.plan(QUICK, QUICK.methods, QUICK.sizes, [0, 1, 2], 1):
        done_cell(snaps, cell, run, 0.01 * run, epochs=2 if cell.seed == 2 else None)
        run += 2
    grid.main(['--quick', '--seeds', '1', '--snapshots', str(snaps), '--out', str(out)])
    printed = capsys.readouterr().out
    assert printed.count(': done (training run') == 4  # the seed asked for
    assert f'and 4 finished cells of seed 0 in {snaps}, which the table gathers too' in printed
    results = pd.read_csv(out / 'grid-quick.csv')
    assert sorted(set(results['seed'])) == [0, 1]  # seed 2's runs trained 2 epochs, not 1
    assert len(results) == 2 * 2 * 2 * 2  # methods x sizes x seeds x exits
    markdown = (out / 'grid-quick.md').read_text()
    assert markdown.splitlines()[2].startswith('Cifar100 in data/smoke; network MsdNet; 1 epoch; '
                                               'seeds 0 1; methods standard dbt; sizes 10 20')
    assert '| 10 | DBT | 2 |' in markdown and markdown in printed


def fake_cells(monkeypatch, outcome_of, where=grid, name='run_unit'):
    """Replaces running a unit with ``outcome_of(cell)`` for each of its cells; returns the
    cells run, in order."""
    ran = []

    def run(unit, *args, **kwargs):
        ran.extend(cell.name for cell in unit.cells)
        return [(cell, outcome_of(cell, *args)) for cell in unit.cells]
    monkeypatch.setattr(where, name, run)
    return ran


def failure(error):
    return Outcome('failed', reason=f'train_cifar.py exit code 2 ({error})', code=2, error=error)


NO_DATA = 'error: no cifar-100-python/ in data and the download failed'


@pytest.mark.parametrize('jobs', [1, 2])
def test_an_error_every_cell_repeats_stops_the_grid_at_once(tmp_path, capsys, monkeypatch,
                                                             jobs):
    where = (grid, 'run_unit') if jobs == 1 else (local, 'run_logged')
    ran = fake_cells(monkeypatch, lambda cell, *args: failure(NO_DATA), *where)
    with pytest.raises(SystemExit) as stopped:
        grid.main(['--quick', '--jobs', str(jobs), '--gpus', 'none',
                   '--snapshots', str(tmp_path / 'snaps'), '--out', str(tmp_path / 'out')])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(ran) < 4 and err[-1].startswith(f'{NO_DATA} (cells ')
    assert err[-1].endswith(', which differ in method and size, failed with it, so every cell '
                            'would: the grid stopped; fix it and run the same command again)')
    if jobs == 1:  # the next cell to run is the one that differs most from the failed one
        assert ran == ['grid-quick/standard/n10/s0', 'grid-quick/dbt/n20/s0']


def test_an_error_of_some_cells_leaves_the_others_running(tmp_path, capsys, monkeypatch):
    ran = fake_cells(monkeypatch, lambda cell, *args: failure(
        f'error: batch_size=1500 exceeds the {100 * cell.size} training examples'))
    with pytest.raises(SystemExit) as stopped:
        grid.main(['--quick', '--snapshots', str(tmp_path / 'snaps'), '--out',
                   str(tmp_path / 'out')])
    assert stopped.value.code == grid.EXIT_CELLS_FAILED and len(ran) == 4
    assert capsys.readouterr().err.strip().startswith('error: 4 of 4 cells failed: ')


def test_schedule_runs_next_the_cell_that_tells_whether_every_cell_fails_so():
    todo = grid.plan(QUICK, ['standard', 'dbt'], [10, 20], [0, 1], 1)
    schedule = Schedule(todo)
    assert schedule.varied == ['method', 'size', 'seed']
    first = schedule.take()
    schedule.ended(first, failure(NO_DATA))
    probe = schedule.take()
    assert (probe.method, probe.size, probe.seed) == ('dbt', 20, 1)  # differs in everything
    schedule.ended(probe, Outcome('failed', code=1, error=NO_DATA))  # a crash: not bad input
    assert schedule.repeated is None
    schedule.ended(probe, failure(NO_DATA))
    assert schedule.repeated == (NO_DATA, [first, probe]) and schedule.take() is None
    lone = Schedule(todo[:1])
    lone.ended(lone.take(), failure(NO_DATA))  # nothing varies: one failure tells
    assert lone.repeated_error().startswith(f'{NO_DATA[7:]} (cell grid-quick/standard/n10/s0 '
                                            f'failed with it, so every cell would')


def test_the_interrupt_line_says_what_each_stopped_cell_kept(tmp_path, capsys, monkeypatch):
    def interrupted(cell, snapshots, stop):
        stop.request(signal.SIGINT)
        return Outcome('interrupted', kept=False)  # before its first epoch finished
    fake_cells(monkeypatch, interrupted)
    with pytest.raises(SystemExit) as stopped:
        grid.main(['--quick', '--snapshots', str(tmp_path / 'snaps'), '--out',
                   str(tmp_path / 'out')])
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().startswith(
        'interrupted: SIGINT: 1 cell stopped (1 before its first epoch finished: it starts '
        'afresh); to continue, run the same command again: python3 -m experiments.grid --quick')
    train = pd.Series({'run': '3'})
    assert grid.stopped_cells([Outcome('interrupted', kept=True), Outcome('interrupted', train),
                               Outcome('interrupted', kept=True)]) == (
        '3 cells stopped (1 trained, to be tested, 2 with their last finished epoch in last.pt)')


def test_the_output_of_a_cell_on_the_terminal_is_watched_for_its_error_line(capfd):
    script = ("import sys; sys.stderr.write('50%|##   | 1/2\\r'); "
              "print('error: not this one', file=sys.stderr); "
              "print('error: the last one', file=sys.stderr); print('bye', file=sys.stderr)")
    proc = subprocess.Popen([sys.executable, '-c', script], stderr=subprocess.PIPE)
    tee = cells.Tee(proc.stderr)
    proc.wait()
    tee.join()
    assert cells.error_line(tee.text()) == 'error: the last one'
    assert capfd.readouterr().err == '50%|##   | 1/2\rerror: not this one\nerror: the last one\nbye\n'


def test_without_the_data_set_the_grid_stops_after_two_cells(tmp_path, no_download):  # noqa: F811
    proc = subprocess.run(
        [sys.executable, '-m', 'experiments.grid', '--methods', 'standard', 'dbt', '--sizes',
         '25', '50', '--seeds', '0', '1', '--epochs', '1', '--snapshots', 'snaps', '--',
         'data_dir=empty'], cwd=tmp_path, env=dict(grid_env(), **no_download),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count('train_cifar.py with') == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith('error: no cifar-100-python/ in empty and the download failed')
    assert error.endswith('(cells grid/standard/n25/s0, grid/dbt/n50/s1, which differ in method, '
                          'size and seed, failed with it, so every cell would: the grid stopped; '
                          'fix it and run the same command again)')


@pytest.mark.parametrize('args, message', [
    (['--quick', '--sizes', '26'], 'error: size 26: need 0 < size and size + 5 validation'),
    (['--quick', '--epochs', '0'], 'error: seeds must be >= 0 and epochs > 0'),
    (['--quick', '--jobs', '0'], 'error: --jobs must be >= 1, got 0'),
    (['--quick', '--gpus', '0,,1'], "error: --gpus '0,,1': list GPUs like 0,1,2 (or none)"),
    (['--quick', '--jobs', '2', '--', 'gpu=1'], 'error: gpu= after --: with --jobs or --gpus'),
    (['--quick', '--cluster', 'local', '--jobs', '2'], 'error: --jobs and --gpus run cells on'),
    (['--quick', '--cluster', 'local', '--sbatch', 'qos'], "error: --sbatch 'qos': use KEY=VALUE"),
    (['--quick', '--cluster', 'local', '--time', '0'], 'error: --time must be > 0'),
    (['--quick', '--resubmit'], 'error: --resubmit: no submission recorded in results/cluster'),
    (['--quick', '--out', 'README.md'], 'error: --out README.md: a file, not a folder'),
    (['--data', 'imagenet', '--semisup'], 'error: semisup: the semi-supervised cells are train_'),
])
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'README.md').write_text('a file')
    with pytest.raises(SystemExit) as exit_:
        grid.main(args + ['--dry-run'])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().startswith(message)


def test_no_sbatch_or_a_garbled_record_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('PATH', str(tmp_path))  # no sbatch
    with pytest.raises(SystemExit):
        grid.main(['--quick', '--cluster', 'slurm', '--dry-run'])
    assert capsys.readouterr().err.startswith('error: --cluster slurm: no sbatch command here')
    (tmp_path / 'results').mkdir()
    (tmp_path / 'results' / 'cluster.json').write_text('{"tasks": ')
    with pytest.raises(SystemExit):
        grid.main(['--quick', '--dry-run'])
    assert capsys.readouterr().err.startswith(
        "error: results/cluster.json is not a record of this grid's submissions; remove it")


def test_quick_grid_trains_and_tests_every_cell_once(quick):
    _, _, before, _, _ = quick
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
    work, first, before, _, _ = quick
    results = pd.read_csv(work / 'results' / 'grid-quick.csv')
    evals = before[before['experiment'] == 'eval']
    tests = evals.set_index(evals['snapshot_name'].astype(str))
    exits = sorted(int(c.rsplit('clf', 1)[1]) for c in before if c.startswith('result.acc1_clf'))
    assert len(results) == len(QUICK.methods) * len(QUICK.sizes) * len(exits)
    for row in results.itertuples():  # fractions, as in the runs' own files
        assert row.acc1 == tests.loc[str(row.train_run), f'result.acc1_clf{row.exit}']
    assert set(results['data']) == {'Cifar100 in data/smoke'}
    assert set(results['network']) == {'MsdNet'} and set(results['epochs']) == {1}
    markdown = (work / 'results' / 'grid-quick.md').read_text()
    assert markdown.splitlines()[2] == ('Cifar100 in data/smoke; network MsdNet; 1 epoch; seed 0; '
                                        'methods standard dbt; sizes 10 20; with smoke')
    acc = 100 * results.set_index(['method', 'size', 'exit'])['acc1']  # the table: percent
    for size in QUICK.sizes:
        dbt = ' | '.join(f'{acc["dbt", size, k]:.1f}' for k in exits)
        diff = ' | '.join(f'{acc["dbt", size, k] - acc["standard", size, k]:+.1f}' for k in exits)
        assert f'| {size} | DBT | 1 | {dbt} |' in markdown
        assert f'| {size} | DBT − standard | 1 | {diff} |' in markdown
    assert markdown in first.stdout
    assert_png(work / 'results' / 'grid-quick.png')


def test_rerun_skips_done_cells_and_adds_semisup(quick):
    work, _, before, second, after = quick
    new = after[~after['run'].isin(before['run'])]
    new_train = by_name(new)
    assert sorted(new_train) == ['grid-quick/semisup/n20/s0']
    for method in QUICK.methods:
        assert re.search(rf'grid-quick/{method}/n20/s0: done \(training run \d+, test run \d+\)',
                         second.stdout)
    semi = new_train['grid-quick/semisup/n20/s0'].iloc[0]
    assert semi['named_configs'] == 'smoke,semisup'
    assert all(' gpu=-1' in line for line in second.stdout.splitlines()
               if 'train_cifar.py with' in line)
    assert semi['cf_trn.n_unl_per_class'] == QUICK.images_per_class - 20 - QUICK.nval
    assert json.loads(semi['cf_trn.lab_unl_ratio']) == [1, 1]
    assert json.loads(semi['cf_val.lab_unl_ratio']) == [1, 1]
    tested = new.loc[new['experiment'] == 'eval', 'snapshot_name'].astype(str)
    assert sorted(tested) == [semi['run']]
    markdown = (work / 'results2' / 'grid-quick_standard+dbt+semisup_n20.md').read_text()
    assert '| 20 | DBT + unlabelled | 1 |' in markdown
    assert '| 20 | DBT + unlabelled − standard | 1 |' in markdown
    assert '| 10 |' not in markdown


def test_a_setting_none_matches_its_own_runs(quick):
    """cf_loss.n_exits is None in every run of the quick grid: given after --, its cells are
    done, not trained again."""
    work = quick[0]
    proc = run_grid('--quick', '--dry-run', '--snapshots', 'snaps', '--', 'cf_loss.n_exits=None',
                    cwd=work)
    assert proc.stdout.count(': done (training run') == len(QUICK.methods) * len(QUICK.sizes)


def test_the_grid_runs_as_a_script_from_anywhere(quick, tmp_path):
    """python3 experiments/grid.py, with the repository on no path."""
    env = grid_env()
    env['PYTHONPATH'] = os.environ.get('PYTHONPATH', '')
    proc = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'grid.py'), '--quick',
                           '--dry-run', '--snapshots', str(quick[0] / 'snaps')], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count(': done (training run') == len(QUICK.methods) * len(QUICK.sizes)


def test_imagenet_quick_grid_trains_with_train_imagenet_and_its_tables_hold_size_all(tmp_path):
    """--data imagenet: cells are train_imagenet.py runs on generated JPEGs; size all is every
    training image but the validation ones; the same command again finds them done."""
    args = ('--data', 'imagenet', '--quick', '--methods', 'dbt', '--sizes', 'all',
            '--snapshots', 'snaps')
    first = run_grid(*args, cwd=tmp_path)
    runs = load_runs(tmp_path / 'snaps')
    train, test = (runs[runs['experiment'] == e] for e in ('train_imagenet', 'eval'))
    assert list(train['snapshot_name']) == ['grid-imagenet-quick/dbt/nall/s0']
    assert list(test['snapshot_name'].astype(str)) == list(train['run'])
    run = train.iloc[0]
    assert run['status'] == 'COMPLETED' and run['named_configs'] == 'smoke'
    assert pd.isna(run['cf_trn.n_per_class']) and run['cf_trn.nval_per_class'] == 2
    markdown = (tmp_path / 'results' / 'grid-imagenet-quick_dbt_nall.md').read_text()
    assert markdown.splitlines()[2].startswith('ImageFolder in data/smoke-images; network MsdNet; '
                                               '1 epoch; seed 0; methods dbt; sizes all')
    assert '| all | DBT | 1 |' in markdown and markdown in first.stdout
    again = run_grid(*args, '--dry-run', cwd=tmp_path)
    assert again.stdout.count(': done (training run') == 1


def tables_equal(work, other, name='grid-quick'):
    """The tables and CSVs of two grids of the same cells (run ids aside) are the same."""
    assert (work / 'results' / f'{name}.md').read_text() == \
        (other / 'results' / f'{name}.md').read_text()
    csv = [pd.read_csv(w / 'results' / f'{name}.csv').drop(columns=['train_run', 'eval_run'])
           for w in (work, other)]
    pd.testing.assert_frame_equal(*csv)


def size_20_rows_equal(work, quick_work):
    """The CSV of a quick grid of size 20 (``--sizes 20``) holds the size-20 rows of the quick
    grid's CSV, run ids aside."""
    mine, theirs = (pd.read_csv(w / 'results' / f'{n}.csv').drop(columns=['train_run', 'eval_run'])
                    for w, n in ((work, 'grid-quick_n20'), (quick_work, 'grid-quick')))
    theirs = theirs[theirs['size'] == 20].reset_index(drop=True)
    assert set(mine['method']) == {'standard', 'dbt'} and set(mine['size']) == {20}
    pd.testing.assert_frame_equal(mine, theirs)


def size_20(names):
    return sorted(n for n in names if '/n20/' in n)


def assert_overlap(runs):
    """At least two training runs ran at the same time (run.json's start and stop times)."""
    train = runs[runs['experiment'] == 'train_cifar'].sort_values('start_time')
    started, stopped_before = train['start_time'].iloc[1:], train['stop_time'].cummax().iloc[:-1]
    assert (started.values < stopped_before.values).any()


def test_tables_keep_the_order_of_the_cells_whatever_order_they_finish_in(tmp_path):
    cells = grid.plan(QUICK, QUICK.methods, QUICK.sizes, QUICK.seeds, 1)
    results = grid.Results(cells, list(QUICK.methods), tmp_path, 'grid', 'cells in any order')
    for i, cell in reversed(list(enumerate(cells))):
        results.add(cell, pd.Series({'run': str(2 * i)}),
                    pd.Series({'run': str(2 * i + 1), 'result.acc1_clf0': i / 100}))
    results.write()
    written = pd.read_csv(tmp_path / 'grid.csv')
    assert list(written['train_run']) == [0, 2, 4, 6]
    assert list(zip(written['method'], written['size'])) == [(c.method, c.size) for c in cells]


def test_tables_put_size_all_after_the_numbers(tmp_path, monkeypatch):
    figures, savefig = [], tables.Figure.savefig
    monkeypatch.setattr(tables.Figure, 'savefig',
                        lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    cells = grid.plan(QUICK, ['dbt'], [grid.ALL, 20, 10], [0], 1)
    results = grid.Results(cells, ['dbt'], tmp_path, 'grid', 'sizes all, 20 and 10')
    for i, cell in enumerate(cells):
        results.add(cell, pd.Series({'run': str(2 * i)}),
                    pd.Series({'run': str(2 * i + 1), 'result.acc1_clf0': i / 100}))
    results.write()
    assert list(pd.read_csv(tmp_path / 'grid.csv', dtype={'size': str})['size']) == ['all', '20',
                                                                                      '10']
    rows = [line.split(' | ')[0] for line in (tmp_path / 'grid.md').read_text().splitlines()
            if line.endswith(' |') and ' DBT ' in line]
    assert rows == ['| 10', '| 20', '| all']
    assert_png(tmp_path / 'grid.png')
    [fig] = figures
    assert [ax.get_title() for ax in fig.axes] == [
        '10 training images per class', '20 training images per class', 'all training images']



def test_differences_to_standard_are_paired_by_seed():
    """Seeds that differ by 10 points in every method, methods that differ by a constant: the
    per-seed differences have no spread. A seed that one method lacks is left out of its
    differences only."""
    rows = []
    for seed in range(3):
        for k in range(2):
            standard = 50 + 10 * seed + k
            rows += [dict(method='standard', size=20, seed=seed, exit=k, acc1=standard),
                     dict(method='dbt', size=20, seed=seed, exit=k, acc1=standard + 2 + k)]
            if seed < 2:
                rows.append(dict(method='semisup', size=20, seed=seed, exit=k, acc1=standard - 1))
    labels = {'standard': 'standard', 'dbt': 'DBT', 'semisup': 'DBT + unlabelled'}
    accuracy, difference = tables.tables(pd.DataFrame(rows), list(labels), labels)
    assert accuracy.to_dict('records') == [
        {'size': 20, 'method': 'standard', 'seeds': 3, 'exit 0': '60.0 ± 10.0',
         'exit 1': '61.0 ± 10.0'},
        {'size': 20, 'method': 'DBT', 'seeds': 3, 'exit 0': '62.0 ± 10.0',
         'exit 1': '64.0 ± 10.0'},
        {'size': 20, 'method': 'DBT + unlabelled', 'seeds': 2, 'exit 0': '54.0 ± 7.1',
         'exit 1': '55.0 ± 7.1'}]
    assert difference.to_dict('records') == [
        {'size': 20, 'method': 'DBT − standard', 'seeds': 3, 'exit 0': '+2.0 ± 0.0',
         'exit 1': '+3.0 ± 0.0'},
        {'size': 20, 'method': 'DBT + unlabelled − standard', 'seeds': 2, 'exit 0': '-1.0 ± 0.0',
         'exit 1': '-1.0 ± 0.0'}]

def test_cells_that_differ_in_method_and_seed_share_packs():
    full = grid.PRESETS['cifar100', False]
    every = grid.plan(full, ['standard', 'dbt', 'const_t4', 'semisup'], full.sizes, full.seeds,
                      300)
    units = cells.packed(every, None)  # --pack auto on a GPU: every cell of a size in one
    assert sum(len(u.cells) for u in units) == len(every)
    packs = [u for u in units if isinstance(u, cells.Pack)]
    assert len(packs) == 5 + 4 and len(units) == len(packs)  # semisup: packs of its own
    for pack in packs:
        assert len({(c.size, c.named_configs) for c in pack.cells}) == 1
        assert len(pack.cells) == (3 if 'semisup' in pack.cells[0].named_configs else 9)
    assert packs[0].name == ('grid/pack/n25/standard-s0+standard-s1+standard-s2+dbt-s0+dbt-s1+'
                             'dbt-s2+const_t4-s0+const_t4-s1+const_t4-s2')
    in_twos = cells.packed(every, 2)
    assert [len(u.cells) for u in in_twos if u.cells[0].size == 25 and not u.cells[
        0].named_configs] == [2, 2, 2, 2, 1]  # the 9 cells of size 25
    assert all(isinstance(u, grid.Cell) for u in cells.packed(every, 1))
    other = grid.plan(full, ['dbt'], [25], [0], 300, ['cf_opt.lr=0.05'])
    assert len(cells.packed(every[:1] + other, None)) == 2  # other settings: another pack
    assert grid.pack_size('auto', (), ['0']) is None and grid.pack_size('auto', (), []) == 1
    assert grid.pack_size('auto', ('gpu=-1',), ['0']) == 1 and grid.pack_size(3, (), []) == 3


def test_jobs_spread_packs_over_the_gpus(tmp_path, monkeypatch):
    units, both_running = [], threading.Barrier(2, timeout=60)

    def run_logged(unit, snapshots, stop, path, header, env=None):
        units.append((unit.name, env['CUDA_VISIBLE_DEVICES'], path))
        both_running.wait()
        return [(cell, failure(f'error: {cell.name} stops here')) for cell in unit.cells]
    monkeypatch.setattr(local, 'run_logged', run_logged)
    with pytest.raises(SystemExit):
        grid.main(['--quick', '--pack', '2', '--jobs', '2', '--gpus', '0,1', '--snapshots',
                   str(tmp_path / 'snaps'), '--out', str(tmp_path / 'out')])
    names = ['grid-quick/pack/n10/standard-s0+dbt-s0', 'grid-quick/pack/n20/standard-s0+dbt-s0']
    assert sorted(u[0] for u in units) == names and {u[1] for u in units} == {'0', '1'}
    assert {u[2] for u in units} == {tmp_path / 'out' / 'logs' / f'{n}.log' for n in names}


@pytest.fixture(scope='module')
def packed_grid(tmp_path_factory):
    work = tmp_path_factory.mktemp('packed')
    return work, run_grid('--quick', '--pack', '2', '--snapshots', 'snaps', cwd=work)


def test_pack_2_trains_the_cells_of_a_size_together_and_writes_the_same_tables(packed_grid,
                                                                                 quick):
    """Each pack is one train_pack.py run whose members are the cells' training runs, tested as
    any. The tables hold the same cells with the accuracies of the unpacked grid within 5 points:
    at chance level (1 epoch of noise), the grouped convolutions' rounding, which these tiny
    networks amplify, moves a few of the 1,000 test images; the mean training loss of each run,
    which a pack that trained anything else would change at once, within 0.3 %."""
    work, proc = packed_grid
    assert proc.stdout.count('train_pack.py --script train_cifar.py --member') == 2
    assert 'train_cifar.py with' not in proc.stdout
    runs, alone = load_runs(work / 'snaps'), by_name(quick[2])
    packed = by_name(runs)
    assert sorted(packed) == sorted(alone) and (runs['status'] == 'COMPLETED').all()
    for name, rows in packed.items():
        run, solo = rows.iloc[0], alone[name].iloc[0]
        for key in ('cf_loss.call', 'cf_trn.n_per_class', 'seed', 'named_configs', 'final_epoch'):
            assert run[key] == solo[key], (name, key)
        assert run['final.train.loss'] == pytest.approx(solo['final.train.loss'], rel=3e-3)
    mine, theirs = (pd.read_csv(w / 'results' / 'grid-quick.csv') for w in (work, quick[0]))
    columns = ['method', 'size', 'seed', 'exit', 'data', 'network', 'epochs']
    pd.testing.assert_frame_equal(mine[columns], theirs[columns])
    assert (mine['acc1'] - theirs['acc1']).abs().max() <= 0.05
    markdown = (work / 'results' / 'grid-quick.md').read_text().splitlines()
    assert markdown[:3] == (quick[0] / 'results' / 'grid-quick.md').read_text().splitlines()[:3]
    assert_png(work / 'results' / 'grid-quick.png')


def test_a_pack_member_resumes_alone_as_a_solo_run(packed_grid):
    work, _ = packed_grid
    member = by_name(load_runs(work / 'snaps'))['grid-quick/dbt/n10/s0'].iloc[0]['run']
    folder = work / 'snaps' / member
    run_script('train_cifar.py', 'with', str(folder / 'config.json'), f'parent_snapshot={folder}',
               'n_epochs=2', cwd=work, snapshots=work / 'snaps')
    resumed = load_runs(work / 'snaps').iloc[-1]
    assert (resumed['status'], resumed['final_epoch'], resumed['parent_run']) == (
        'COMPLETED', 2, member)
    assert weights(work / 'snaps' / resumed['run'])['epoch'] == 2


@pytest.fixture(scope='module')
def parallel(tmp_path_factory):
    work = tmp_path_factory.mktemp('jobs')
    return work, run_grid(*SIZE_20, '--jobs', '2', cwd=work)


def test_jobs_run_cells_at_once_with_a_log_each_and_the_same_tables(parallel, quick):
    work, proc = parallel
    runs = load_runs(work / 'snaps')
    assert sorted(by_name(runs)) == size_20(by_name(quick[2]))
    assert (runs['status'] == 'COMPLETED').all() and len(runs) == 2 * len(by_name(runs))
    assert_overlap(runs)
    size_20_rows_equal(work, quick[0])
    for name, rows in by_name(runs).items():
        log = log_of(work, name).read_text()
        assert f'snapshot_name={name} ' in log and 'eval.py with snapshot_name=' in log
        assert '%|' not in log  # no progress bars in the logs
        assert re.search(rf'^done {name} \(training run {rows.iloc[0]["run"]}, test run \d+\); '
                         rf'log results/logs/{name}.log$', proc.stdout, re.M)
    assert 'train_cifar' not in proc.stdout + proc.stderr  # the runs' output is in the logs
    tests = [json.loads(p.read_text()) for p in (work / 'snaps').glob('*/config.json')]
    tests = [c for c in tests if 'time_repeats' in c]  # eval.py's runs
    assert len(tests) == len(by_name(runs)) and {c['time_repeats'] for c in tests} == {0}


def test_a_failed_cell_is_reported_with_its_log_while_the_others_finish(tmp_path):
    """batch_size=1500 exceeds the 1000 training images of size 10, not the 2000 of size 20."""
    proc = run_grid('--quick', '--methods', 'dbt', '--jobs', '2', '--', 'batch_size=1500',
                    cwd=tmp_path, code=grid.EXIT_CELLS_FAILED)
    failed, log = 'grid-quick/dbt/n10/s0', 'results/logs/grid-quick/dbt/n10/s0.log'
    reason = 'train_cifar.py exit code 2 (error: batch_size=1500 exceeds the 1000 training examples'
    assert re.search(rf'^failed {failed}: {re.escape(reason)}.*; log {log}$', proc.stdout, re.M)
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f'error: 1 of 2 cells failed: {failed} ({reason}')
    assert proc.stderr.strip().endswith(f'; log {log})')
    assert 'error: batch_size=1500 exceeds' in (tmp_path / log).read_text()
    assert re.search(r'^done grid-quick/dbt/n20/s0 ', proc.stdout, re.M)
    results = pd.read_csv(tmp_path / 'results' / 'grid-quick_dbt_batch_size=1500.csv')
    assert set(results['size']) == {20}


@pytest.fixture(scope='module')
def cluster_local(tmp_path_factory):
    """The quick grid of size 20 submitted to submitit's local executor, then collected."""
    work = tmp_path_factory.mktemp('cluster')
    submitted = submit_grid(*SIZE_20, '--cluster', 'local', cwd=work)
    wait_for_tasks(work)
    return work, submitted, run_grid(*SIZE_20, cwd=work)


def wait_for_tasks(work):
    record = json.loads((work / 'results' / 'cluster.json').read_text())
    jobs = [submitit.LocalJob(record['folder'], i) for i in record['tasks'].values()]
    wait_for(lambda: all(job.paths.result_pickle.is_file() for job in jobs))
    return record


def test_cluster_local_runs_every_cell_as_a_task_and_the_plain_command_collects(cluster_local,
                                                                                quick):
    work, submitted, collected = cluster_local
    record = json.loads((work / 'results' / 'cluster.json').read_text())
    names = size_20(by_name(quick[2]))
    assert sorted(record['tasks']) == names and record['options']['cluster'] == 'local'
    for name, task in record['tasks'].items():
        assert re.search(rf'^\[\d/2\] {name}: submitted \(task {task}\)$', submitted, re.M)
        assert re.search(rf'^\[\d/2\] {name}: done$', collected.stdout, re.M)
        assert f' task {task} on ' in log_of(work, name).read_text()
    assert 'collect the results later with: python3 -m experiments.grid --quick --sizes 20' \
        in submitted
    runs = load_runs(work / 'snaps')
    assert sorted(by_name(runs)) == names and (runs['status'] == 'COMPLETED').all()
    assert_overlap(runs)
    size_20_rows_equal(work, quick[0])
    again = run_grid(*SIZE_20, '--cluster', 'local', cwd=work)
    assert 'submitted' not in again.stdout  # every cell is done: nothing to submit


FAKE_SLURM = {  # just enough of SLURM's commands for submitit to submit and ask
    'sbatch': 'n=$(cat "$FAKE_SLURM/next" 2>/dev/null || echo 4242); echo $((n + 1)) > '
              '"$FAKE_SLURM/next"; cp "$1" "$FAKE_SLURM/sbatch-$n.sh"; '
              'echo "Submitted batch job $n"',
    'srun': 'exit 1',
    'sacct': 'cat "$FAKE_SLURM/sacct.txt"',
}


def fake_slurm(tmp_path, monkeypatch):
    """FAKE_SLURM's commands first on the PATH; returns their folder."""
    fake = tmp_path / 'bin'
    fake.mkdir()
    for name, script in FAKE_SLURM.items():
        (fake / name).write_text(f'#!/bin/sh\n{script}\n')
        (fake / name).chmod(0o755)
    monkeypatch.setenv('PATH', f'{fake}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('FAKE_SLURM', str(fake))
    return fake


def test_a_pack_is_one_task_of_the_job_array(tmp_path, monkeypatch):
    fake = fake_slurm(tmp_path, monkeypatch)
    submitted = run_grid('--quick', '--pack', '2', '--cluster', 'slurm', cwd=tmp_path)
    assert '#SBATCH --array=0-1%2\n' in (fake / 'sbatch-4242.sh').read_text()  # 2 tasks
    record = json.loads((tmp_path / 'results' / 'cluster.json').read_text())
    assert record['options']['pack'] == 2
    for size, task in ((10, '4242_0'), (20, '4242_1')):
        pack = f'grid-quick/pack/n{size}/standard-s0+dbt-s0'
        for method in QUICK.methods:
            name = f'grid-quick/{method}/n{size}/s0'
            assert f'{name}: submitted (task {task})' in submitted.stdout
            assert record['tasks'][name] == task
            assert record['logs'][name] == f'results/logs/{pack}.log'  # as --out gave it
    log = tmp_path / 'results' / 'logs' / 'grid-quick' / 'pack' / 'n10' / 'standard-s0+dbt-s0.log'
    log.parent.mkdir(parents=True)
    log.write_text('[run 3: grid-quick/dbt/n10/s0] error: its own\nerror: the pack\'s last\n')
    (fake / 'sacct.txt').write_text('JobID|State|NodeList\n4242_0|FAILED|n1\n4242_1|RUNNING|n2\n')
    collected = run_grid('--quick', cwd=tmp_path, code=grid.EXIT_CELLS_FAILED)
    assert 'grid-quick/dbt/n10/s0: failed (task 4242_0, FAILED: error: its own)' in collected.stdout
    assert "grid-quick/standard/n10/s0: failed (task 4242_0, FAILED: error: the pack's last)" \
        in collected.stdout
    assert 'grid-quick/dbt/n20/s0: queued or running (task 4242_1)' in collected.stdout


def test_slurm_submission_collection_and_resubmission_with_fake_slurm_commands(tmp_path,
                                                                              monkeypatch):
    fake = fake_slurm(tmp_path, monkeypatch)
    names = [f'grid-quick/{m}/n{s}/s0' for m in QUICK.methods for s in QUICK.sizes]
    submitted = run_grid('--quick', '--cluster', 'slurm', '--partition', 'gpu', '--time', '90',
                         '--cpus-per-task', '4', '--mem-gb', '16', '--array-parallelism', '2',
                         '--sbatch', 'account=proj', 'qos=normal', cwd=tmp_path)
    for i, name in enumerate(names):
        assert f'[{i + 1}/4] {name}: submitted (task 4242_{i})' in submitted.stdout
    sbatch = (fake / 'sbatch-4242.sh').read_text()
    for option in ('partition=gpu', 'time=90', 'cpus-per-task=4', 'mem=16GB', 'gpus-per-node=1',
                   'array=0-3%2', 'account=proj', 'qos=normal', 'signal=USR2@90',
                   'job-name=grid-quick'):
        assert f'#SBATCH --{option}\n' in sbatch
    assert f'export PYTHONPATH={ROOT}' in sbatch

    (fake / 'sacct.txt').write_text('JobID|State|NodeList\n4242_0|RUNNING|n1\n4242_1|PENDING|\n'
                                    '4242_2|FAILED|n2\n')  # 4242_3: not known yet
    log = log_of(tmp_path, names[2])
    log.parent.mkdir(parents=True)
    log.write_text('error: something the task reported\n')
    collect = 'python3 -m experiments.grid --quick --snapshots snapshots --out results'
    collected = run_grid('--quick', cwd=tmp_path, code=grid.EXIT_CELLS_FAILED)
    for i in (0, 1, 3):
        assert f'{names[i]}: queued or running (task 4242_{i})' in collected.stdout
    assert (f'{names[2]}: failed (task 4242_2, FAILED: error: something the task reported); '
            f'log results/logs/{names[2]}.log') in collected.stdout
    assert collected.stderr.strip() == (
        f'error: 1 of 4 cells are not done and have no task queued or running: {names[2]}; '
        f'submit them again with: {collect} --resubmit')

    resubmitted = run_grid('--quick', '--resubmit', cwd=tmp_path)
    assert f'{names[2]}: submitted (task 4243)' in resubmitted.stdout
    assert f'collect the results later with: {collect}' in resubmitted.stdout
    assert 'partition=gpu' in (fake / 'sbatch-4243.sh').read_text()  # the recorded options
    record = json.loads((tmp_path / 'results' / 'cluster.json').read_text())
    assert record['tasks'] == {**{n: f'4242_{i}' for i, n in enumerate(names)}, names[2]: '4243'}
    here = run_grid('--quick', '--jobs', '2', cwd=tmp_path, code=2)
    assert here.stderr.startswith('error: these cells were submitted to a cluster')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The 3-epoch cell's training run, uninterrupted."""
    work = tmp_path_factory.mktemp('reference')
    cell, = grid.plan(QUICK, ['dbt'], [20], [0], 3)
    run_script('train_cifar.py', 'with', *cell.updates, cwd=work, snapshots=work / 'snaps')
    return weights(work / 'snaps' / '1')


def resumed_like_the_reference(work, reference):
    """Every training run of the grid in ``work`` was interrupted once after epoch 1, then
    resumed; the DBT cell's final weights are those of the uninterrupted run."""
    for name, rows in by_name(load_runs(work / 'snaps')).items():
        assert list(rows['status']) == ['INTERRUPTED', 'COMPLETED'], name
        first, second = rows['run']
        assert weights(work / 'snaps' / first)['epoch'] == 1
        assert int(rows.iloc[1]['parent_snapshot']) == int(first)
        assert rows.iloc[1]['final_epoch'] == 3
        if name == DBT:
            final = weights(work / 'snaps' / second)
            assert final['epoch'] == 3
            for key, value in reference['model'].items():
                assert torch.equal(value, final['model'][key]), key


def test_ctrl_c_stops_the_grid_with_one_line_and_the_same_command_resumes(tmp_path, reference):
    args = (*LONG, '--methods', 'dbt')
    proc = start_grid(*args, cwd=tmp_path)
    wait_for(lambda: EPOCH_1.search(text(tmp_path / 'stdout.txt')), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130
    err = text(tmp_path / 'stderr.txt')
    assert 'Traceback' not in err
    assert 'interrupted: SIGINT during epoch 2;' in err  # the training run's own line
    assert err.strip().splitlines()[-1] == (
        'interrupted: SIGINT: 1 cell stopped (1 with its last finished epoch in last.pt); to '
        'continue, run the same command again: python3 -m experiments.grid ' + ' '.join(args))
    run_grid(*args, cwd=tmp_path)
    resumed_like_the_reference(tmp_path, reference)


def test_ctrl_c_stops_every_cell_of_jobs_and_the_same_command_resumes(tmp_path, reference):
    args = (*LONG, '--methods', 'standard', 'dbt', '--jobs', '2')
    names = ['grid-quick/standard/n20/s0', DBT]
    proc = start_grid(*args, cwd=tmp_path)
    wait_for(lambda: all(EPOCH_1.search(text(log_of(tmp_path, n))) for n in names), proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130
    output = text(tmp_path / 'stdout.txt') + text(tmp_path / 'stderr.txt')
    assert 'Traceback' not in output
    assert [line for line in output.splitlines() if 'interrupted' in line] == [
        'interrupted: SIGINT: 2 cells stopped (2 with their last finished epoch in last.pt); to '
        'continue, run the same command again: python3 -m experiments.grid ' + ' '.join(args)]
    for name in names:
        assert 'interrupted: SIGINT during epoch 2;' in log_of(tmp_path, name).read_text()
    run_grid(*args, cwd=tmp_path)
    resumed_like_the_reference(tmp_path, reference)


def test_a_preempted_cluster_task_is_requeued_and_resumes(tmp_path, reference):
    """submitit's preemption signal to a task (--cluster local): its training run stops after
    epoch 1, the task is requeued and resumes it."""
    args = (*LONG, '--methods', 'dbt')
    submit_grid(*args, '--cluster', 'local', cwd=tmp_path)
    log = log_of(tmp_path, DBT)
    wait_for(lambda: EPOCH_1.search(text(log)))
    task_pid = int(re.search(r'^# .* task \d+ on \S+, pid (\d+),', log.read_text(), re.M)[1])
    os.kill(task_pid, signal.SIGUSR2)
    wait_for_tasks(tmp_path)
    assert 'interrupted: SIGTERM during epoch 2;' in log.read_text()
    assert len(re.findall(r'^# .* task ', log.read_text(), re.M)) == 2
    resumed_like_the_reference(tmp_path, reference)
    collected = run_grid(*args, cwd=tmp_path)
    assert f'[1/1] {DBT}: done' in collected.stdout


def test_a_pack_reads_the_snapshots_folder_once_before_it_trains(tmp_path, monkeypatch):
    """Each look at the snapshots folder warns once of a malformed run: before the pack trains
    and after it, whatever its number of cells."""
    (tmp_path / 'snaps' / '1').mkdir(parents=True)
    (tmp_path / 'snaps' / '1' / 'run.json').write_text('{')
    unit = cells.Pack(tuple(grid.plan(QUICK, QUICK.methods, [20], [0], 1)))
    monkeypatch.setattr(cells, 'call', lambda *a, **k: (2, 'error: refused\n'))
    warnings = []
    outcomes = cells.run_unit(unit, tmp_path / 'snaps', types.SimpleNamespace(signum=None),
                              warn=warnings.append, say=lambda message: None)
    assert [o.status for _, o in outcomes] == ['failed', 'failed']
    assert len(warnings) == 2 and all('skipped' in w for w in warnings)
