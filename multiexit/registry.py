"""Building a registered class from a config dict whose ``call`` names it."""
import inspect

from .errors import ConfigError


def _arguments(cls):
    return set(inspect.signature(cls).parameters)


def build(registry, cf, what, *args):
    """``registry[cf['call']](*args, **rest)``.

    Keys that only other entries of the registry take are dropped: sacred merges a new
    ``call`` or a named config into the default dict, whose other keys stay behind (the
    training scripts warn about those the user set: ``settings.ignored_keys``). Any other
    unknown key is an error, as is an unknown ``call``.
    """
    kwargs = dict(cf)
    name = kwargs.pop('call', None)
    if name not in registry:
        raise ConfigError(f"unknown {what} call={name!r} in cf_{what}; known: "
                          f"{', '.join(sorted(registry))}")
    others = set().union(*map(_arguments, registry.values())) - _arguments(registry[name])
    try:
        return registry[name](*args, **{k: v for k, v in kwargs.items() if k not in others})
    except (TypeError, ValueError) as e:  # unexpected keyword or inconsistent sizes
        raise ConfigError(f'cf_{what} for {name}: {e}') from None
