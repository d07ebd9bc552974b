"""The grid's results: test top-1 per exit as a table (mean ± std over seeds, and the paired
difference of every method to standard training), a CSV with one row per run and exit, and a
figure, each saying what it covers (data set, network, epochs, seeds). ``labels``: each
method's name in them. A size is a number of training images per class or ``ALL``.

Accuracies are fractions in the CSV, as in every file the runs write, and percent in the table
and the figure, which say so."""
import textwrap

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

ALL = 'all'  # the size of every training image but the validation ones


def size_key(size):
    """Sizes in order: the numbers, then ALL."""
    return size == ALL, 0 if size == ALL else size


def cell_rows(cell, train, test):
    """One row per exit: the cell's test top-1 (a fraction) from the evaluation's sacred
    result, and what the training run covers (data set, network, epochs)."""
    exits = sorted(int(k.rsplit('clf', 1)[1]) for k in test.index
                   if k.startswith('result.acc1_clf') and pd.notna(test[k]))
    epochs = train.get('n_epochs')  # a float where the table has runs without it
    covers = dict(data=f'{train.get("cf_trn.call")} in {train.get("data_dir")}',
                  network=train.get('network'), epochs=int(epochs) if pd.notna(epochs) else None)
    return [dict(method=cell.method, size=cell.size, seed=cell.seed, exit=k,
                 acc1=test[f'result.acc1_clf{k}'],
                 macs=test.get(f'result.macs_all_heads_clf{k}'), **covers,
                 train_run=train['run'], eval_run=test['run']) for k in exits]


def covered(results):
    """What the rows cover, e.g. 'Cifar100 in data/smoke; network MsdNet; 1 epoch; seeds 0 1'."""
    def values(column):
        return ', '.join(str(v) for v in dict.fromkeys(results[column].dropna()))
    epochs = values('epochs')
    seeds = sorted(results['seed'].unique())
    return (f'{values("data")}; network {values("network")}; {epochs} epoch'
            f'{"s" * (epochs != "1")}; seed{"s" * (len(seeds) > 1)} {" ".join(map(str, seeds))}')


def _mean_std(stats, signed=False):
    mean = stats['mean'].map('{:+.1f}'.format if signed else '{:.1f}'.format)
    std = stats['std'].map(' ± {:.1f}'.format).where(stats['count'] > 1, '')
    return mean + std


def _wide(stats, label, signed=False):
    """(size, method, exit) stats -> one row per size and method, one column per exit."""
    cells = _mean_std(stats, signed).unstack('exit').fillna('-')
    cells.columns = [f'exit {k}' for k in cells.columns]
    seeds = stats['count'].groupby(['size', 'method'], observed=True).max().rename('seeds')
    frame = pd.concat([seeds, cells], axis=1).reset_index()
    return frame.assign(method=frame['method'].map(label))


def _markdown(frame):
    lines = ['| ' + ' | '.join(map(str, frame.columns)) + ' |', '|' + '---|' * frame.shape[1]]
    lines += ['| ' + ' | '.join(map(str, row)) + ' |' for row in frame.itertuples(index=False)]
    return '\n'.join(lines)


def tables(results, methods, labels):
    """(mean ± std test top-1 per method, paired difference of every method to standard)."""
    results = results.assign(method=pd.Categorical(results['method'], methods))
    stats = results.groupby(['size', 'method', 'exit'], observed=True)['acc1'].agg(
        ['mean', 'std', 'count'])
    accuracy = _wide(stats, labels)
    if 'standard' not in set(results['method']):
        return accuracy, None
    paired = results.pivot_table(index=['size', 'seed', 'exit'], columns='method', values='acc1',
                                 observed=True)
    diff = paired.sub(paired['standard'], axis=0).drop(columns='standard')
    diff = diff.stack().rename('diff').reset_index()  # NaN (a method missing a seed) dropped
    if diff.empty:
        return accuracy, None
    diff['method'] = pd.Categorical(diff['method'], methods)
    stats = diff.groupby(['size', 'method', 'exit'], observed=True)['diff'].agg(
        ['mean', 'std', 'count'])
    return accuracy, _wide(stats, lambda m: f'{labels[m]} − standard', signed=True)


