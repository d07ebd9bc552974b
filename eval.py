"""Evaluate trained multi-exit networks on the test split, as a sacred experiment.

    python3 eval.py with snapshot_name=3              # run id (folder of snapshots/)
    python3 eval.py with snapshot_name=test:0         # the snapshot_name given at training
    python3 eval.py with snapshot_name=snapshots/3/ep120.pt
    python3 eval.py with snapshot_name=old_ep300 cf_net.n_exits=11  # a file of the original code
    python3 eval.py with "snapshot_name=['3', '5']"   # several, overlaid in the figures

Prints per exit top-1, top-5, ensemble accuracy, the top-1 of Product Anytime (Jazbec et al.
2023's post-hoc product of experts), ECE (also temperature-scaled), cost, and the time per image
measured on this device in both early-exit modes; fits early-exit thresholds on the
training run's validation split and applies them to the test split (budgeted batch
classification). Writes anytime.csv, budgeted.csv, anytime.png, budgeted.png and budgeted_ms.png
to the evaluation's run folder in snapshots/. The sacred result (run.json) is the
flat dict of metrics, or for several snapshots {snapshot: dict of metrics}.
"""
from pathlib import Path

import pandas as pd
import torch

from multiexit import data
from multiexit.data.data_dir import check_data_dir
from multiexit.early_exit import timing
from multiexit.config import PAPER_NET
from multiexit.early_exit.thresholds import budget_sweep
from multiexit.errors import ConfigError, SnapshotError, reported_as_one_line
from multiexit.evaluate import anytime_poe, calibration, flops, plots
from multiexit.evaluate.passes import exit_logits, load_model
from multiexit.evaluate.report import anytime_frame, exit_report, per_exit_table
from multiexit.metrics import check_tops, default_tops
from multiexit.progress import bar
from multiexit.runs import find, table
from multiexit.checks import plain
from multiexit.train import checkpoint
from multiexit.train.run import resolve_device
from sacred_setup import SNAPSHOT_DIR, Experiment, announce, refusing

ex = Experiment('eval')  # runs in snapshots/

# The paper's data, for a file of the original code that comes without its training config.
PAPER_VAL = dict(call='Cifar100', n_per_class=150, nval_per_class=50, seed=0)


@ex.config
def config():
    gpu = 0 if torch.cuda.is_available() else -1  # CUDA device ordinal; -1 = CPU
    snapshot_name = None  # run id, snapshot_name given at training, run dir, file, or a list
    #   of them (None: 'test:0', the name train_cifar.py gives by default); of several runs
    #   with one name, the newest COMPLETED one
    checkpoint = None  # in a run: None or 'best' (validation acc1_avg), 'last' or an epoch number
    cf_test = dict(  # test data (None: the training run's data set and subset seed)
        call=None,  # 'Cifar100', 'Cifar10', 'ImageFolder' (its val/) or 'ImageNet' (val_images/)
        seed=None,  # seed of the class permutation used at training (the label map)
    )
    cf_val = None  # split to fit early-exit thresholds on (None: the training run's cf_val)
    cf_loss = dict(  # evaluation metric
        call='_MultiExitAccuracy',
        acc_tops=None,  # top-k accuracies reported (None: [1, 5], or [1] below 5 classes)
    )
    batch_size = 250  # evaluation batch (and the streaming early exit's, timed)
    time_repeats = 5  # timed runs of every block per early-exit mode, for ms per image (0: none)
    data_dir = None  # None: the training run's data_dir (else 'data')
    cf_net = PAPER_NET  # architecture of a bare state dict from the original code only


# What to do when a run's config.json cannot be read: what eval.py takes from it.
UNREADABLE = ('eval.py tests on the data set, label permutation, validation split and data_dir '
              'recorded there: restore the file, or remove it and give them: cf_test.call, '
              'cf_test.seed, cf_val, data_dir')


def training_config(path):
    """config.json of the training run that holds ``path`` (a run dir or one of its files); {}
    where there is none (a file of the original code); one that cannot be read is an error."""
    run_dir = path if path.is_dir() else path.parent
    return find.recorded_config(run_dir, UNREADABLE) or {}


def snapshot_label(name):
    """How the figures name a snapshot: its training run's method, name and id (the name as
    given for a file outside a run)."""
    path = find.resolve(name, SNAPSHOT_DIR)
    trained = table.flatten(training_config(path))
    if not trained:
        return str(name)
    run = path if path.is_dir() else path.parent
    epoch = f', {path.stem}' if path.is_file() and path.name != checkpoint.LAST else ''
    return (f'{table.method_label(trained) or "?"}: {trained.get("snapshot_name", name)} '
            f'(run {run.name}{epoch})')


