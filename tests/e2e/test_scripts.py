"""train_cifar.py and eval.py as a user types them, each a process of its own: the golden path
(train, resume, evaluate), a fresh interpreter's imports, and the commands of the README and the
docs. What the scripts compute and refuse is checked in this process: tests/test_scripts.py."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import RISING_T, ROOT, pythonpath, run_script

SMALL = ['smoke', 'cf_scheduler.milestones=[1]', RISING_T, 'seed=1']


def read(path):
    return json.loads(path.read_text())


@pytest.fixture(scope='module')
def golden(tmp_path_factory):
    """Runs 1: 1 epoch; 2: run 1 resumed to 2 epochs; 3: eval of the newest smoke run (2)."""
    work = tmp_path_factory.mktemp('work')
    snaps = work / 'snapshots'
    run = lambda script, *a: run_script(script, *a, cwd=work, snapshots=snaps)
    procs = {
        'train': run('train_cifar.py', 'with', *SMALL),
        'resumed': run('train_cifar.py', 'with', *SMALL, 'n_epochs=2', 'parent_snapshot=1'),
        'eval': run('eval.py', 'with', 'snapshot_name=smoke'),
    }
    return snaps, procs


def test_train_resume_and_eval_print_no_sacred_warnings_and_end_with_their_line(golden):
    """No 'Changed type of config entry' warnings (a run id, an epoch number or the smoke config
    have the types users give), no dict of the result: a training run ends with a line of its
    own, which names the run folder as the user will type it."""
    snaps, procs = golden
    for name, proc in procs.items():
        assert 'WARNING' not in proc.stderr and 'Result:' not in proc.stderr, \
            (name, proc.stderr[-2000:])
    result = read(snaps / '2' / 'run.json')['result']
    assert procs['resumed'].stdout.strip().splitlines()[-1] == (
        f'{snaps}/2: trained epochs 2 to 2; best validation top-1 (mean over exits) '
        f'{100 * result["best_val_acc1_avg"]:.2f} % at epoch {result["best_epoch"]}; '
        f'evaluate it with: python3 eval.py with snapshot_name={snaps}/2')
    assert 'these settings change from epoch 2 on: n_epochs 1 -> 2\n' in procs['resumed'].stdout


def test_the_terminal_gets_progress_bars_and_the_run_folder_the_table(golden):
    snaps, procs = golden
    cout = (snaps / '1' / 'cout.txt').read_text()
    assert 'val top-1 of exit' in cout and '\r' not in cout and 'it/s' not in cout
    assert 'it/s' in procs['train'].stderr


def test_run_files_are_strict_json_and_the_eval_finds_the_newest_smoke_run(golden):
    """No NaN or Infinity, which json.loads takes but jq and JavaScript reject."""
    snaps, procs = golden

    def refuse(constant):
        raise ValueError(constant)
    files = [p for run in snaps.iterdir() if run.name.isdigit() for p in run.glob('*.json')]
    assert len(files) >= 8  # config.json and run.json of each, metrics.json of a training
    for path in files:
        json.loads(path.read_text(), parse_constant=refuse)
    assert [read(snaps / r / 'run.json')['status'] for r in '123'] == ['COMPLETED'] * 3
    assert ("snapshot_name='smoke': run 2 (COMPLETED, the newest of 2 runs with that name)"
            in procs['eval'].stdout)
    assert (snaps / '3' / 'anytime.csv').is_file() and (snaps / '3' / 'budgeted.png').is_file()


def test_the_cifar_scripts_start_without_torchvision_or_dynamo():
    """torchvision's import (~2.5 s: it loads torch._dynamo) is paid only where images are
    read from folders or an ImageNet ResNet is built, not by every start of the CIFAR scripts;
    eval.py's cost count does not load torch._dynamo either (torch.optim does, in training)."""
    code = ('import sys, eval, training_experiment; from multiexit import models; '
            'from multiexit.evaluate import flops; '
            'flops.exit_costs(models.build(dict(call="ResNet", depth=8))); '
            'print(sorted(m for m in sys.modules if m.split(".")[0] == "torchvision" '
            'or m.startswith("torch._dynamo")))')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=pythonpath()), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == '[]'


@pytest.mark.parametrize('page, script', [('README.md', 'train_cifar.py'),
                                          ('docs/imagenet.md', 'train_imagenet.py')])
def test_smoke_block_works_after_the_main_command_failed(tmp_path, no_download, page, script):
    """A reader who tries the page's main command first (no data here: refused, and no run
    folder left) and then its smoke block: the block, run as written, evaluates the smoke
    run."""
    snaps = tmp_path / 'snapshots'
    failed = run_script(script, cwd=tmp_path, snapshots=snaps, check=False, env=no_download)
    assert failed.returncode == 2 and not (snaps / '1').exists()  # refused: no run folder
    text = (ROOT / page).read_text()
    block = re.search(rf'```bash\n(python3 {script} with smoke\n.*?)```', text, re.S).group(1)
    commands = [shlex.split(line) for line in block.splitlines()]
    assert [c[:2] for c in commands] == [['python3', script], ['python3', 'eval.py']]
    for _, name, *args in commands:
        run_script(name, *args, cwd=tmp_path, snapshots=snaps)
    evaluation = read(snaps / '2' / 'run.json')
    assert evaluation['experiment']['name'] == 'eval' and evaluation['status'] == 'COMPLETED'
    said, evaluated = (snaps / '2' / 'cout.txt').read_text().splitlines()[:2]
    assert re.fullmatch(r"snapshot_name='smoke(-imagenet)?': run 1 \(COMPLETED\)", said)
    assert evaluated.startswith(f'{snaps}/1/')  # the smoke run
