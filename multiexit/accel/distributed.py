"""Training on several processes (one per GPU, or gloo processes on the CPU) launched by torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for every process it starts; ``process_group``
joins them. The library follows the default group: with no group (or one process) every
function here is the single-process identity, so the same code runs under both.
"""
import contextlib
import datetime
import os
import re
import shlex

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError, PeerLostError
from . import sync_batchnorm


def env_rank():
    """This process's rank as torchrun announced it (0 without torchrun), before any group."""
    return int(os.environ.get('RANK', 0))


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def torchrun_command(gpus, argv):
    """The command line that runs ``argv`` (a script and its sacred arguments) on ``gpus``,
    one process per GPU: the ``gpu=`` arguments are dropped, since each process takes the GPU
    of its LOCAL_RANK among CUDA_VISIBLE_DEVICES."""
    gpus = [int(g) for g in gpus]
    args = [a for a in argv[1:] if not a.startswith('gpu=')]
    visible = ','.join(map(str, gpus))
    prefix = '' if gpus == list(range(len(gpus))) else f'CUDA_VISIBLE_DEVICES={visible} '
    return (f'{prefix}torchrun --nproc_per_node={len(gpus)} '
            + shlex.join([argv[0]] + (args if args else ['with'])))


def rank_device(gpu):
    """This process's device under torchrun: cuda:LOCAL_RANK, or the CPU for ``gpu=-1``."""
    if gpu not in (0, -1) or isinstance(gpu, bool):
        raise ConfigError(
            f'gpu={gpu!r} under torchrun: each process uses the GPU of its LOCAL_RANK, so leave '
            'gpu at 0 (or -1 for CPU processes) and choose the GPUs with CUDA_VISIBLE_DEVICES')
    if gpu < 0:
        return torch.device('cpu')
    local = int(os.environ.get('LOCAL_RANK', 0))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local >= n:
        raise ConfigError(f'LOCAL_RANK={local} but this machine has {n} CUDA device(s): '
                          f'--nproc_per_node must be at most {n}, or gpu=-1 for CPU processes')
    return torch.device('cuda', local)


@contextlib.contextmanager
def process_group(gpu, timeout_s):
    """Under torchrun (WORLD_SIZE set, one process too): join the default group (NCCL on CUDA,
    gloo on the CPU) for the duration; otherwise nothing. A collective that waits longer than
    ``timeout_s`` for another process fails instead of hanging. A group of one process is
    joined but not used: training and checkpoints are those of a plain single-process run."""
    if 'WORLD_SIZE' not in os.environ:
        yield
        return
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise ConfigError(f'ddp_timeout_s must be a number of seconds > 0, got {timeout_s!r}')
    device = rank_device(gpu)
    kwargs = {}
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        kwargs['device_id'] = device
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    try:
        yield
    except RuntimeError as e:
        if is_peer_failure(e):
            raise PeerLostError(peer_failure(e)) from None
        raise
    finally:
        dist.destroy_process_group()


def is_peer_failure(e):
    """Whether ``e`` is a collective that failed because another process did."""
    return active() and (isinstance(e, dist.DistError) or 'gloo' in str(e))  # gloo: RuntimeError


def peer_failure(e, when=''):
    """What a failed collective means, with the first sentence of its error."""
    text = re.sub(r'^\[[^\]]*\]\s*', '', str(e).strip())  # gloo's [source file:line]
    first = re.split(r'\.\s|\n', text)[0][:300] or type(e).__name__
    return (f'lost the other processes{when} ({first}): one of them failed (torchrun names it) '
            f'or stopped answering for longer than ddp_timeout_s')


def launch_command(script):
    """How to start ``script`` again the way this job was started."""
    if not active():
        return f'python3 {script}'
    world = dist.get_world_size()
    local = int(os.environ.get('LOCAL_WORLD_SIZE', world))
    if local == world:
        return f'torchrun --nproc_per_node={world} {script}'
    return (f'torchrun --nnodes={world // local} --nproc_per_node={local} '
            f'--rdzv-endpoint=<host:port> {script}')


@contextlib.contextmanager
def local_main_first():
    """Context in which the first process of each machine runs before the others (to download
    or generate shared files once). Every process passes one barrier: before, or after."""
    leader = int(os.environ.get('LOCAL_RANK', 0)) == 0
    if active() and not leader:
        dist.barrier()
    yield
    if active() and leader:
        dist.barrier()


def wrap(model, device, sync_bn):
    """(module, DDP wrapper) of ``model`` on ``device`` (``convert_batchnorm``, ``ddp``)."""
    model = convert_batchnorm(model, sync_bn)
    return model, ddp(model, device)


def convert_batchnorm(model, sync_bn):
    """``model``, whose BatchNorm normalises with the statistics of the global batch with
    ``sync_bn``."""
    return sync_batchnorm.convert(model) if sync_bn else model


def ddp(model, device):
    """``model`` in DDP on ``device``: the gradients of the parameters that train now (those
    with ``requires_grad``) are averaged over the ranks, and rank 0's parameters and buffers
    are copied to the others here."""
    return DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)


def mean_over_ranks(x):
    """Mean of a tensor over the ranks (equal weights), the same on every rank; ``x`` itself
    without a group. A collective, not a host sync."""
    if not active():
        return x
    x = x.clone()
    dist.all_reduce(x)  # SUM: gloo has no AVG
    return x / dist.get_world_size()


def sum_over_ranks_(x):
    """In place: the sum over the ranks."""
    if active():
        dist.all_reduce(x)
    return x


def min_over_ranks_(x):
    """In place: the minimum over the ranks."""
    if active():
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


def broadcast_buffers(module):
    """Copy rank 0's buffers (BatchNorm statistics) to every rank: each rank's last training
    step updated its own."""
    if active():
        for b in module.buffers():
            dist.broadcast(b, 0)


def from_main(obj):
    """Rank 0's value of a picklable ``obj`` on every rank (host sync: for set-up only)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def gathered(obj):
    """[every rank's ``obj``] in rank order (host sync)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