def default_snapshot():
    """The snapshot of an eval.py without snapshot_name: the default name of training runs,
    said as such (the user never typed it)."""
    default = find.DEFAULT_NAME
    try:
        find.resolve(default, SNAPSHOT_DIR)
    except find.UnknownSnapshot:
        raise SnapshotError(f'no snapshot_name given, and no training run in {SNAPSHOT_DIR}/ has '
                            f'the default one, {default} (the name of a training run that sets '
                            f'none): set snapshot_name=<run id, snapshot name or path> (python3 '
                            f'-m multiexit.runs lists the runs)') from None
    except SnapshotError as e:
        raise SnapshotError(f'no snapshot_name given, so the default, {default}: {e}') from None
    print(f'no snapshot_name given: evaluating the default, {default} (the name of a training '
          f'run that sets none)')
    return default


def prepare_snapshot(name, checkpoint, cf_test, cf_val, cf_loss, data_dir, device, cf_net):
    """What evaluating one snapshot takes, checked before any image is read: its checkpoint
    file, model, and test and validation data (the training run's unless set), which must have
    the model's classes and input size."""
    path = find.pick_checkpoint(find.resolve(name, SNAPSHOT_DIR, say=print), checkpoint)
    model, net, ckpt = load_model(path, device, plain(cf_net))
    n_exits = len(model.exits)
    if cf_loss.get('n_exits', n_exits) != n_exits:
        raise ConfigError(f"cf_loss n_exits={cf_loss['n_exits']} but {path} has {n_exits} exits")
    acc_tops = tuple(cf_loss['acc_tops'] or default_tops(net['out_dim']))
    check_tops(acc_tops, net['out_dim'], path)
    trained = training_config(path)
    if not trained:
        print(f'no config.json beside {path} (not in a training run\'s folder): the data are '
              f'the paper\'s unless set (cf_test, cf_val, data_dir)')
    cf_trn = trained.get('cf_trn') or PAPER_VAL
    # the test split of the training run's data set (with its other keys, such as image_size)
    cf = dict(cf_trn, call=cf_test.get('call') or cf_trn['call'],
              seed=cf_test['seed'] if cf_test.get('seed') is not None else cf_trn['seed'])
    cf_val = plain(cf_val) or trained.get('cf_val') or dict(PAPER_VAL, call=cf['call'],
                                                            seed=cf['seed'])
    data_dir = data_dir or trained.get('data_dir', 'data')
    check_data_dir(data_dir)
    test_data, val_data = data.build(cf, 'test'), data.build(cf_val, 'val')
    for key, data_set, cf_data in (('cf_test', test_data, cf), ('cf_val', val_data, cf_val)):
        check_fits(path, model, net, key, data_set, cf_data['call'], data_dir,
                   cf_trn['call'] if trained else None)
    return dict(path=path, model=model, net=net, ckpt=ckpt, n_exits=n_exits, acc_tops=acc_tops,
                cf=cf, data_dir=data_dir, test_data=test_data, val_data=val_data)


def check_fits(path, model, net, key, data_set, call, data_dir, trained_on):
    """A ConfigError where ``data_set`` (of ``key``: 'cf_test' or 'cf_val', ``call`` its name)
    has other classes or another input size than the model of ``path``, which was trained on
    the data set ``trained_on`` (None: unknown)."""
    fix = (f'leave {key} unset to use the training run\'s ({trained_on})' if trained_on else
           f'set {key} to the data the model was trained on')
    n_classes, out_dim = data_set.n_classes(data_dir), net['out_dim']
    if n_classes != out_dim:
        raise ConfigError(f'{path} classifies {out_dim} classes but {key} call={call!r} has '
                          f'{n_classes}: {fix}')
    in_shape, size = getattr(model, 'in_shape', None), data_set.input_size
    if in_shape is not None and in_shape != size:
        raise ConfigError(f'{path} takes images of {in_shape}x{in_shape} but {key} '
                          f'call={call!r} gives {size}x{size}: {fix}')


