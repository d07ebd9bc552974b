"""What the test modules share (no test module imports another): the repository's paths, small
model configs, and running a script, in this process through its command line
(``run_in_process``, the default layer) or as a user types it (``run_script``, a process: the
end-to-end layer, tests/e2e/)."""
import ast
import contextlib
import importlib
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pandas as pd
import torch

from multiexit.runs.table import parse_filter

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / 'data'
SHARED_REFERENCE = ROOT.parent / 'shared' / 'reference'
# Set by .ci/run: there the reference is always present, so a test that needs it must not skip.
REQUIRE_REFERENCE = 'MULTIEXIT_REQUIRE_REFERENCE'

# A temperature that moves: maxprob far below the confidence of a fresh 100-class teacher (about
# 0.02) makes DBT raise T from the first step, so a resume that lost T does not go unnoticed.
RISING_T = 'cf_loss.maxprob=0.015'

# The smoke MsdNet's layout without its data set: 3 exits.
SMALL_NET = dict(call='MsdNet', n_exits=3, nlayers_to_exit=2, nlayers_between_exits=1,
                 nplanes_mulv=[2, 4, 8], exit_width=16, btneck_widths=[2, 2, 2])

# A small configuration of every registered model, each with TINY_EXITS exits, for the generic
# contract tests.
TINY_EXITS = 3
TINY = {
    'MsdNet': dict(call='MsdNet', n_exits=3, nlayers_to_exit=2, nlayers_between_exits=1,
                   nplanes_mulv=[2, 4, 8], exit_width=8, btneck_widths=[2, 2, 2], out_dim=10),
    'ResNet': dict(call='ResNet', depth=8, exit_after=[0, 1], head='conv', head_width=8,
                   out_dim=10),
    'WideResNet': dict(call='WideResNet', depth=10, widen_factor=1, exit_after=[0, 1], out_dim=10),
    'ImageNetResNet': dict(call='ImageNetResNet', depth=18, exit_after=[0, 1], head='conv',
                           head_width=8, out_dim=10),
}

GS = 10 / 11  # the paper's global_scale = 2 * 5 / 11


def reference_inputs(scale):
    """The 11 exits' logits of 8 examples of 100 classes, and their labels, that the reference
    figures of the losses were computed on."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 8, 100, generator=g) * scale
    y = torch.randint(0, 100, (8,), generator=g)
    return list(logits), y


def assert_png(path):
    """``path`` is a figure: a PNG of some size that is not a blank canvas."""
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(b'\x89PNG\r\n\x1a\n') and len(data) > 20_000
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert image.std() > 0.05  # not a blank canvas


@contextlib.contextmanager
def refused_downloads():
    """Environment variables under which downloads go through a proxy that refuses every
    connection (a bound port nobody listens on), so they fail whether or not the machine has
    network."""
    with socket.socket() as closed:
        closed.bind(('127.0.0.1', 0))
        proxy = f'http://127.0.0.1:{closed.getsockname()[1]}'
        env = {name: proxy for name in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY')}
        env.update(no_proxy='', NO_PROXY='')
        yield env


def pythonpath():
    """PYTHONPATH for a script's subprocess: the repository first, then what this process has
    (packages installed aside, e.g. sacred from wheels on a GPU machine)."""
    return os.pathsep.join([str(ROOT)] + ([os.environ['PYTHONPATH']]
                                          if os.environ.get('PYTHONPATH') else []))


def run_script(script, *args, cwd, snapshots, check=True, env=None):
    """Run train_cifar.py / eval.py as a user would, with ``env`` added to the environment;
    returns the CompletedProcess."""
    # one thread: tiny networks gain nothing from two, and parallel runs would oversubscribe
    env = dict(os.environ, MULTIEXIT_SNAPSHOTS=str(snapshots), PYTHONPATH=pythonpath(),
               OMP_NUM_THREADS='1', **(env or {}))
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return proc


class Ran(subprocess.CompletedProcess):
    """A script's command line run in this process: its exit code, stdout and stderr (sacred's
    log lines included), and ``run``, the sacred Run it returned (None if it did not end)."""
    run = None


@contextlib.contextmanager
def logged_to(stream):
    """sacred's log (the root logger, which pytest's own handlers may hold instead of the
    script's stream handler) to ``stream`` as the script writes it, its quiet lines left out."""
    from sacred_setup import _Quiet

    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter('%(levelname)s - %(name)s - %(message)s'))
    handler.addFilter(_Quiet())
    root = logging.getLogger()
    level, others = root.level, [h for h in root.handlers if type(h) is logging.StreamHandler]
    for other in others:  # the script's own, bound to a stream of an earlier test
        root.removeHandler(other)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for other in others:
            root.addHandler(other)
        root.setLevel(level)


