"""Evaluation: metrics over a loader, loading a snapshot to evaluate, the per-exit table."""
import torch

from . import checkpoints, models
from .errors import SnapshotError
from .metrics import MultiExitAccuracy


@torch.inference_mode()
def evaluate(model, loader, n_exits, acc_tops=(1, 5), T=None, progress=None):
    """Metrics of ``model`` over ``loader``; ``T`` (a loss temperature) adds adj_maxprob."""
    model.eval()
    metrics = MultiExitAccuracy(n_exits, acc_tops, loader.device)
    batches = progress(loader) if progress else loader
    for x, y in batches:
        metrics.update(model(x), y, T)
    return metrics.compute()  # host sync, once


def load_model(path, device, cf_net_default=None):
    """(model in eval mode, cf_net, checkpoint dict) from a checkpoint file."""
    ckpt = checkpoints.load(path)
    state, cf_net, extra = checkpoints.unpack_model(ckpt, path, cf_net_default)
    model = models.build(cf_net)
    try:
        models.load_original_state_dict(model, state)
    except RuntimeError as e:
        raise SnapshotError(f'{path} does not fit cf_net={dict(cf_net)} (a different '
                            f'architecture?): {str(e).splitlines()[0]}') from None
    return model.to(device).eval(), cf_net, extra


def per_exit_table(metrics, n_exits, acc_tops=(1, 5)):
    """Text table: one row per exit with top-t accuracy and the running-ensemble top-1."""
    head = ['exit'] + [f'top-{t}' for t in acc_tops] + ['ensemble top-1']
    rows = []
    for k in range(n_exits):
        ens = metrics.get(f'acc1_ens{k}', metrics.get('acc1_clf0')) if k else metrics['acc1_clf0']
        rows.append([str(k)] + [f"{100 * metrics[f'acc{t}_clf{k}']:.2f}" for t in acc_tops]
                    + [f'{100 * ens:.2f}'])
    rows.append(['avg'] + [f"{100 * metrics[f'acc{t}_avg']:.2f}" for t in acc_tops] + [''])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: '  '.join(c.rjust(w) for c, w in zip(r, widths))
    return '\n'.join([fmt(head)] + [fmt(r) for r in rows])