def evaluate_snapshot(snapshot, batch_size, device, timer=None):
    """(flat metrics, anytime frame, budgeted frame) of one snapshot (``prepare_snapshot``);
    ``timer``: the time per exit of each architecture, measured once
    (``timing.PerArchitecture``; None: not timed)."""
    path, model, ckpt, cf = snapshot['path'], snapshot['model'], snapshot['ckpt'], snapshot['cf']
    n_exits, acc_tops, data_dir = snapshot['n_exits'], snapshot['acc_tops'], snapshot['data_dir']
    test_data = snapshot['test_data']
    test_loader = test_data.loader('test', data_dir, batch_size, device)
    val_loader = snapshot['val_data'].loader('val', data_dir, batch_size, device)
    print(f'{path} (epoch {ckpt.get("epoch", "?")}) on {cf["call"]} test, '
          f'{len(test_loader.labels)} images from {data_dir}; thresholds fitted on '
          f'{len(val_loader.labels)} validation images')
    test = exit_logits(model, test_loader, progress=lambda it: bar(it, 'test'))
    val = exit_logits(model, val_loader, progress=lambda it: bar(it, 'validation'))
    size = test_data.input_size
    costs = flops.exit_costs(model, (3, size, size))
    times = timer.exit_ms(model, snapshot['net'], (3, size, size)) if timer else None
    # per-exit temperatures fitted on the validation split, so the test ECE after scaling is fair
    report = exit_report(*test, costs, acc_tops, times, calibration.fit_temperatures(*val))
    report.update(anytime_poe.poe_report(*test))
    anytime = anytime_frame(report, n_exits, acc_tops)
    print(per_exit_table(anytime, acc_tops))
    budgeted = budget_sweep(*val, *test, [c['macs_all_heads'] for c in costs], times)
    return report, anytime, budgeted


@ex.main
def main(_run, snapshot_name, checkpoint, cf_test, cf_val, cf_loss, batch_size, data_dir, gpu,
         cf_net, time_repeats):
    with reported_as_one_line(), refusing(_run):  # bad input: the run leaves no folder
        if cf_loss.get('call') != '_MultiExitAccuracy':
            raise ConfigError("cf_loss.call must be '_MultiExitAccuracy', got "
                              f"{cf_loss.get('call')!r}")
        acc_tops = cf_loss.get('acc_tops')
        if acc_tops is not None and 1 not in acc_tops:
            raise ConfigError(f'cf_loss.acc_tops={list(acc_tops)} must include 1 (the early-exit '
                              f'curves are top-1)')
        if isinstance(time_repeats, bool) or not isinstance(time_repeats, int) or time_repeats < 0:
            raise ConfigError(f'time_repeats must be an int >= 0 (0: no timing), got '
                              f'{time_repeats!r}')
        snapshot_name = default_snapshot() if snapshot_name is None else snapshot_name
        checkpoint = 'best' if checkpoint is None else checkpoint
        names = [str(n) for n in (snapshot_name if isinstance(snapshot_name, (list, tuple))
                                  else [snapshot_name])]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f'snapshot_name={names}: give one snapshot or a list without repeats')
        device = resolve_device(gpu)
        snapshots = [prepare_snapshot(name, checkpoint, cf_test, cf_val,
                                      dict(cf_loss, acc_tops=acc_tops), data_dir, device, cf_net)
                     for name in names]  # every one checked before any image is read
        results, anytime, budgeted = {}, [], []
        # snapshots of one architecture are timed once: their curves in ms differ by their exits
        timer = timing.PerArchitecture(batch_size, time_repeats) if time_repeats else None
        for name, snapshot in zip(names, snapshots):
            report, any_frame, budget_frame = evaluate_snapshot(snapshot, batch_size, device,
                                                                timer)
            results[name] = report
            for frame, frames in ((any_frame, anytime), (budget_frame, budgeted)):
                frame.insert(0, 'snapshot', name)
                frames.append(frame)
        announce(_run)  # nothing refused it: its run folder stays
        run_dir = Path(_run.observers[0].dir if _run.observers else f'{SNAPSHOT_DIR}/unobserved')
        run_dir.mkdir(parents=True, exist_ok=True)
        anytime, budgeted = pd.concat(anytime), pd.concat(budgeted)
        anytime.to_csv(run_dir / 'anytime.csv', index=False)
        budgeted.to_csv(run_dir / 'budgeted.csv', index=False)
        labels = {name: snapshot_label(name) for name in names}
        plots.anytime_figure(anytime, run_dir / 'anytime.png', labels)
        plots.budgeted_figure(budgeted, anytime, run_dir / 'budgeted.png', labels)
        written = 'anytime.csv, budgeted.csv, anytime.png, budgeted.png'
        if time_repeats:
            plots.budgeted_figure(budgeted, anytime, run_dir / 'budgeted_ms.png', labels,
                                  timing.TIME_COLUMNS)
            written += ', budgeted_ms.png'
        print(f'wrote {written} to {run_dir}')
        return results[names[0]] if len(names) == 1 else results


if __name__ == '__main__':
    ex.run_commandline()
