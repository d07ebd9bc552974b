"""Accuracy-versus-compute figures, one colour per snapshot, drawn on matplotlib's Agg canvas
(no display, no pyplot state shared with the caller).

The x axis is ``macs_all_heads``: what a prediction at exit k costs when exits 0..k have been
evaluated on the way, as in anytime and budgeted early exit; so the anytime points and the
budgeted curves of one snapshot meet at the exits.
"""
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(title):
    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel='multiply-accumulates per image (millions)',
           ylabel='top-1 accuracy (%)')
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, ax, path):
    ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path)


def _anytime(ax, anytime, snapshot, color, **style):
    rows = anytime[anytime['snapshot'] == snapshot]
    ax.plot(rows['macs_all_heads'] / 1e6, 100 * rows['acc1'], color=color, **style)


def anytime_figure(anytime, path, labels=None):
    """Top-1 accuracy of every exit against its cost, one curve per snapshot (``anytime.csv``).
    ``labels``: {snapshot: its name in the legend} (default: the snapshot column)."""
    labels = labels or {}
    fig, ax = _figure('Anytime prediction: accuracy of each exit')
    for i, snapshot in enumerate(anytime['snapshot'].unique()):
        _anytime(ax, anytime, snapshot, f'C{i}', marker='o',
                 label=labels.get(snapshot, str(snapshot)))
    _save(fig, ax, path)


def budgeted_figure(budgeted, anytime, path, labels=None):
    """Test accuracy against mean cost per image of budgeted early exit (``budgeted.csv``):
    per snapshot, per-exit thresholds for geometric exit shares (solid), one global threshold
    (dashed) and the single exits (dots). ``labels``: as for ``anytime_figure``."""
    labels = labels or {}
    fig, ax = _figure('Budgeted batch classification')
    for i, snapshot in enumerate(budgeted['snapshot'].unique()):
        rows = budgeted[budgeted['snapshot'] == snapshot]
        label = labels.get(snapshot, str(snapshot))
        for method, style, what in (('geometric', '-', r'exit shares $\propto q^k$'),
                                    ('global', '--', 'one threshold')):
            curve = rows[rows['method'] == method].sort_values('avg_macs')
            ax.plot(curve['avg_macs'] / 1e6, 100 * curve['acc1'], style, color=f'C{i}',
                    label=f'{label}: {what}')
        _anytime(ax, anytime, snapshot, f'C{i}', marker='o', linestyle='none',
                 label=f'{label}: single exits')
    _save(fig, ax, path)
