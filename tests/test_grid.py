"""experiments/grid.py in this process: the cells it plans, its tables, and its bookkeeping of
done, failed and interrupted cells with the scripts' processes replaced (the grid as a user
types it, its cells real processes: tests/e2e/test_grid.py)."""
import json
import os
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pandas as pd
import pytest

from helpers import ROOT, assert_png, assert_the_failed_cell_is_reported, grid_run_config
from experiments import cells, grid, local, tables
from experiments.cells import Outcome
from experiments.schedule import Schedule
from multiexit.errors import ConfigError


QUICK = grid.PRESETS['cifar100', True]


def run_main(capsys, *args, code=0):
    """``python3 -m experiments.grid <args>`` in this process and folder: its stdout and
    stderr, once it ended with the exit code ``code``."""
    try:
        grid.main(list(args))
        ended = 0
    except SystemExit as e:
        ended = e.code
    out, err = capsys.readouterr()
    assert ended == code, out[-2000:] + err[-3000:]
    return types.SimpleNamespace(stdout=out, stderr=err)


def log_of(work, name):
    return work / 'results' / 'logs' / f'{name}.log'


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
    config = grid_run_config(cell.settings)
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
    (['--quick', '--methods', 'standard', 'mixed', '--epochs', '1'],
     'error: --epochs 1: mixed train in two phases of at least an epoch each; give --epochs 2'),
])
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'README.md').write_text('a file')
    with pytest.raises(SystemExit) as exit_:
        grid.main(args + ['--dry-run'])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().startswith(message)


def test_a_quick_grid_with_a_regime_trains_every_cell_two_epochs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_main(capsys, '--quick', '--methods', 'standard', 'disjoint', '--dry-run').stdout
    assert 'disjoint train in two phases: 2 epochs for every cell, not 1' in out
    assert '; 2 epochs' in out
    assert grid.grid_epochs(None, QUICK, ['standard', 'dbt']) == 1
    assert grid.grid_epochs(None, grid.PRESETS['cifar100', False], ['mixed']) == 300
    assert grid.grid_epochs(3, QUICK, ['mixed']) == 3


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


def test_cells_of_every_method_share_a_pack():
    """A pack's members may differ in method (train.pack.PackLoss): distillation from later
    exits and SDN's loss too."""
    full = grid.PRESETS['cifar100', False]
    methods = ['standard', 'distill_later', 'distill_next', 'sdn']
    every = grid.plan(full, methods, [25], full.seeds, 300)
    units = cells.packed(every, None)
    assert len(units) == 1 and units[0].cells == tuple(every) and len(every) == 12
    assert [len(u.cells) for u in cells.packed(every, 5)] == [5, 5, 2]
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


