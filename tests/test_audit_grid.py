"""A grid with --pack and --jobs whose cells fail: every "log ..." that names where a failed
cell's output is (its line as it fails, and the grid's last error line) names the log that was
written, its pack's, which holds the pack's command and its member's error. In this process,
with the process runner (``experiments.cells.call``) stubbed."""
import re
import shlex
from pathlib import Path

import pytest

from experiments import cells, grid


def fake_call(args, snapshots, stop, log=None, env=None, training=False, preexec=None):
    """A train_pack.py run in which every member fails with an error of its own (so that no
    error is one that every cell repeats), written to ``log`` as train_pack.py writes it."""
    members = [args[i + 1] for i, word in enumerate(args) if word == '--member']
    names = [re.search(r'snapshot_name=(\S+)', ' '.join(map(str, args[i + 1:])))[1]
             for i, word in enumerate(args) if word == '--member']
    assert len(members) == len(names) == 2 and Path(args[0]).name == 'train_pack.py'
    output = f'$ {shlex.join(map(str, args))}\n' + ''.join(
        f'[run {k}: {name}] error: {name} cannot train\n' for k, name in enumerate(names, 1))
    print(output, end='', file=log, flush=True)
    return 2, output


@pytest.mark.parametrize('jobs', ['2', '3'])
def test_a_failed_cell_of_a_pack_names_the_log_its_pack_wrote(tmp_path, monkeypatch, capsys,
                                                             jobs):
    monkeypatch.setattr(cells, 'call', fake_call)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as stopped:
        grid.main(['--quick', '--pack', '2', '--jobs', jobs, '--gpus', 'none', '--snapshots',
                   str(tmp_path / 'snaps'), '--out', str(out)])
    assert stopped.value.code == grid.EXIT_CELLS_FAILED
    printed = capsys.readouterr()
    failed = re.findall(r'^failed (\S+): .*; log (\S+)$', printed.out, re.M)
    final = printed.err.strip().splitlines()[-1]
    assert final.startswith('error: 4 of 4 cells failed: ')
    in_final = re.findall(r'(grid-quick/\S+) \(.*?; log (\S+?)\)(?:; |$)', final)
    assert len(failed) == len(in_final) == 4
    assert sorted(failed) == sorted(in_final)
    written = sorted(str(p) for p in (out / 'logs').rglob('*.log'))
    assert len(written) == 2  # one per pack of 2
    for name, log in failed:
        assert log in written, (name, log, written)
        text = Path(log).read_text()  # its pack's: the pack's command, its member's error
        assert re.search(rf'^\$ \S*train_pack\.py --script train_cifar\.py .*'
                         rf'snapshot_name={re.escape(name)}\b', text, re.M), (name, log)
        assert f'] error: {name} cannot train' in text
