"""train_imagenet.py through its command line, in this process, on generated JPEG folders, on
the CPU: bad input, and the top-k that fits the classes (training, resuming and evaluating as a
user types them: tests/e2e/test_train_imagenet.py)."""
import pytest

from helpers import run_in_process


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp('imagenet_work')


@pytest.mark.parametrize('args, message', [
    (['data_dir=nowhere'], 'no nowhere/train/'),
    (['smoke', 'cf_trn.image_size=160'], 'cf_net in_shape=224 but cf_trn gives images of 160x160'),
    (['smoke', 'cf_trn.n_workers=-1'], 'cf_trn.n_workers=-1: expected an integer >= 0 or None'),
    (['smoke', 'cf_net.out_dim=1000'], 'cf_net out_dim=1000 but ImageFolder has 5 classes'),
    (['smoke', 'cf_loss.acc_tops=[1,10]'],
     'cf_loss acc_tops=[1, 10]: top-10 needs as many classes, ImageFolder has 5'),
])
def test_bad_input_is_one_line_and_nonzero_exit(workdir, args, message):
    proc = run_in_process('train_imagenet.py', 'with', *args, cwd=workdir, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr


def test_the_default_top_k_fits_a_data_set_of_fewer_than_5_classes(tmp_path):
    """top-1 and top-5 by default, top-1 alone for 4 classes; an explicit top-5 is refused with
    the setting that fits."""
    import train_imagenet
    from multiexit.data.folders import write_fake_image_folders
    from multiexit.errors import ConfigError
    from multiexit.config import TrainConfig
    from multiexit.train.run import Run

    config = dict(train_imagenet.ex.run('print_config', named_configs=['smoke']).config)
    data = write_fake_image_folders(tmp_path / 'four', n_classes=4)
    config.update(data_dir=str(data), seed=0, **{split: dict(config[split], n_workers=0)
                                                 for split in ('cf_trn', 'cf_val')})
    build = lambda cf_loss: Run(TrainConfig.of(dict(config, cf_loss=cf_loss)), tmp_path / 'run',
                                tmp_path)
    assert config['cf_loss']['acc_tops'] is None
    assert build(config['cf_loss']).acc_tops == (1,)
    with pytest.raises(ConfigError, match=r'top-5 needs as many classes, ImageFolder has 4; '
                                          r'set cf_loss.acc_tops=\[1\]'):
        build(dict(config['cf_loss'], acc_tops=[1, 5]))