def test_a_pack_is_one_task_of_the_job_array(tmp_path, monkeypatch, capsys):
    fake = fake_slurm(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    submitted = run_main(capsys, '--quick', '--pack', '2', '--cluster', 'slurm')
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
    collected = run_main(capsys, '--quick', code=grid.EXIT_CELLS_FAILED)
    assert 'grid-quick/dbt/n10/s0: failed (task 4242_0, FAILED: error: its own)' in collected.stdout
    assert "grid-quick/standard/n10/s0: failed (task 4242_0, FAILED: error: the pack's last)" \
        in collected.stdout
    assert 'grid-quick/dbt/n20/s0: queued or running (task 4242_1)' in collected.stdout


def test_slurm_submission_collection_and_resubmission_with_fake_slurm_commands(tmp_path,
                                                                              monkeypatch,
                                                                              capsys):
    fake = fake_slurm(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    names = [f'grid-quick/{m}/n{s}/s0' for m in QUICK.methods for s in QUICK.sizes]
    submitted = run_main(capsys, '--quick', '--cluster', 'slurm', '--partition', 'gpu', '--time',
                         '90', '--cpus-per-task', '4', '--mem-gb', '16', '--array-parallelism',
                         '2', '--sbatch', 'account=proj', 'qos=normal')
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
    collected = run_main(capsys, '--quick', code=grid.EXIT_CELLS_FAILED)
    for i in (0, 1, 3):
        assert f'{names[i]}: queued or running (task 4242_{i})' in collected.stdout
    assert (f'{names[2]}: failed (task 4242_2, FAILED: error: something the task reported); '
            f'log results/logs/{names[2]}.log') in collected.stdout
    assert collected.stderr.strip() == (
        f'error: 1 of 4 cells are not done and have no task queued or running: {names[2]}; '
        f'submit them again with: {collect} --resubmit')

    resubmitted = run_main(capsys, '--quick', '--resubmit')
    assert f'{names[2]}: submitted (task 4243)' in resubmitted.stdout
    assert f'collect the results later with: {collect}' in resubmitted.stdout
    assert 'partition=gpu' in (fake / 'sbatch-4243.sh').read_text()  # the recorded options
    record = json.loads((tmp_path / 'results' / 'cluster.json').read_text())
    assert record['tasks'] == {**{n: f'4242_{i}' for i, n in enumerate(names)}, names[2]: '4243'}
    here = run_main(capsys, '--quick', '--jobs', '2', code=2)
    assert here.stderr.startswith('error: these cells were submitted to a cluster')


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


RUN_IDS = threading.Lock()  # the threads of --jobs write run folders at once


def write_run(snaps, experiment, config, status, result=None, named_configs=()):
    """A run folder with the next run id, as sacred leaves it (config.json, run.json); returns
    the folder."""
    with RUN_IDS:
        snaps.mkdir(parents=True, exist_ok=True)
        folder = snaps / str(1 + max((int(p.name) for p in snaps.iterdir() if p.name.isdigit()),
                                     default=0))
        folder.mkdir()
    (folder / 'config.json').write_text(json.dumps(config))
    (folder / 'run.json').write_text(json.dumps({
        'experiment': {'name': experiment}, 'status': status, 'result': result,
        'meta': {'named_configs': list(named_configs)}}))
    return folder


def training_run(snaps, updates, status, last_pt=False):
    """A training run of train_cifar.py with ``updates`` (the command line after ``with``), as its
    folder records it; with a last.pt (an epoch finished) if ``last_pt``."""
    named = [u for u in updates if '=' not in u]
    settings = [u for u in updates if '=' in u and not u.startswith('parent_snapshot=')]
    folder = write_run(snaps, 'train_cifar', grid_run_config(settings), status, named_configs=named)
    if last_pt:
        (folder / 'last.pt').write_bytes(b'')
    return folder


def scripts_replaced(monkeypatch, train):
    """The grid's script processes (``cells.call``) replaced: a training script's by
    ``train(updates, snapshots, stop, say)``, which writes what the run would and returns its
    exit code (``say``: a line of its output, to its log with --jobs, else to stderr); eval.py's
    by a COMPLETED evaluation. Returns the scripts and updates called, in order."""
    calls = []

    def call(args, snapshots, stop, log=None, env=None, training=False, preexec=None):
        script, _, *updates = [str(a) for a in args]
        calls.append([Path(script).name, *updates])
        output = []

        def say(line):
            output.append(f'{line}\n')
            print(line, file=log or sys.stderr, flush=True)
        if Path(script).name == 'eval.py':
            write_run(Path(snapshots), 'eval', {'snapshot_name': updates[0].split('=')[1],
                                                'checkpoint': None},
                      'COMPLETED', {'acc1_clf0': 0.25, 'acc1_clf1': 0.5})
            return 0, ''
        return train(updates, Path(snapshots), stop, say), ''.join(output)
    monkeypatch.setattr(cells, 'call', call)
    return calls


def test_a_failed_cell_is_reported_with_its_log_while_the_others_finish(tmp_path, monkeypatch,
                                                                       capsys):
    """batch_size=1500 exceeds the 1000 training images of size 10, not the 2000 of size 20:
    with --jobs, the failed cell's line names its log, which holds the script's error."""
    def train(updates, snaps, stop, say):
        if f'cf_trn.n_per_class={10 + QUICK.nval}' in updates:
            say('error: batch_size=1500 exceeds the 1000 training examples of cf_trn')
            return 2
        training_run(snaps, updates, 'COMPLETED')
        return 0
    scripts_replaced(monkeypatch, train)
    monkeypatch.chdir(tmp_path)
    proc = run_main(capsys, '--quick', '--methods', 'dbt', '--jobs', '2', '--', 'batch_size=1500',
                    code=grid.EXIT_CELLS_FAILED)
    assert_the_failed_cell_is_reported(proc, tmp_path)


@pytest.fixture
def terminal_sigint():
    """SIGINT as on a terminal: KeyboardInterrupt, unless a handler of the code takes it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize('jobs', [1, 2])
def test_ctrl_c_stops_the_grid_with_one_line_and_the_same_command_resumes(
        tmp_path, monkeypatch, capsys, terminal_sigint, jobs):
    """Ctrl-C once every cell's training has finished an epoch: the grid takes the signal
    (sent to this process), its training scripts stop (their processes replaced), it says in
    one line what each cell kept and how to continue; the same command again resumes each
    stopped run from its last.pt (parent_snapshot), then tests it."""
    methods = ['dbt'] if jobs == 1 else ['standard', 'dbt']
    args = ('--quick', '--sizes', '20', '--epochs', '3', '--snapshots', 'snaps', '--methods',
            *methods) + ('--jobs', str(jobs)) * (jobs > 1)
    all_started = threading.Barrier(len(methods), timeout=60)
    stopped = []

    def interrupted(updates, snaps, stop, say):
        run = training_run(snaps, updates, 'RUNNING', last_pt=True)  # epoch 1 in last.pt
        if all_started.wait() == 0:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        assert stop.event.wait(60), 'the grid did not take the signal'
        (run / 'run.json').write_text(json.dumps(dict(json.loads((run / 'run.json').read_text()),
                                                      status='INTERRUPTED')))
        say(f'interrupted: SIGINT during epoch 2; resume with: ... parent_snapshot={run}')
        stopped.append(run.name)
        return 130
    scripts_replaced(monkeypatch, interrupted)
    monkeypatch.chdir(tmp_path)
    proc = run_main(capsys, *args, code=130)
    output = proc.stdout + proc.stderr
    assert 'Traceback' not in output
    cells_kept = ('1 cell stopped (1 with its last finished epoch in last.pt)' if jobs == 1 else
                  '2 cells stopped (2 with their last finished epoch in last.pt)')
    assert proc.stderr.strip().splitlines()[-1] == (
        f'interrupted: SIGINT: {cells_kept}; to continue, run the same command again: '
        'python3 -m experiments.grid ' + ' '.join(args))
    if jobs > 1:  # the training runs' own lines are in their logs
        assert [line for line in output.splitlines() if 'interrupted' in line] == [
            proc.stderr.strip().splitlines()[-1]]
        for method in methods:
            log = log_of(tmp_path, f'grid-quick/{method}/n20/s0').read_text()
            assert 'interrupted: SIGINT during epoch 2;' in log

    def resumed(updates, snaps, stop, say):
        training_run(snaps, updates, 'COMPLETED')
        return 0
    calls = scripts_replaced(monkeypatch, resumed)
    run_main(capsys, *args)
    trainings = [c for c in calls if c[0] == 'train_cifar.py']
    assert sorted(c[-1] for c in trainings) == sorted(f'parent_snapshot={r}' for r in stopped)
    assert len([c for c in calls if c[0] == 'eval.py']) == len(methods)
