"""Accuracy-versus-compute figures, one colour per snapshot, drawn on matplotlib's Agg canvas
(no display, no pyplot state shared with the caller).

The x axis is ``macs_all_heads``: what a prediction at exit k costs when exits 0..k have been
evaluated on the way, as in anytime and budgeted early exit; so the anytime points and the
budgeted curves of one snapshot meet at the exits. The budgeted figure can also have panels in
measured milliseconds per image of an early-exit mode (``early_exit.timing``), measured once per
architecture: snapshots of one network share one measurement.
"""
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# x axes: anytime.csv column, budgeted.csv column, unit, label
COSTS = {
    'macs': ('macs_all_heads', 'avg_macs', 1e6, 'multiply-accumulates per image (millions)'),
    'ms_streaming': ('ms_streaming', 'avg_ms_streaming', 1,
                     'measured ms per image, streaming (full batches; once per architecture)'),
    'ms_latency': ('ms_latency', 'avg_ms_latency', 1,
                   'measured ms per image, latency (one image at a time; once per architecture)'),
}


def _figure(title, costs=('macs',)):
    fig = Figure(figsize=(7 * len(costs), 5), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(costs), squeeze=False)[0]
    for ax, cost in zip(axes, costs):
        ax.set(title=title, xlabel=COSTS[cost][3], ylabel='top-1 accuracy (%)')
        ax.grid(alpha=0.3)
    return fig, axes


def _save(fig, axes, path):
    for ax in axes:
        ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path)


def _anytime(ax, anytime, snapshot, color, cost='macs', accuracy='acc1', **style):
    rows = anytime[anytime['snapshot'] == snapshot]
    column, _, unit, _ = COSTS[cost]
    ax.plot(rows[column] / unit, 100 * rows[accuracy], color=color, **style)


def anytime_figure(anytime, path, labels=None):
    """Top-1 accuracy of every exit against its cost, one curve per snapshot (``anytime.csv``),
    and, where the frame has ``acc1_poe``, Product Anytime's (``anytime_poe``) dashed in the same
    colour. ``labels``: {snapshot: its name in the legend} (default: the snapshot column)."""
    labels = labels or {}
    fig, (ax,) = _figure('Anytime prediction: accuracy of each exit')
    for i, snapshot in enumerate(anytime['snapshot'].unique()):
        label = labels.get(snapshot, str(snapshot))
        _anytime(ax, anytime, snapshot, f'C{i}', marker='o', label=label)
        if 'acc1_poe' in anytime:
            _anytime(ax, anytime, snapshot, f'C{i}', accuracy='acc1_poe', marker='s',
                     linestyle='--', label=f'{label}: product anytime')
    _save(fig, [ax], path)


def budgeted_figure(budgeted, anytime, path, labels=None, costs=('macs',)):
    """Test accuracy against mean cost per image of budgeted early exit (``budgeted.csv``), one
    panel per cost of ``COSTS``: per snapshot, per-exit thresholds for geometric exit shares
    (solid), one global threshold (dashed) and the single exits (dots). ``labels``: as for
    ``anytime_figure``."""
    labels = labels or {}
    fig, axes = _figure('Budgeted batch classification', costs)
    for ax, cost in zip(axes, costs):
        _, column, unit, _ = COSTS[cost]
        for i, snapshot in enumerate(budgeted['snapshot'].unique()):
            rows = budgeted[budgeted['snapshot'] == snapshot]
            label = labels.get(snapshot, str(snapshot))
            for method, style, what in (('geometric', '-', r'exit shares $\propto q^k$'),
                                        ('global', '--', 'one threshold')):
                curve = rows[rows['method'] == method].sort_values(column)
                ax.plot(curve[column] / unit, 100 * curve['acc1'], style, color=f'C{i}',
                        label=f'{label}: {what}')
            _anytime(ax, anytime, snapshot, f'C{i}', cost, marker='o', linestyle='none',
                     label=f'{label}: single exits')
    _save(fig, axes, path)
