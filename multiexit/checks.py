"""The checks of settings: rules for single values, and for the ``cf_*`` dicts (``Section``).

``config.TrainConfig`` attaches a rule to every training setting; a bad value is one ConfigError
with the key, the value and what is expected. A ``Section`` checks that its ``call`` names a
class and that every key is an argument of some class of its kind (keys that the chosen class
does not take are the builders' to drop: ``ignored_keys``), then its keys' own rules.
``classes(section)`` is what a ``call`` may name.
"""
import difflib
import inspect
import math
import os

import torch

from . import data, losses, models
from .errors import ConfigError
from .train import regime

REGISTRIES = {'cf_net': models.REGISTRY, 'cf_loss': losses.REGISTRY,
              'cf_trn': data.REGISTRY, 'cf_val': data.REGISTRY, 'cf_regime': regime.REGISTRY}
# torch's classes that cf_opt and cf_scheduler may name: (module, base class)
MODULES = {'cf_opt': (torch.optim, torch.optim.Optimizer),
           'cf_scheduler': (torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)}
SECTIONS = (*REGISTRIES, *MODULES)
OPTIONS = {'cf_net': set(models.OPTIONS)}  # keys that every class of the section takes
COMPILE_MODES = (False, None, 'default', 'reduce-overhead', 'max-autotune')


