"""DDP on the CPU: 2 gloo processes through torch.multiprocessing (through torchrun:
tests/e2e/test_distributed.py)."""
import datetime

import pytest
import torch
import torch.distributed as dist

from multiexit import losses, models
from multiexit.accel import distributed
from multiexit.data import cifar
from multiexit.errors import ConfigError
from multiexit.evaluate.passes import evaluate
from multiexit.train.step import TrainStep
from multiexit.config import TrainConfig
from multiexit.train.loop import train_epoch
from multiexit.train.run import Run

NET = dict(call='MsdNet', in_shape=32, out_dim=10, n_scales=3, n_exits=3, nlayers_to_exit=2,
           nlayers_between_exits=1, nplanes_mulv=[2, 4, 8], nplanes_addh=1, nplanes_init=1,
           prune='min', plane_reduction=0.5, exit_width=16, btneck_widths=[2, 2, 2])
# maxprob 0: T grows at every step, so the loss depends on it from the second step on
LOSS = dict(call='DistillationBasedLoss', n_exits=3, acc_tops=[1, 5], C=0.5, maxprob=0.0)
# issue 34's methods under DDP: (network, loss) of each, trained as DBT is below
METHODS = {
    'imta': (dict(NET, gradient_equilibrium=True),
             dict(call='IMTADistillation', n_exits=3, gamma=0.5, T=2.0)),
    'boosted': (dict(NET, boost_reweight=0.5), dict(call='ClassificationOnlyLoss', n_exits=3)),
    'distill_later': (NET, dict(call='DistillationFromLaterExits', n_exits=3)),
    'sdn': (NET, dict(call='SdnWeightedLoss', n_exits=3, final_weights=[0.3, 0.6])),
}
GLOBAL_BATCH, N_TRAIN, N_VAL = 16, 72, 37  # 4 steps and 8 examples dropped; an uneven last batch
SPEC = cifar.DATASETS['Cifar10']


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g))


def train_loader(rank=0, world_size=1, batch_size=GLOBAL_BATCH):
    x, y = images(N_TRAIN, 0)
    return cifar.DeviceLoader(x, y, batch_size, SPEC.mean, SPEC.std, 'cpu', augment=True,
                             shuffle=True, drop_last=True, seed=4, rank=rank,
                             world_size=world_size)


def val_loader(rank=0, world_size=1):
    x, y = images(N_VAL, 1)
    return cifar.DeviceLoader(x, y, 10, SPEC.mean, SPEC.std, 'cpu', rank=rank,
                             world_size=world_size)


class Recorded(torch.nn.Module):
    """The loss, remembering its value at every step."""

    def __init__(self, loss):
        super().__init__()
        self.loss, self.values = loss, []

    def forward(self, logits, y):
        out = self.loss(logits, y)
        self.values.append(out.item())
        return out


def train_steps(rank, world_size, net=NET, cf_loss=LOSS):
    """One epoch of the tiny MsdNet with DBT (or ``net`` and ``cf_loss``); with a group, DDP
    and sync_bn."""
    torch.manual_seed(0)
    model = models.build(net)
    loss = Recorded(losses.build(cf_loss))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step_model = model
    if world_size > 1:
        model, step_model = distributed.wrap(model, torch.device('cpu'), sync_bn=True)
    T = getattr(loss.loss, 'temperature', None)
    step = TrainStep(step_model, loss, opt, 3, (1, 5), 'cpu', T=T)
    [mean_loss], [metrics], [bad] = train_epoch(step, train_loader(rank, world_size))
    return dict(losses=loss.values, mean_loss=mean_loss, metrics=metrics, bad=bad,
                T=None if T is None else loss.loss.T, state=model.state_dict(), model=model)


def temperatures(rank):
    """T after two training calls whose teacher's max-probability differs between the ranks:
    0.8 and 0.15 (mean 0.475 < maxprob), then 0.8 and 0.3 (mean 0.55 > maxprob)."""
    loss = losses.build(dict(LOSS, maxprob=0.5))
    out = []
    for p in ((0.8, 0.15), (0.8, 0.3)):
        prob = torch.full((4, 10), (1 - p[rank]) / 9)
        prob[:, 0] = p[rank]
        logits = [prob.log()] * 3
        loss(logits, torch.zeros(4, dtype=torch.long))
        out.append(loss.T)
    return out


def worker(rank, world_size, tmp):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{tmp}/rendezvous', rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        out = train_steps(rank, world_size)
        model = out.pop('model')
        [out['val_sharded']] = evaluate(model, val_loader(rank, world_size), 3)
        [out['val_whole']] = evaluate(model, val_loader(), 3)
        out['T_disagreeing'] = temperatures(rank)
        out['methods'] = {name: train_steps(rank, world_size, *method)
                          for name, method in METHODS.items()}
        for trained in out['methods'].values():
            trained.pop('model')
        try:
            smoke = dict(call='Cifar100', n_per_class=20, nval_per_class=5)
            Run(TrainConfig(cf_net=NET, cf_loss=LOSS, cf_trn=smoke, cf_val=smoke,
                            cf_opt=dict(call='SGD', lr=0.1),
                            cf_scheduler=dict(call='StepLR', step_size=1), batch_size=15,
                            val_batch_size=10, n_epochs=1, data_dir=tmp / 'no_data', gpu=-1,
                            seed=0), None if rank else tmp)
        except ConfigError as e:
            out['odd_batch_error'] = str(e)
        torch.save(out, tmp / f'rank{rank}.pt')
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    torch.multiprocessing.spawn(worker, args=(2, tmp), nprocs=2, join=True)
    return [torch.load(tmp / f'rank{r}.pt', weights_only=False) for r in range(2)]


