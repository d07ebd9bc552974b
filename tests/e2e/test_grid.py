"""experiments/grid.py as a user types it, each grid a process of its own that starts a process
per script: the quick grid end to end on generated data, one cell after another, --pack, --jobs,
--cluster local, a failing cell, Ctrl-C, preemption, the ImageNet grid (what the grid plans and
its bookkeeping, with the scripts replaced: tests/test_grid.py)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import submitit
import torch

from helpers import ROOT, assert_png, assert_the_failed_cell_is_reported, pythonpath, run_script
from experiments import grid
from multiexit.runs.table import load_runs

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
    assert_the_failed_cell_is_reported(proc, tmp_path)


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


def test_the_quick_grid_of_every_method_trains_evaluates_and_tables_each(tmp_path):
    """Every training method of the harness from its command line, in packs where they share a
    network and regime, evaluated, in one table and one figure of accuracy against cost."""
    methods = list(grid.METHODS)
    proc = run_grid('--quick', '--methods', *methods, '--sizes', '10', '--pack', str(len(methods)),
                    cwd=tmp_path)
    assert 'disjoint and mixed train in two phases: 2 epochs for every cell, not 1' in proc.stdout
    [csv] = (tmp_path / 'results').glob('grid-quick_*_n10_2ep.csv')
    rows = pd.read_csv(csv)
    assert sorted(rows['method'].unique()) == sorted(methods)
    assert rows.groupby('method').size().eq(3).all() and rows['macs'].gt(0).all()
    table = csv.with_suffix('.md').read_text()
    for m in methods:
        assert f'| 10 | {grid.METHODS[m].label} | 1 |' in table, m
        assert m == 'standard' or f'| 10 | {grid.METHODS[m].label} − standard | 1 |' in table, m
    assert_png(csv.with_suffix('.png'))
