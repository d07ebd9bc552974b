"""The training curves' figure (python3 -m multiexit.runs --plot): a constant temperature is
shown as the constant it is, epochs are whole numbers, every panel's y axis says what it shows,
and the resume markers are in the legends."""
import json

import pytest

from multiexit.runs import curves


def write_run(folder, config, columns, epochs):
    """A training run folder as sacred writes it: config.json, run.json, metrics.json."""
    folder.mkdir(parents=True)
    metrics = {name: {'steps': list(epochs), 'timestamps': ['2026-01-01T00:00:00'] * len(epochs),
                      'values': values} for name, values in columns.items()}
    run = {'experiment': {'name': 'train_cifar'}, 'status': 'COMPLETED', 'meta': {},
           'start_time': '2026-01-01T10:00:00.000000', 'stop_time': '2026-01-01T10:01:00.000000',
           'result': None}
    for name, content in (('config.json', config), ('run.json', run), ('metrics.json', metrics)):
        (folder / name).write_text(json.dumps(content))


def metrics(n, **more):
    return {'val.acc1_clf0': [0.1] * n, 'val.acc1_clf1': [0.2] * n, 'val.acc1_avg': [0.15] * n,
            'train.acc1_clf0': [0.1] * n, 'train.acc1_clf1': [0.2] * n, 'lr': [0.1] * n, **more}


@pytest.fixture
def drawn(monkeypatch):
    figures = []
    monkeypatch.setattr(curves.Figure, 'savefig', lambda fig, path: figures.append(fig))
    return figures


def visible_ticks(ax):
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def test_a_constant_temperature_is_drawn_from_the_config_on_whole_epochs(tmp_path, drawn):
    config = {'snapshot_name': 'const', 'parent_snapshot': None,
              'cf_loss': {'call': 'DistillationLossConstTemp', 'T': 4.0, 'C': 0.5}}
    write_run(tmp_path / '1', config, metrics(1), [1])  # one epoch: no temperature logged
    curves.plot_curves(tmp_path / '1', tmp_path / '1' / 'curves.png')
    [fig] = drawn
    train, val, temperature, lr = fig.axes
    assert temperature.get_title() == 'constant temperature T (DistillationLossConstTemp)'
    assert not temperature.texts  # no 'no temperature logged'
    [line] = temperature.lines
    assert list(line.get_ydata()) == [4.0] and list(line.get_xdata()) == [1]
    assert [t.get_text() for t in temperature.get_legend().get_texts()] == ['T = 4 (cf_loss.T)']
    assert (temperature.get_ylabel(), lr.get_ylabel()) == ('T', 'learning rate')
    for ax in fig.axes:
        assert visible_ticks(ax) == [1.0], ax.get_title()


def test_a_loss_without_temperature_says_so(tmp_path, drawn):
    config = {'snapshot_name': 'std', 'cf_loss': {'call': 'ClassificationOnlyLoss'}}
    write_run(tmp_path / '1', config, metrics(3), [1, 2, 3])
    curves.plot_curves(tmp_path / '1', tmp_path / '1' / 'curves.png')
    temperature = drawn[0].axes[2]
    assert [t.get_text() for t in temperature.texts] == ['ClassificationOnlyLoss: no temperature']
    assert not temperature.lines


def test_dbt_resumed_chain_marks_where_the_resumed_run_took_over_in_every_legend(tmp_path,
                                                                                   drawn):
    config = {'snapshot_name': 'dbt', 'parent_snapshot': None,
              'cf_loss': {'call': 'DistillationBasedLoss', 'C': 0.5, 'maxprob': 0.5}}
    write_run(tmp_path / '1', config, metrics(2, temperature=[1.0, 1.05]), [1, 2])
    write_run(tmp_path / '2', dict(config, parent_snapshot='1'),
              metrics(3, temperature=[1.1, 1.2, 1.3]), [3, 4, 5])
    curves.plot_curves(tmp_path / '2', tmp_path / '2' / 'curves.png')
    [fig] = drawn
    assert fig._suptitle.get_text() == 'run 2 <- 1 dbt'
    temperature = fig.axes[2]
    assert temperature.get_title() == 'DBT temperature T'
    assert list(temperature.lines[0].get_ydata()) == [1.0, 1.05, 1.1, 1.2, 1.3]
    for ax in fig.axes:
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert texts.count('a resumed run takes over') == 1, ax.get_title()
        [marker] = [line for line in ax.lines if line.get_label() == 'a resumed run takes over']
        assert list(marker.get_xdata()) == [2.5, 2.5]
        assert visible_ticks(ax) == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert ax.get_ylabel()