@pytest.fixture(scope='module')
def one_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: on 2 busy cores, 2 threads can be 100x slower
    try:
        return dict(train_steps(0, 1), methods={name: train_steps(0, 1, *method)
                                                for name, method in METHODS.items()})
    finally:
        torch.set_num_threads(threads)


def test_parameters_and_temperature_are_identical_on_every_rank(two_ranks):
    a, b = two_ranks
    assert a['state'].keys() == b['state'].keys()
    for k, v in a['state'].items():
        assert torch.equal(v, b['state'][k]), k
    assert a['T'] == b['T'] == pytest.approx(1.05 ** 4, rel=1e-12)
    assert a['mean_loss'] == b['mean_loss'] and a['metrics'] == b['metrics']


def test_two_ranks_with_sync_bn_equal_one_process_with_the_global_batch(two_ranks, one_process):
    a, b = two_ranks
    global_losses = [(x + y) / 2 for x, y in zip(a['losses'], b['losses'])]
    assert len(global_losses) == len(one_process['losses']) == N_TRAIN // GLOBAL_BATCH
    assert global_losses == pytest.approx(one_process['losses'], rel=1e-4)
    assert a['mean_loss'] == pytest.approx(one_process['mean_loss'], rel=1e-4)
    assert a['T'] == one_process['T']
    for k, v in one_process['state'].items():
        torch.testing.assert_close(a['state'][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # whole-batch metrics: exact sums over both ranks' parts
    assert a['metrics']['acc1_avg'] == one_process['metrics']['acc1_avg']
    assert a['metrics']['avg_maxprob'] == pytest.approx(one_process['metrics']['avg_maxprob'],
                                                         rel=1e-4)


@pytest.mark.parametrize('method', list(METHODS))
def test_each_method_on_two_ranks_equals_one_process_with_the_global_batch(two_ranks,
                                                                          one_process, method):
    a, b = (ranks['methods'][method] for ranks in two_ranks)
    alone = one_process['methods'][method]
    global_losses = [(x + y) / 2 for x, y in zip(a['losses'], b['losses'])]
    assert global_losses == pytest.approx(alone['losses'], rel=1e-4)
    for k, v in alone['state'].items():
        assert torch.equal(a['state'][k], b['state'][k]), k
    # float sums in another order, grown by 4 steps of momentum SGD, compared over the whole
    # network (boosted: 2e-5; a rank without the other's gradients is off in its loss already)
    flat = lambda state: torch.cat([v.flatten().double() for v in state.values()
                                    if v.is_floating_point()])
    ranks, one = flat(a['state']), flat(alone['state'])
    assert (ranks - one).norm() / one.norm() < 1e-4
    assert a['metrics']['acc1_avg'] == alone['metrics']['acc1_avg']


def test_temperature_follows_the_mean_confidence_of_the_ranks(two_ranks):
    # alone, rank 0 (0.8 > 0.5) would have raised T at once and rank 1 (0.3) not the second time
    assert two_ranks[0]['T_disagreeing'] == two_ranks[1]['T_disagreeing'] == [1.0, 1.05]


def test_sharded_validation_counts_every_example_once(two_ranks):
    for out in two_ranks:
        whole, sharded = out['val_whole'], out['val_sharded']
        assert sharded.keys() == whole.keys()
        for k in whole:
            assert sharded[k] == pytest.approx(whole[k], rel=1e-6), k
    assert two_ranks[0]['val_sharded'] == two_ranks[1]['val_sharded']


def test_batch_size_must_split_evenly_over_the_ranks(two_ranks):
    for out in two_ranks:
        assert 'batch_size=15 is not divisible by the 2 processes' in out['odd_batch_error']


def test_rank_parts_make_up_the_single_process_batches():
    whole = list(train_loader())
    parts = [list(train_loader(r, 4)) for r in range(4)]
    assert all(len(p) == len(whole) for p in parts)  # the same number of steps on every rank
    for step, (x, y) in enumerate(whole):
        assert all(len(p[step][1]) == GLOBAL_BATCH // 4 for p in parts)
        assert torch.equal(torch.cat([p[step][0] for p in parts]), x)  # augmentation included
        assert torch.equal(torch.cat([p[step][1] for p in parts]), y)
    with pytest.raises(ConfigError, match='batch_size=16 is not divisible by the 3 processes'):
        train_loader(0, 3)
    labels = torch.cat([y for r in range(3) for _, y in val_loader(r, 3)])
    assert sorted(labels.tolist()) == sorted(val_loader().labels.tolist())


def test_gpu_list_names_the_torchrun_command():
    assert (distributed.torchrun_command([0, 1], ['train_cifar.py', 'with', 'smoke', 'gpu=[0,1]'])
            == 'torchrun --nproc_per_node=2 train_cifar.py with smoke')
    assert (distributed.torchrun_command([2, 3], ['train_cifar.py'])
            == 'CUDA_VISIBLE_DEVICES=2,3 torchrun --nproc_per_node=2 train_cifar.py with')


def test_a_single_process_is_started_again_with_python3_as_the_readme_does():
    assert distributed.launch_command('train_cifar.py') == 'python3 train_cifar.py'
