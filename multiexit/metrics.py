"""Multi-exit accuracy metrics with the original's names, accumulated on the device.

Per exit k: ``acc{t}_clf{k}`` (top-t accuracy of exit k) and, for k >= 1, ``acc{t}_ens{k}`` (the
mean of the softmaxes of exits 0..k); ``acc{t}_avg`` is the mean over exits; ``avg_maxprob`` is
the last exit's mean max-probability; ``adj_maxprob`` the same at the loss's temperature.
Examples labelled -100 count only towards the probabilities. Counts are exact sums over all
examples (the original averaged per-batch means, which is the same for equal batches).
"""
import torch
import torch.nn.functional as F

from .accel import distributed
from .errors import ConfigError
from .losses import IGNORE


def metric_names(n_exits, acc_tops=(1, 5), with_temperature=False):
    names = [f'acc{t}_avg' for t in acc_tops]
    for t in acc_tops:
        names += [f'acc{t}_clf{k}' for k in range(n_exits)]
        names += [f'acc{t}_ens{k}' for k in range(1, n_exits)]
    names.append('avg_maxprob')
    if with_temperature:
        names.append('adj_maxprob')
    return names


def default_tops(n_classes):
    """The top-k accuracies reported when ``cf_loss.acc_tops`` is None: top-1 and top-5, or
    top-1 alone below 5 classes."""
    return [k for k in (1, 5) if k <= n_classes]


def check_tops(acc_tops, n_classes, holder):
    """Top-k accuracy needs at least k classes; ``holder`` names what has ``n_classes``."""
    if max(acc_tops) > n_classes:
        fit = [k for k in acc_tops if k <= n_classes] or [1]
        raise ConfigError(f'cf_loss acc_tops={list(acc_tops)}: top-{max(acc_tops)} needs as '
                          f'many classes, {holder} has {n_classes}; set cf_loss.acc_tops={fit} '
                          f'(or None: {default_tops(n_classes)})')


class MultiExitAccuracy:
    """Accumulates hits on the device; ``compute()`` is the only host sync. Those of ``members``
    runs apart (K >= 1: the members of a pack, ``multiexit.models.fused``, or a run alone):
    every exit's logits are (K, B, classes), the labels (K, B), the temperature (K,), or for
    K = 1 also (B, classes), (B,) and a scalar; ``compute()`` returns one dict per member."""

    def __init__(self, n_exits, acc_tops=(1, 5), device='cpu', members=1):
        self.n_exits = n_exits
        self.acc_tops = tuple(acc_tops)
        self.device = torch.device(device)
        self.members = members
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=self.device)
        # [clf | ens, exit, member, top]
        self._hits = zeros(2, self.n_exits, members, len(self.acc_tops))
        self._n_labelled = zeros(members)
        self._n = zeros(members)
        self._maxprob = zeros(members)
        self._adj_maxprob = zeros(members)
        self._with_temperature = False

    def reset(self):
        """Zero the accumulators in place: a captured CUDA graph keeps writing to them."""
        for t in (self._hits, self._n_labelled, self._n, self._maxprob, self._adj_maxprob):
            t.zero_()

    def _topk_hits(self, scores, y, labelled):
        """(exits, members, tops) number of labelled examples whose label is in the top t."""
        pred = scores.topk(max(self.acc_tops), dim=-1).indices  # (E, K, B, kmax)
        hit = (pred == y[None, ..., None]) & labelled[None, ..., None]
        cum = hit.cumsum(dim=-1)
        return torch.stack([cum[..., t - 1].sum(dim=-1) for t in self.acc_tops], dim=-1)

    @torch.no_grad()
    def update(self, logits_list, y, T=None):
        """Add a batch. ``T`` (the loss's temperature) adds ``adj_maxprob``."""
        K = self.members
        logits = torch.stack([z.detach().float().reshape(K, -1, z.shape[-1])
                              for z in logits_list])  # (E, K, B, C)
        y = y.reshape(K, -1)
        labelled = y != IGNORE
        prob = F.softmax(logits, dim=-1)
        ensemble = prob.cumsum(dim=0)  # argmax of the running sum = of the running mean
        self._hits[0] += self._topk_hits(logits, y, labelled)
        self._hits[1] += self._topk_hits(ensemble, y, labelled)
        self._n_labelled += labelled.sum(dim=-1)
        self._n += y.shape[-1]
        self._maxprob += prob[-1].amax(dim=-1).sum(dim=-1)
        if T is not None:
            self._with_temperature = True
            T = T.float().reshape(K, 1, 1)
            self._adj_maxprob += F.softmax(logits[-1] / T, dim=-1).amax(dim=-1).sum(dim=-1)

    def sum_over_ranks(self):
        """Add up the accumulators of every rank (each saw its share of the data): the counts
        stay exact. One collective, not a host sync."""
        parts = [self._hits, self._n_labelled, self._n, self._maxprob, self._adj_maxprob]
        flat = distributed.sum_over_ranks_(torch.cat([p.flatten() for p in parts]))
        for p, total in zip(parts, flat.split([p.numel() for p in parts])):
            p.copy_(total.view_as(p))

    def compute(self):
        """A list of one dict {name: float} per member, in the order of ``metric_names``."""
        parts = [self._hits, self._n_labelled, self._n, self._maxprob, self._adj_maxprob]
        hits, *totals = [t.view_as(p) for t, p in zip(  # host sync
            torch.cat([p.flatten() for p in parts]).cpu().split([p.numel() for p in parts]),
            parts)]
        return [self._named(hits[:, :, k], *(t[k] for t in totals)) for k in range(self.members)]

    def _named(self, hits, n_lab, n, maxprob, adj):
        acc = (hits / max(float(n_lab), 1.0)).tolist()
        out = {}
        for i, t in enumerate(self.acc_tops):
            out[f'acc{t}_avg'] = sum(acc[0][k][i] for k in range(self.n_exits)) / self.n_exits
        for i, t in enumerate(self.acc_tops):
            out.update({f'acc{t}_clf{k}': acc[0][k][i] for k in range(self.n_exits)})
            out.update({f'acc{t}_ens{k}': acc[1][k][i] for k in range(1, self.n_exits)})
        n = max(float(n), 1.0)
        out['avg_maxprob'] = float(maxprob) / n
        if self._with_temperature:
            out['adj_maxprob'] = float(adj) / n
        return out
