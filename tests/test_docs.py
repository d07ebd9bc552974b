"""The commands in README.md and docs/ name scripts and modules that exist, and their
``with key=value`` settings name config keys that exist."""
import importlib
import importlib.util
import re
import shlex
import warnings

import pytest

from helpers import ROOT
from multiexit import checks

PAGES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))
SACRED_SCRIPTS = ('train_cifar.py', 'train_imagenet.py', 'eval.py')
FENCE = re.compile(r'^```[^\n]*\n(.*?)^```', re.M | re.S)
INLINE = re.compile(r'`((?:python3?|torchrun) [^`]+)`')


def commands(text):
    """Shell commands of a page: the lines of its fenced blocks (continuations joined, comments
    dropped, ``&&`` split) and inline code that starts with python3 or torchrun."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.split(' #')[0].strip()
            if line.startswith('#') or not line:
                continue
            found += [part.strip() for part in line.split('&&')]
    return found + INLINE.findall(text)


def all_commands():
    out = []
    for page in PAGES:
        out += [(page.relative_to(ROOT).as_posix(), cmd) for cmd in commands(page.read_text())]
    return out


def program(words):
    """(kind, name, arguments) of a command: ('script', 'train_cifar.py', [...]),
    ('module', 'experiments.grid', [...]) or None when it runs neither."""
    while words and re.match(r'^[A-Z_]+=', words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    if words[0] in ('python', 'python3'):
        rest = words[1:]
        if rest[:1] == ['-m']:
            return 'module', rest[1], rest[2:]
        return ('script', rest[0], rest[1:]) if rest and rest[0].endswith('.py') else None
    if words[0] == 'torchrun':
        script = next((w for w in words if w.endswith('.py')), None)
        return ('script', script, words[words.index(script) + 1:]) if script else None
    return None


def config_of(script):
    """(default config, {named config: its dict}) of a sacred script."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        module = importlib.import_module(script[:-3])
    ex = module.ex
    config = {}
    for scope in ex.configurations:  # training_experiment's settings, the script's own
        config.update(scope(preset=config))
    return config, {name: dict(scope()) for name, scope in ex.named_configs.items()}


def has_key(config, dotted):
    node = config
    for part in dotted.split('.'):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def merged(config, update):
    out = dict(config)
    for k, v in update.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def settable(config, key, settings):
    """Whether ``key`` is in ``config``, or a setting that the class a section names takes
    (``cf_loss.gamma`` with ``cf_loss.call=IMTADistillation`` on the same line)."""
    if has_key(config, key):
        return True
    section, _, name = key.partition('.')
    given = [w.split('=', 1)[1] for w in settings if w.startswith(f'{section}.call=')]
    call = given[-1] if given else (config.get(section) or {}).get('call')
    return section in checks.SECTIONS and name in checks.takes(section, call)


def check_settings(script, settings):
    """Every ``key=value`` names a key of ``script``'s config, or a setting of the class its
    section names, given the named configs and config files before it on the same line; every
    bare word is a named config."""
    config, named = config_of(script)
    for word in settings:
        if '=' in word:
            key = word.split('=', 1)[0]
            assert settable(config, key, settings), f'{script} has no config key {key!r}'
        elif word.endswith('.json') or word == '...':
            continue  # a run's config.json (its keys are the script's own), or a placeholder
        else:
            assert word in named, f'{script} has no named config {word!r}'
            config = merged(config, named[word])


@pytest.mark.parametrize('page, command', all_commands())
def test_documented_command_runs_something_that_exists(page, command):
    words = shlex.split(command)
    found = program(words)
    if found is None:
        return  # pip, torchrun's own options, shell: nothing of this repository
    kind, name, args = found
    if kind == 'script':
        assert (ROOT / name).is_file(), f'{page}: {command}: no {name}'
        if name in SACRED_SCRIPTS and 'with' in args:
            check_settings(name, args[args.index('with') + 1:])
    else:
        assert importlib.util.find_spec(name) is not None, f'{page}: {command}: no module {name}'
        if name == 'experiments.grid' and '--' in args:
            check_settings('train_cifar.py', args[args.index('--') + 1:])


def test_the_pages_hold_commands_to_check():
    found = all_commands()
    scripts = {program(shlex.split(c))[1] for _, c in found if program(shlex.split(c))}
    assert {'train_cifar.py', 'train_imagenet.py', 'eval.py', 'experiments.grid',
            'multiexit.runs'} <= scripts
    assert sum(' with ' in c for _, c in found) > 10


def test_a_wrong_key_or_script_is_caught():
    with pytest.raises(AssertionError, match='no config key'):
        check_settings('train_cifar.py', ['cf_loss.temprature=4'])
    with pytest.raises(AssertionError, match='no named config'):
        check_settings('train_cifar.py', ['resnet57'])
    check_settings('train_cifar.py', ['wrn28_10', 'cf_net.dropout=0.3'])  # added by wrn28_10
    with pytest.raises(AssertionError, match='no config key'):
        check_settings('train_cifar.py', ['cf_net.dropout=0.3'])  # MsdNet has no dropout
    check_settings('train_cifar.py', ['cf_loss.call=IMTADistillation', 'cf_loss.gamma=0.2'])
    with pytest.raises(AssertionError, match='no config key'):
        check_settings('train_cifar.py', ['cf_loss.gamma=0.2'])  # DBT takes no gamma
    check_settings('train_cifar.py', ['cf_net.boost_reweight=0.5'])  # every network takes it
    with pytest.raises(AssertionError, match='no train_nope.py'):
        test_documented_command_runs_something_that_exists('page', 'python3 train_nope.py')
    with pytest.raises(AssertionError, match='no module experiments.nope'):
        test_documented_command_runs_something_that_exists('page', 'python3 -m experiments.nope')
    with pytest.raises(AssertionError, match='no config key'):
        test_documented_command_runs_something_that_exists(
            'page', 'torchrun --nproc_per_node=2 train_cifar.py with sync_bm=True')
    check_settings('train_imagenet.py', ['resnet50', 'cf_net.head=conv', 'sync_bn=True'])
    with pytest.raises(AssertionError, match='no config key'):
        check_settings('train_imagenet.py', ['cf_trn.image_sise=160'])
