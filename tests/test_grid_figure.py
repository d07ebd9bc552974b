"""The grid's figure keeps its title inside the image, however narrow the figure: the ImageNet
grid has one size, so one panel, under a title as long as a CIFAR grid's."""
import pandas as pd
import pytest

from experiments import tables

LABELS = {'standard': 'standard', 'dbt': 'DBT'}


@pytest.mark.parametrize('sizes', [[tables.ALL], [25, 50, 100, 250, 450]])
def test_the_title_fits_inside_the_figure_above_the_panels(tmp_path, monkeypatch, sizes):
    figures, savefig = [], tables.Figure.savefig
    monkeypatch.setattr(tables.Figure, 'savefig',
                        lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    rows = [dict(method=m, size=size, seed=0, exit=k, acc1=0.5 + k / 20,
                 data='ImageNet in /datasets/imagenet/ILSVRC2012', network='MsdNet',
                 epochs=90, train_run='1', eval_run='2')
            for m in LABELS for size in sizes for k in range(5)]
    description = 'methods standard dbt; sizes ' + ' '.join(map(str, sizes))
    tables.write_results(pd.DataFrame(rows), list(LABELS), LABELS, tmp_path, 'grid',
                         description)
    [fig] = figures
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle
    box, page = title.get_window_extent(renderer), fig.bbox
    assert 0 <= box.x0 and box.x1 <= page.x1 and 0 <= box.y0 and box.y1 <= page.y1
    for ax in fig.axes:  # above every panel and its title
        assert box.y0 >= ax.title.get_window_extent(renderer).y1 - 1
    assert ' '.join(title.get_text().split()) == (
        'ImageNet in /datasets/imagenet/ILSVRC2012; network MsdNet; 90 epochs; seed 0; '
        + description)


def test_accuracy_is_drawn_against_the_cost_of_each_exit_and_the_costs_are_tabled(tmp_path,
                                                                                  monkeypatch):
    figures, savefig = [], tables.Figure.savefig
    monkeypatch.setattr(tables.Figure, 'savefig',
                        lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    macs = [1.5e6, 4e6, 9e6]
    rows = [dict(method=m, size=25, seed=seed, exit=k, acc1=0.4 + k / 10 + seed / 100,
                 macs=macs[k], data='Cifar100 in data', network='MsdNet', epochs=1,
                 train_run='1', eval_run='2')
            for m in LABELS for seed in (0, 1) for k in range(3)]
    tables.write_results(pd.DataFrame(rows), list(LABELS), LABELS, tmp_path, 'grid', 'quick')
    [fig] = figures
    [ax] = fig.axes
    assert 'MACs' in ax.get_xlabel()
    drawn = {bars.get_label(): list(bars.lines[0].get_xdata()) for bars in ax.containers}
    assert drawn == {'standard': [1.5, 4.0, 9.0], 'DBT': [1.5, 4.0, 9.0]}
    text = (tmp_path / 'grid.md').read_text()
    assert '| DBT | 1.50 | 4.00 | 9.00 |' in text
    assert '## Difference to standard training' in text
