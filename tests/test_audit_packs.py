"""What a pack's members rely on, each checked where a break would go unnoticed otherwise: a
DBT member keeps its own temperature (among members of other methods too), a member of another
method its own loss state, members of other optimizer settings are refused, a failed
member leaves the others' records their own, and the printed resume command of an interrupted
ImageNet pack resumes it with train_imagenet.py. In this process, on tiny generated data."""
import json
import shlex

import pytest
import torch
from torch import nn

from multiexit import losses
from multiexit.config import TrainConfig
from multiexit.data.cifar import write_fake_cifar
from multiexit.errors import ConfigError, NonFiniteLossError
from multiexit.train import checkpoint, pack
from multiexit.train.loop import fit
from multiexit.train.pack import PackedRuns, PackLoss
from multiexit.train.run import Run

NET = dict(call='MsdNet', n_exits=3, nlayers_to_exit=2, nlayers_between_exits=1,
           nplanes_mulv=[2, 4, 8], exit_width=8, btneck_widths=[2, 2, 2], out_dim=None)
# 4 training images per class of 10, batch 8: 5 steps an epoch
DATA = dict(call='Cifar10', n_per_class=5, nval_per_class=1, augment=False)
OPT = dict(call='SGD', lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
SCHEDULE = dict(call='MultiStepLR', milestones=[1], gamma=0.5)
STANDARD = dict(call='ClassificationOnlyLoss')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_fake_cifar(root, 'Cifar10', n_train_per_class=5, n_test_per_class=1)
    return root


def make_run(data_dir, run_dir, seed, cf_loss, n_epochs=2, opt=OPT):
    """A run of the tiny MsdNet whose metrics (name, value, epoch) go to ``run.scalars``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    trn = dict(DATA, seed=seed)
    cfg = TrainConfig(cf_net=NET, cf_loss=dict(cf_loss, acc_tops=[1]), cf_trn=trn,
                      cf_val=trn, cf_opt=opt, cf_scheduler=SCHEDULE, batch_size=8,
                      val_batch_size=10, n_epochs=n_epochs, data_dir=str(data_dir), gpu=-1,
                      seed=seed)
    scalars = []
    run = Run(cfg, run_dir, log=lambda *a: None, log_scalar=lambda *a: scalars.append(a))
    run.scalars = scalars
    return run


# --- 1. a DBT member keeps its own temperature ---

def dbt(maxprob, Tmult=1.05):
    return losses.DistillationBasedLoss(C=0.5, maxprob=maxprob, n_exits=2, Tmult=Tmult)


def member_logits(confidences, classes=10, batch=4):
    """Every exit's logits (K, batch, classes): member k's teacher (the last exit) puts about
    ``confidences[k]`` of its probability on one class; the early exit is uniform."""
    teacher = torch.zeros(len(confidences), batch, classes)
    for k, p in enumerate(confidences):  # softmax: p on class 0, the rest spread evenly
        teacher[k, :, 0] = torch.log(torch.tensor(p * (classes - 1) / (1 - p)))
    return [torch.zeros_like(teacher), teacher]


def test_an_over_confident_teacher_raises_only_its_own_members_temperature():
    """Member 0's teacher is sure (0.99), member 1's is not (0.2); both have maxprob 0.5: only
    member 0's T rises, and every member's T is what its own loss alone gives, step after step,
    with its own maxprob and Tmult."""
    y = torch.zeros(2, 4, dtype=torch.long)
    loss = PackLoss([dbt(0.5), dbt(0.5)]).train()
    loss(member_logits([0.99, 0.2]), y)
    assert loss.temperature.tolist() == [1.05, 1.0]
    loss(member_logits([0.2, 0.99]), y)
    assert loss.temperature.tolist() == [1.05, 1.05]

    members = [dbt(0.5, Tmult=1.1), dbt(0.3, Tmult=1.02), dbt(0.9, Tmult=1.5)]
    loss = PackLoss(members).train()
    for confidences in ([0.4, 0.2, 0.95], [0.6, 0.35, 0.5], [0.99, 0.99, 0.1], [0.1, 0.1, 0.1]):
        logits = member_logits(confidences)
        loss(logits, torch.zeros(3, 4, dtype=torch.long))
        for k, alone in enumerate(members):
            alone.train()(([logit[k] for logit in logits]), torch.zeros(4, dtype=torch.long))
        assert loss.temperature.tolist() == [m.T for m in members], confidences
    assert [m.T for m in members] == [1.1 ** 2, 1.02 ** 2, 1.5]  # each rose, on its own steps


def test_dbt_members_among_other_methods_keep_their_own_temperatures():
    """DBT members on either side of a member of another method (distillation from later exits,
    computed on its own part of the logits): each T is what its own loss alone gives, step after
    step, and the other member's stays 1."""
    members = [dbt(0.5, Tmult=1.1), losses.DistillationFromLaterExits(2), dbt(0.3, Tmult=1.02)]
    loss = PackLoss(members).train()
    y = torch.zeros(4, dtype=torch.long)
    for confidences in ([0.4, 0.9, 0.95], [0.6, 0.99, 0.5], [0.99, 0.1, 0.1]):
        logits = member_logits(confidences)
        loss(logits, torch.zeros(3, 4, dtype=torch.long))
        for k in (0, 2):
            members[k].train()([logit[k] for logit in logits], y)
        assert loss.temperature.tolist() == [members[0].T, 1.0, members[2].T], confidences
    assert [members[0].T, members[2].T] == [1.1 ** 2, 1.02 ** 2]  # each rose on its own steps


class Warming(nn.Module):
    """A loss of another method with a temperature of its own, doubled by every call."""
    n_exits, acc_tops = 2, (1,)

    def __init__(self):
        super().__init__()
        self.register_buffer('temperature', torch.tensor(1.0, dtype=torch.float64))

    def forward(self, logits_list, y):
        self.temperature.mul_(2)
        return logits_list[-1].sum() * 0


def test_a_member_of_another_method_keeps_its_own_loss_state():
    """Its own module computes its loss: its state (here a temperature) is its own, the pack's
    temperature follows it (for adj_maxprob), and scattering the pack leaves it alone."""
    members = [dbt(0.5), Warming()]
    loss = PackLoss(members).train()
    for _ in range(2):
        loss(member_logits([0.99, 0.2]), torch.zeros(2, 4, dtype=torch.long))
    assert loss.temperature.tolist() == [1.05 ** 2, 4.0]
    loss.scatter(members)
    assert members[0].T == 1.05 ** 2 and members[1].temperature.item() == 4.0


def test_a_packed_dbt_member_ends_with_its_own_temperature(data, tmp_path):
    """A DBT member that never anneals (maxprob 0.999) packed with one that always does
    (maxprob 0.01): after training, its loss, checkpoint and metrics say T = 1."""
    runs = [make_run(data, tmp_path / '0', 0, dict(call='DistillationBasedLoss', C=0.5,
                                                   maxprob=0.01), n_epochs=1),
            make_run(data, tmp_path / '1', 1, dict(call='DistillationBasedLoss', C=0.5,
                                                   maxprob=0.999), n_epochs=1)]
    fit(PackedRuns(runs))
    hot, cool = runs
    assert hot.error is None and cool.error is None
    assert hot.loss_fn.T == 1.05 ** 5 and cool.loss_fn.T == 1.0
    saved = [checkpoint.load(run.run_dir / 'last.pt')['loss']['temperature'].item()
             for run in runs]
    assert saved == [1.05 ** 5, 1.0]
    assert [value for name, value, _ in cool.scalars if name == 'temperature'] == [1.0]


# --- 2. members of other optimizer settings are refused ---

@pytest.mark.parametrize('change', [dict(lr=0.1), dict(momentum=0.5), dict(weight_decay=0.0),
                                    dict(nesterov=False)])
@pytest.mark.parametrize('which', [1, 2])
def test_members_of_other_optimizer_settings_are_refused(data, tmp_path, change, which):
    """Whichever member differs (the second or the third of three), the pack refuses them,
    naming cf_opt and the setting, before anything trains."""
    runs = [make_run(data, tmp_path / str(k), k, STANDARD,
                     opt=dict(OPT, **change) if k == which else OPT) for k in range(3)]
    (key, value), = change.items()
    with pytest.raises(ConfigError, match=rf'the runs of a pack share cf_opt, but run '
                                          rf'{which + 1} differs from run 1 in '
                                          rf'cf_opt\.{key} {OPT[key]} -> {value}'):
        PackedRuns(runs)
    assert all(not any(run.run_dir.iterdir()) for run in runs)


# --- 3. after one member fails, the others keep their own records ---

def records(run):
    """A run's metrics as {(name, epoch): value} and its last.pt's epoch."""
    return ({(name, epoch): value for name, value, epoch in run.scalars},
            checkpoint.load(run.run_dir / 'last.pt')['epoch'])


@pytest.mark.parametrize('bad_at', [0, 1, 2])
def test_a_failed_member_leaves_the_others_epochs_their_own(data, tmp_path, bad_at):
    """Three members, one of whose loss is infinite from its first step (epoch 1 of 2): the two
    healthy ones train both epochs, and their every metric of both epochs is the one they get
    in a pack of the two without it."""
    seeds = [s for s in range(3) if s != bad_at]

    def healthy(folder):
        return {s: make_run(data, tmp_path / folder / str(s), s, STANDARD) for s in seeds}
    alone = healthy('reference')
    fit(PackedRuns(list(alone.values())))
    mine = healthy('with-bad')
    bad = make_run(data, tmp_path / 'with-bad' / 'bad', bad_at,
                   dict(call='DistillationLossConstTemp', C=0.3, T=4.0, global_scale=1e38))
    members = list(mine.values())
    members.insert(bad_at, bad)
    last_val, _ = fit(PackedRuns(members))
    assert isinstance(bad.error, NonFiniteLossError) and not any(bad.run_dir.iterdir())
    assert last_val[bad_at] == {}
    for s in seeds:
        assert mine[s].error is None and mine[s].epoch == 2
        got, want = records(mine[s]), records(alone[s])
        assert got[1] == want[1] == 2
        assert got[0].keys() == want[0].keys()
        assert {'train.loss', 'val.acc1_avg'} <= {name for name, _ in got[0]}
        for key, value in want[0].items():
            assert got[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (s, key)
        want_val = {name[4:]: value for (name, epoch), value in want[0].items()
                    if epoch == 2 and name.startswith('val.')}
        assert last_val[members.index(mine[s])] == pytest.approx(want_val, rel=1e-4, abs=1e-6)


# --- 4. an interrupted ImageNet pack's resume command uses train_imagenet.py ---

def interrupt_second_epoch(monkeypatch):
    """The process's second training epoch stops as SIGINT stops it; returns the real one."""
    real, calls = pack.train_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt('SIGINT')
        return real(*args, **kwargs)
    monkeypatch.setattr(pack, 'train_epoch', interrupted)
    return real


def test_an_interrupted_imagenet_pack_resumes_with_train_imagenet(tmp_path, monkeypatch,
                                                                  capsys):
    import train_pack
    import training_experiment
    monkeypatch.chdir(tmp_path)
    snaps = tmp_path / 'snaps'
    monkeypatch.setattr(training_experiment, 'SNAPSHOT_DIR', str(snaps))
    real = interrupt_second_epoch(monkeypatch)
    code = train_pack.main(['--script', 'train_imagenet.py', '--member', 'seed=0',
                            '--member', 'seed=1', '--', 'smoke', 'n_epochs=2',
                            'cf_trn.n_workers=0', 'cf_val.n_workers=0'])
    lines = [line for line in capsys.readouterr().err.splitlines() if 'interrupted: ' in line]
    assert code == 130
    folders = sorted((p for p in snaps.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert len(folders) == 2
    for folder in folders:  # each member's own line resumes it with train_imagenet.py
        own = [line for line in lines if f'parent_snapshot={folder}' in line
               and not line.startswith('interrupted: to resume the pack')]
        assert len(own) == 1 and f'python3 train_imagenet.py with {folder}/config.json ' \
            f'parent_snapshot={folder}' in own[0] and 'train_cifar' not in own[0], lines
    command = lines[-1].split('interrupted: to resume the pack: ')[1]
    assert command.startswith('python3 train_pack.py --script train_imagenet.py --member ')
    assert all(f'parent_snapshot={f}' in command for f in folders)

    monkeypatch.setattr(pack, 'train_epoch', real)
    words = shlex.split(command)
    assert words[:2] == ['python3', 'train_pack.py'] and train_pack.main(words[2:]) == 0
    resumed = sorted((p for p in snaps.iterdir() if p.name.isdigit() and p not in folders),
                     key=lambda p: int(p.name))
    assert len(resumed) == 2
    for folder, parent in zip(resumed, folders):
        run = json.loads((folder / 'run.json').read_text())
        assert run['status'] == 'COMPLETED' and run['experiment']['name'] == 'train_imagenet'
        config = json.loads((folder / 'config.json').read_text())
        assert config['parent_snapshot'] == str(parent)
        assert checkpoint.load(folder / 'last.pt')['epoch'] == 2