def plain(value):
    """sacred's read-only containers as plain dicts and lists (for messages, checkpoints and
    comparisons)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def integer(low, optional=False):
    """An integer >= ``low`` (or None when ``optional``)."""
    what = f'an integer >= {low}' + (' or None' if optional else '')
    return what, lambda v: (optional and v is None) or (_is_int(v) and v >= low)


def number(low, high=math.inf, low_open=False, high_open=False):
    """A finite number in the interval from ``low`` to ``high``."""
    left, right = '(' if low_open else '[', ')' if high_open else ']'
    what = (f'a number > {low}' if low_open else f'a number >= {low}') if high == math.inf \
        else f'a number in {left}{low}, {high}{right}'

    def ok(v):
        return (_is_number(v) and (v > low if low_open else v >= low)
                and (v < high if high_open else v <= high))
    return what, ok


def integers(low, length=None, optional=False):
    """A list of integers >= ``low`` (of ``length`` of them, else at least one)."""
    size = f'{length} integers' if length else 'a list of integers'
    what = f'{size} >= {low}' + (' or None' if optional else '')

    def ok(v):
        if optional and v is None:
            return True
        return (isinstance(v, (list, tuple)) and len(v) == (length or max(len(v), 1))
                and all(_is_int(x) and x >= low for x in v))
    return what, ok


def numbers(low, high, length):
    what = f'{length} numbers in [{low}, {high})'
    return what, lambda v: (isinstance(v, (list, tuple)) and len(v) == length
                            and all(_is_number(x) and low <= x < high for x in v))


def weights(low):
    """None, a number >= ``low``, or a list of at least one."""
    ok = lambda x: _is_number(x) and x >= low
    return (f'None, a number >= {low} or a list of them',
            lambda v: v is None or ok(v) or isinstance(v, (list, tuple)) and v and all(
                map(ok, v)))


def one_of(*values):
    return (' or '.join(map(repr, values)),
            lambda v: any(v is x or (type(v) is type(x) and v == x) for x in values))


SWITCH = one_of(True, False)
PATH = 'a path', lambda v: isinstance(v, (str, os.PathLike))

DATA = {'n_per_class': integer(1, optional=True), 'nval_per_class': integer(1),
        'n_unl_per_class': integer(0, optional=True), 'lab_unl_ratio': integers(0, length=2),
        'seed': integer(0), 'augment': SWITCH, 'image_size': integer(1),
        'n_workers': integer(0, optional=True)}
LOSS = {'C': number(0, 1), 'maxprob': number(0, 1), 'global_scale': number(0, low_open=True),
        'T': number(0, low_open=True), 'Tmult': number(1), 'n_exits': integer(1, optional=True),
        'acc_tops': integers(1, optional=True), 'kd_weight': number(0), 'gamma': number(0, 1),
        'ramp_epochs': integer(1, optional=True)}
OPT = {'lr': number(0, low_open=True), 'momentum': number(0, 1), 'dampening': number(0, 1),
       'weight_decay': number(0), 'nesterov': SWITCH, 'eps': number(0, low_open=True),
       'betas': numbers(0, 1, 2), 'alpha': number(0), 'amsgrad': SWITCH}
NET = {'boost_reweight': weights(0)}  # models.boosted: one, two (a linspace) or one per exit
REGIME = {'backbone_epochs': (
    'an integer >= 1 (epochs), a number in (0, 1) (a share of n_epochs) or None (joint)',
    lambda v: v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v < 1))}
SCHEDULER = {'milestones': integers(0), 'gamma': number(0, low_open=True),
             'step_size': integer(1), 'T_max': integer(1), 'eta_min': number(0)}


class Section:
    """The rule of a ``cf_*`` dict: a known ``call``, known keys, and ``rules`` for the values of
    the keys it holds."""

    def __init__(self, rules=None):
        self.rules = rules or {}

    def check(self, key, cf):
        _check_calls_and_keys(key, cf)
        for sub, rule in self.rules.items():
            if sub in cf:
                check_value(f'{key}.{sub}', cf[sub], rule)


def check_phases(cf_regime, n_epochs):
    """ConfigError unless every phase of ``cf_regime`` has an epoch of the ``n_epochs``."""
    phases = regime.build(cf_regime).phases(n_epochs)
    if any(p.end <= p.start for p in phases):
        lengths = ' + '.join(str(p.end - p.start) for p in phases)
        raise ConfigError(f"cf_regime.backbone_epochs={cf_regime['backbone_epochs']!r} with "
                          f'n_epochs={n_epochs} gives phases of {lengths} epochs: each needs '
                          'at least one')


def check_value(key, value, rule):
    """ConfigError unless ``value`` of the setting ``key`` follows ``rule``."""
    if isinstance(rule, Section):
        return rule.check(key, value)
    what, ok = rule
    if not ok(value):
        raise ConfigError(f'{key}={plain(value)!r}: expected {what}')


def _closest(word, options):
    match = difflib.get_close_matches(word, sorted(options), n=1)
    return f' (did you mean {match[0]}?)' if match else ''


def _arguments(cls, section=None):
    return (set(inspect.signature(cls).parameters) - {'self', 'params', 'optimizer'}
            | OPTIONS.get(section, set()))


def takes(section, call):
    """The settings that the class ``call`` of ``section`` (e.g. 'cf_loss',
    'SdnWeightedLoss') takes; none for a call that names no class."""
    cls = classes(section).get(call)
    return set() if cls is None else _arguments(cls, section)


def classes(section):
    """{call: class} of what the ``section`` ('cf_net', 'cf_opt', ...) may name."""
    if section in REGISTRIES:
        return REGISTRIES[section]
    module, base = MODULES[section]
    return {name: cls for name, cls in vars(module).items()
            if isinstance(cls, type) and issubclass(cls, base) and cls is not base
            and not name.startswith('_')}


def _check_calls_and_keys(section, cf):
    if not isinstance(cf, dict):
        raise ConfigError(f'{section}={plain(cf)!r}: expected a dict with a call')
    family = classes(section)
    call = cf.get('call')
    if call not in family:
        raise ConfigError(f'{section}.call={call!r}: unknown{_closest(str(call), family)}; '
                          f'known: {", ".join(sorted(family))}' if section in REGISTRIES else
                          f'{section}.call={call!r}: not a class of {MODULES[section][0].__name__}'
                          f'{_closest(str(call), family)}')
    # others' keys: left behind, dropped
    known = set().union(*(_arguments(cls, section) for cls in family.values()))
    for key in cf:
        if key != 'call' and key not in known:
            raise ConfigError(f'{section}.{key}: {call} takes no such setting'
                              f'{_closest(key, known)}; it takes '
                              f'{", ".join(sorted(_arguments(family[call], section)))}')


def ignored_keys(section, cf, keys):
    """Which of ``keys`` (of the dict ``cf`` of ``section``, e.g. 'cf_loss') its ``call`` does
    not take, though another class of its kind does (``registry.build`` drops them)."""
    cls = classes(section).get(cf.get('call'))
    return [] if cls is None else sorted(k for k in keys if k != 'call' and k in cf
                                         and k not in _arguments(cls, section))