def write_markdown(results, methods, labels, path, description):
    accuracy, difference = tables(results, methods, labels)
    text = ['# Test top-1 accuracy per exit (%)', '', f'{covered(results)}; {description}', '',
            'Mean ± standard deviation over seeds of each run\'s best-validation snapshot on the '
            'test split; `size`: training images per class.', '', _markdown(accuracy), '']
    if has_costs(results):
        cost = results.assign(method=pd.Categorical(results['method'], methods))
        cost = cost.groupby(['method', 'exit'], observed=True)['macs'].mean() / 1e6
        cost = cost.map('{:.2f}'.format).unstack('exit')
        cost.columns = [f'exit {k}' for k in cost.columns]
        cost = cost.reset_index().assign(method=lambda f: f['method'].map(labels))
        text += ['## Cost per exit (millions of MACs)', '',
                 'What an image that reaches the exit costs, every earlier head included.', '',
                 _markdown(cost), '']
    if difference is not None:
        text += ['## Difference to standard training (percentage points)', '',
                 'Per seed (same data subset and initialisation), method minus standard; mean ± '
                 'standard deviation over seeds.', '', _markdown(difference), '']
    path.write_text('\n'.join(text))


def has_costs(results):
    """Whether every row has its exit's MACs (runs evaluated before eval.py wrote them do not)."""
    return 'macs' in results and results['macs'].notna().all()


def write_figure(results, methods, labels, path, description):
    """Accuracy per exit against its cost: the MACs of an image that reaches the exit (every
    earlier head included, as in an early-exit cascade); against the exit's index for results
    without costs."""
    sizes = list(results['size'].cat.categories)
    by_cost = has_costs(results)
    x = 'macs' if by_cost else 'exit'
    results = results.assign(macs=results['macs'] / 1e6) if by_cost else results
    stats = results.groupby(['size', 'method', 'exit'], observed=True).agg(
        mean=('acc1', 'mean'), std=('acc1', 'std'), **{x: (x, 'mean')} if by_cost else {})
    stats = stats.reset_index()
    fig = Figure(figsize=(1 + 3.6 * len(sizes), 4.4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    for ax, size in zip(axes, sizes):
        for i, method in enumerate(methods):
            line = stats[(stats['size'] == size) & (stats['method'] == method)]
            if len(line):
                ax.errorbar(line[x], line['mean'], yerr=line['std'].fillna(0), marker='o',
                            capsize=3, color=f'C{i}', label=labels[method])
        ax.set(title=f'{size} training images per class' if size != ALL else
               'all training images',
               xlabel='MACs to the exit, earlier heads included (millions)' if by_cost else 'exit')
        if not by_cost:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('test top-1 accuracy (%)')
    axes[0].legend(fontsize='small')
    fit_title(fig, f'{covered(results)}; {description}')
    fig.tight_layout()
    fig.savefig(path)


def fit_title(fig, text, share=0.96):
    """``text`` as the figure's title, wrapped at the longest lines that fit ``share`` of its
    width, as drawn: a figure of one size (the ImageNet grid's) is narrow."""
    renderer = fig.canvas.get_renderer()
    for width in range(len(text), 0, -2):
        title = fig.suptitle(textwrap.fill(text, width), fontsize='medium')
        if title.get_window_extent(renderer).width <= share * fig.bbox.width:
            break
    return title


def write_results(results, methods, labels, out, name, description):
    """<out>/<name>.csv (fractions), .md and .png (percent)."""
    sizes = sorted(results['size'].unique(), key=size_key)
    results = results.assign(size=pd.Categorical(results['size'], sizes, ordered=True))
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / f'{name}.csv', index=False)
    shown = results.assign(acc1=100 * results['acc1'])
    write_markdown(shown, methods, labels, out / f'{name}.md', description)
    write_figure(shown, methods, labels, out / f'{name}.png', description)
