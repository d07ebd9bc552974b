"""A grid whose cells are all done says so ("N cells already done, nothing to train") and
trains nothing, whatever --pack or --jobs ask for; a cell's run is its newest as a name's is."""
import json

import pytest

from experiments import cells, grid, local
from helpers import grid_run_config
from multiexit.runs.table import load_runs

QUICK = grid.PRESETS['cifar100', True]


def done(snaps, cell, run, start=None):
    """A COMPLETED training run with the cell's settings (run id ``run``, started at ``start``)
    and a COMPLETED evaluation of its best snapshot (``run + 1``)."""
    config = grid_run_config(cell.settings)
    for run_id, experiment, cf, result in (
            (run, 'train_cifar', config, None),
            (run + 1, 'eval', {'snapshot_name': str(run), 'checkpoint': None},
             {'acc1_clf0': 0.1, 'acc1_clf1': 0.2})):
        folder = snaps / str(run_id)
        folder.mkdir(parents=True)
        (folder / 'config.json').write_text(json.dumps(cf))
        (folder / 'run.json').write_text(json.dumps({
            'experiment': {'name': experiment}, 'status': 'COMPLETED', 'result': result,
            'start_time': start,
            'meta': {'named_configs': list(cell.named_configs) * (experiment != 'eval')}}))


@pytest.mark.parametrize('how', [['--pack', '2'], ['--jobs', '2', '--gpus', 'none'], []])
def test_a_grid_of_done_cells_says_it_has_nothing_to_train(tmp_path, capsys, monkeypatch, how):
    snaps = tmp_path / 'snaps'
    for i, cell in enumerate(grid.plan(QUICK, QUICK.methods, QUICK.sizes, [0], 1)):
        done(snaps, cell, 1 + 2 * i)
    ran = []
    for where, name in ((grid, 'run_unit'), (local, 'run_logged')):
        monkeypatch.setattr(where, name, lambda unit, *args, **kwargs: ran.append(unit))
    grid.main(['--quick', *how, '--snapshots', str(snaps), '--out', str(tmp_path / 'out')])
    out = capsys.readouterr().out
    assert ran == [] and out.count(': done (training run') == 4
    assert '\n4 cells already done, nothing to train\n' in out
    assert (tmp_path / 'out' / 'grid-quick.md').is_file()


def test_the_run_of_a_cell_is_its_newest_by_start_time(tmp_path):
    """As for a name (find.newness): a run copied in under a higher id, that started before, is
    not the cell's run."""
    snaps, cell = tmp_path / 'snaps', grid.plan(QUICK, QUICK.methods, QUICK.sizes, [0], 1)[0]
    done(snaps, cell, 1, start='2026-01-02T10:00:00')
    done(snaps, cell, 20, start='2026-01-01T10:00:00')
    train, _, test = cells.state(load_runs(snaps, with_metrics=False), cell, snaps)
    assert (train['run'], test['run']) == ('1', '2')
