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
