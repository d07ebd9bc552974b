"""A run's log of its epochs: the metrics to sacred (``log_scalar``) and one table row per epoch,
under a header every 20 epochs and where a run starts or resumes; then the run's records are
written (``records``), so that they hold the epoch before any checkpoint does."""
import math


class EpochLog:
    """``log``: where lines go; ``log_scalar(name, value, epoch)``: where metrics go (None:
    nowhere); ``first_epoch``: the epoch a resumed run starts at (it gets a header);
    ``records()``: writes what was logged to the run's files now (the script's: sacred's
    observer writes metrics.json, cout.txt and run.json only on its heartbeat, every 10 s);
    None where they need no writing."""

    def __init__(self, log, log_scalar, n_exits, first_epoch=1, records=None):
        self.log, self.log_scalar = log, log_scalar or (lambda *a: None)
        self.n_exits, self.first_epoch = n_exits, first_epoch
        self.records = records or (lambda: None)

    def epoch(self, epoch, lr, loss, trn, val, seconds, T=None, annealed=False):
        """The metrics and row of ``epoch``, written to the run's records; ``T`` the loss's
        temperature (shown), logged as a metric when ``annealed`` (DBT's, which changes)."""
        for name, value in [('train.loss', loss), ('lr', lr)] + (
                [('temperature', T)] if annealed else []):
            self.log_scalar(name, value, epoch)
        for split, metrics in (('train', trn), ('val', val)):
            for name, value in metrics.items():
                self.log_scalar(f'{split}.{name}', value, epoch)
        if epoch == 1 or epoch % 20 == 1 or epoch == self.first_epoch:
            self.log(epoch_header(self.n_exits))
        self.log(epoch_row(epoch, lr, T, loss, trn, val, self.n_exits, seconds))
        self.records()


def epoch_header(n_exits):
    exits = ' '.join(f'{k:>5}' for k in range(n_exits))
    return ('accuracies in %; trn@1, val@1 and val@5: the mean over the exits\n'
            f"{'ep':>4} {'lr':>7} {'T':>6} {'loss':>8} {'trn@1':>6} {'val@1':>6} {'val@5':>6} | "
            f'val top-1 of exit {exits} | {"s":>5}')


def epoch_row(ep, lr, T, loss, trn, val, n_exits, seconds):
    exits = ' '.join(f"{100 * val[f'acc1_clf{k}']:5.1f}" for k in range(n_exits))
    T = f'{T:6.2f}' if T is not None else f"{'-':>6}"
    return (f"{ep:>4} {lr:7.4f} {T} {loss:8.4f} {100 * trn['acc1_avg']:6.2f} "
            f"{100 * val['acc1_avg']:6.2f} {100 * val.get('acc5_avg', math.nan):6.2f} | "
            f"{'':17} {exits} | {seconds:5.1f}")
