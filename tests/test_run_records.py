"""A run's records agree with its checkpoints: whatever epoch a checkpoint holds, that epoch's
metrics (metrics.json) and table row (cout.txt) were on disk before it was written, for a run
alone and for every member of a pack, so that a kill -9 between two epochs loses no record of
what last.pt holds (sacred's observer alone writes them every 10 s)."""
import importlib
import json
import os
import platform
import re
import signal
from pathlib import Path

import pytest

from multiexit.data.cifar import write_fake_cifar
from multiexit.train.checkpoint import Checkpointer, load

SMOKE = ['smoke', 'cf_trn.n_per_class=3', 'cf_trn.nval_per_class=1', 'n_epochs=2',
         'generate_fake_data=False', 'data_dir=data']


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder with generated data in data/; snapshots/ there is the default."""
    monkeypatch.chdir(tmp_path)
    write_fake_cifar(tmp_path / 'data', 'Cifar100', n_train_per_class=30, n_test_per_class=2)
    return tmp_path


@pytest.fixture
def on_disk_at_checkpoints(monkeypatch):
    """{(run id, epoch): (the last epoch of every metric in metrics.json, cout.txt)} as they
    were on disk when the checkpoints of that epoch were about to be written."""
    seen, save = {}, Checkpointer.save

    def recording(self, epoch, *args):
        path = self.run_dir / 'metrics.json'
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        seen[self.run_dir.name, epoch] = ({m['steps'][-1] for m in metrics.values()},
                                          (self.run_dir / 'cout.txt').read_text())
        return save(self, epoch, *args)
    monkeypatch.setattr(Checkpointer, 'save', recording)
    return seen


def assert_recorded(seen, runs, epochs=(1, 2)):
    """Every epoch's records were on disk before its checkpoints; run.json names the process
    (which the runs table looks for)."""
    assert sorted(seen) == sorted((run, epoch) for run in runs for epoch in epochs)
    for run in runs:
        host = json.loads((Path('snapshots') / run / 'run.json').read_text())['host']
        assert (host['hostname'], host['pid']) == (platform.node(), os.getpid())
    for (run, epoch), (last_steps, cout) in seen.items():
        assert last_steps == {epoch}, (run, epoch)  # every metric, up to this epoch
        assert re.search(rf'^ *{epoch} +\d\.\d{{4}} ', cout, re.M), (run, epoch, cout)


def test_a_run_records_each_epoch_before_its_checkpoint(work, on_disk_at_checkpoints):
    ex = importlib.import_module('train_cifar').ex
    ex.run_commandline(['train_cifar.py', 'with', *SMOKE])
    assert_recorded(on_disk_at_checkpoints, ['1'])


def test_every_member_of_a_pack_records_each_epoch_before_its_checkpoint(
        work, on_disk_at_checkpoints):
    train_pack = importlib.import_module('train_pack')
    code = train_pack.main(['--member', 'seed=0', 'cf_loss.call=ClassificationOnlyLoss',
                            'snapshot_name=a', '--member', 'seed=1', 'snapshot_name=b', '--',
                            *SMOKE])
    assert code == 0
    assert_recorded(on_disk_at_checkpoints, ['1', '2'])


def test_a_ctrl_c_while_an_epoch_is_written_stops_after_its_checkpoint(work, monkeypatch,
                                                                        capsys):
    """The row of epoch 1 is on the terminal before last.pt holds epoch 1: a Ctrl-C that comes
    then (here: while its checkpoints are being written) stops the run after them."""
    save = Checkpointer.save

    def interrupted(self, epoch, *args):
        os.kill(os.getpid(), signal.SIGINT)
        return save(self, epoch, *args)
    monkeypatch.setattr(Checkpointer, 'save', interrupted)
    # as on a terminal, also where the tests started in the background (SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    ex = importlib.import_module('train_cifar').ex
    try:
        with pytest.raises(KeyboardInterrupt):
            ex.run_commandline(['train_cifar.py', 'with', *SMOKE])
    finally:
        signal.signal(signal.SIGINT, previous)
    run = Path('snapshots') / '1'
    assert load(run / 'last.pt')['epoch'] == 1
    assert json.loads((run / 'run.json').read_text())['status'] == 'INTERRUPTED'
    assert 'SIGINT during epoch 2; ' in capsys.readouterr().err