def run_in_process(script, *args, cwd, check=True, env=None):
    """``python3 <script> <args>`` in ``cwd``, in this process: sacred's command line of the
    script's experiment (``ex.run_commandline``), its runs in ``cwd``/snapshots/, the script's
    default, with ``env`` added to the environment. A SystemExit is its exit code; an
    interruption is 130, as the training scripts' main turns it. Returns a ``Ran``."""
    from multiexit.errors import EXIT_CODE_INTERRUPTED

    ex = importlib.import_module(Path(script).stem).ex
    argv = [script, *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    code, run = 0, None
    with (mock.patch.dict(os.environ, env or {}), mock.patch.object(sys, 'argv', argv),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), logged_to(err)):
        os.chdir(cwd)
        try:
            run = ex.run_commandline(argv)
        except SystemExit as e:
            code = e.code
        except KeyboardInterrupt:
            code = EXIT_CODE_INTERRUPTED
        finally:
            os.chdir(before)
    ran = Ran(argv, code, out.getvalue(), err.getvalue())
    ran.run = run
    if check and code != 0:
        raise AssertionError(f'{script} {args} failed ({code}):\n{ran.stderr[-3000:]}')
    return ran


def saved_epoch(run):
    """The epoch that ``run``'s last.pt holds (0 while it holds none, or is being written)."""
    try:
        return torch.load(run / 'last.pt', weights_only=True)['epoch']
    except Exception:
        return 0


def run_status(run):
    """The status that sacred recorded in ``run``'s run.json."""
    return json.loads((run / 'run.json').read_text())['status']

def assert_the_failed_cell_is_reported(proc, folder):
    """What the grid says of ``--quick --methods dbt -- batch_size=1500`` run in ``folder``:
    cell n10 failed (1,000 training images), with its log; cell n20 finished, alone in the
    results."""
    failed, log = 'grid-quick/dbt/n10/s0', 'results/logs/grid-quick/dbt/n10/s0.log'
    reason = 'train_cifar.py exit code 2 (error: batch_size=1500 exceeds the 1000 training examples'
    assert re.search(rf'^failed {failed}: {re.escape(reason)}.*; log {log}$', proc.stdout, re.M)
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f'error: 1 of 2 cells failed: {failed} ({reason}')
    assert proc.stderr.strip().endswith(f'; log {log})')
    assert 'error: batch_size=1500 exceeds' in (folder / log).read_text()
    assert re.search(r'^done grid-quick/dbt/n20/s0 ', proc.stdout, re.M)
    results = pd.read_csv(folder / 'results' / 'grid-quick_dbt_batch_size=1500.csv')
    assert set(results['size']) == {20}


def grid_run_config(settings):
    """The config.json of a training run of the quick grid's cells with ``settings`` (the
    grid's key=value settings)."""
    config = {'cf_net': {'call': 'MsdNet'}, 'data_dir': 'data/smoke', 'parent_snapshot': None}
    for key, text in map(parse_filter, settings):
        *parents, last = key.split('.')
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[last] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            node[last] = text
    config.setdefault('cf_trn', {})['call'] = 'Cifar100'
    return config


def assert_resumed_exactly(last, reference, epoch):
    """The training state ``last`` (a last.pt) of a resumed run is the uninterrupted run's
    ``reference`` at ``epoch``: the same weights and loss state (DBT's temperature), to the
    bit."""
    resumed = torch.load(last, weights_only=True)
    ref = torch.load(reference, weights_only=True)
    assert resumed['epoch'] == ref['epoch'] == epoch
    for k, v in ref['model'].items():
        assert torch.equal(v, resumed['model'][k]), k
    assert resumed['loss'].keys() == ref['loss'].keys()
    for k, v in ref['loss'].items():
        assert torch.equal(resumed['loss'][k], v), k


def train_epochs_of_steps(step, loss_fn, data, n_epochs, record=lambda losses: losses):
    """Each batch of ``data`` as an epoch of its own of ``step``, for ``n_epochs`` epochs of
    the loss (``set_epoch``): [record(each epoch's losses)], what the step tests compare."""
    from multiexit.train.loop import set_loss_epoch
    out = []
    for epoch in range(n_epochs):
        set_loss_epoch(loss_fn, epoch, n_epochs)
        for x, y in data:
            step.start_epoch()
            step(x, y)
            out.append(record(step.finish_epoch()[0]))
    return out
