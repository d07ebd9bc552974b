"""Resuming a run from a checkpoint with the run's own settings, which may differ from those
the checkpoint was trained with: what changes from the parent's recorded settings is said in
one line, what cannot change is refused with one line that says what to do."""
import torch

from ..config import as_text, changed_settings
from ..errors import ConfigError, Resume, SnapshotError
from ..losses import DistillationBasedLoss
from ..models import load_original_state_dict
from ..runs import find
from . import checkpoint
from .rng import set_rng_state


# What to do when the parent's config.json cannot be read: a resume compares its settings.
UNREADABLE = ('a resume compares the settings it continues with with those: restore the file, '
              'or remove it to resume with the settings given (nothing to compare them with)')


class Parent:
    """The checkpoint a run resumes from: its ``path``, contents ``ckpt``, and ``config``, the
    settings its run recorded (config.json beside it; None where there is none)."""

    def __init__(self, name, snapshot_dir, cf_net):
        path = find.resolve(name, snapshot_dir)
        self.path = path / checkpoint.LAST if path.is_dir() else path
        self.config = find.recorded_config(self.path.parent, UNREADABLE)
        self.ckpt = checkpoint.load(self.path)
        parent_net = self.ckpt.get('cf_net') if isinstance(self.ckpt, dict) else None
        if parent_net is not None and parent_net != cf_net:
            differ = as_text(changed_settings(parent_net, cf_net, union=True))
            raise SnapshotError(f'{self.path} was trained with another cf_net ({differ}); '
                                'resume with its settings: ', Resume(self.path.parent))


def restore(run, parent):
    """Continue ``run`` from ``parent`` with the run's settings: the weights and epoch, and from
    a training state (last.pt) the optimizer's state under the run's cf_opt, DBT's temperature,
    the RNG states and the account of the checkpoints (best snapshot so far). The caller builds
    the scheduler from the run's cf_scheduler at the restored epoch."""
    state, _, extra = checkpoint.unpack_model(parent.ckpt, parent.path, run.cf_net)
    try:
        load_original_state_dict(run.model, state)
    except RuntimeError as e:
        raise SnapshotError(f'{parent.path} does not fit cf_net: '
                            f'{str(e).splitlines()[0]}') from None
    run.epoch = int(extra.get('epoch', 0))
    if run.epoch >= run.n_epochs:
        raise ConfigError(f'{parent.path} has trained {run.epoch} epochs already and '
                          f'n_epochs={run.n_epochs}: there is nothing to train; to train '
                          'longer: ',
                          Resume(parent.path.parent, f'n_epochs=<more than {run.epoch}>'))
    recorded = dict(parent.config or {}, **({'seed': extra['seed']} if 'seed' in extra else {}))
    changes = changed_settings(recorded, run.cfg.run_settings())
    changed = (f'; these settings change from epoch {run.epoch + 1} on: {as_text(changes)}'
               if changes else '')
    if parent.config is None:  # nothing to compare with: say so rather than "exactly"
        changed = ('; no config.json beside it, so the settings it was trained with are '
                   'unknown: it continues with those given')
    if 'optimizer' not in extra:  # a model snapshot: weights only, as the original did
        run.log(f'resuming from the weights of {parent.path} at epoch {run.epoch} '
                f'(optimizer state and temperature start afresh){changed}')
        return
    _restore_optimizer(run, parent, extra['optimizer'], recorded)
    # DBT's temperature is state to continue; a constant T (or none) is a setting
    dbt = DistillationBasedLoss
    if (isinstance(run.loss_fn, dbt) and 'temperature' in extra['loss']
            and recorded.get('cf_loss', {}).get('call', dbt.__name__) == dbt.__name__):
        run.loss_fn.load_state_dict(extra['loss'])
    per_rank = extra.get('rng_ranks')
    if per_rank and len(per_rank) == run.world_size:
        set_rng_state(per_rank[run.rank])
    else:  # another number of processes: rank 0 continues, the others start their own
        set_rng_state(extra['rng'])
        if run.rank:
            torch.manual_seed(run.seed + run.rank)
    run.checkpointer.continue_from(parent.path, run.epoch, extra['best_val'],
                                   extra['best_epoch'])
    run.log(f'resuming {parent.path} at epoch {run.epoch}'
            + (changed or ' exactly, with the settings it was trained with'))


def _restore_optimizer(run, parent, state, recorded):
    """The parent's optimizer state, under the run's cf_opt hyperparameters."""
    optimizer = run.cfg.cf_opt.get('call')
    trained_with = recorded.get('cf_opt', {}).get('call', optimizer)
    if trained_with != optimizer:
        raise ConfigError(f'cf_opt.call={optimizer!r}, but {parent.path} holds the state of '
                          f'{trained_with}, which {optimizer} cannot take over; to start '
                          f'{optimizer} afresh from the weights, resume from a model snapshot '
                          f'(parent_snapshot=<run dir>/ep<N>.pt)')
    hyper = [{k: v for k, v in g.items() if k != 'params'} for g in run.optimizer.param_groups]
    run.optimizer.load_state_dict(state)
    for group, given in zip(run.optimizer.param_groups, hyper):
        group.pop('initial_lr', None)  # the parent's: the scheduler starts from cf_opt.lr
        group.update(given)
