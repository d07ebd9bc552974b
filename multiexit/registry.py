"""Building a registered class from a config dict whose ``call`` names it."""
import inspect
import warnings

from .errors import ConfigError


def _arguments(cls):
    return set(inspect.signature(cls).parameters)


def build(registry, cf, what):
    """``registry[cf['call']](**rest)``.

    Keys that only other entries of the registry take (left behind when sacred merges a new
    ``call`` or a named config into the default dict) are dropped with a warning; any other
    unknown key is an error, as is an unknown ``call``.
    """
    kwargs = dict(cf)
    name = kwargs.pop('call', None)
    if name not in registry:
        raise ConfigError(f"unknown {what} call={name!r} in cf_{what}; known: "
                          f"{', '.join(sorted(registry))}")
    others = set().union(*map(_arguments, registry.values())) - _arguments(registry[name])
    dropped = sorted(k for k in kwargs if k in others)
    if dropped:
        warnings.warn(f'cf_{what}: {name} takes no {", ".join(dropped)}; ignored', stacklevel=3)
    try:
        return registry[name](**{k: v for k, v in kwargs.items() if k not in others})
    except (TypeError, ValueError) as e:  # unexpected keyword or inconsistent sizes
        raise ConfigError(f'cf_{what} for {name}: {e}') from None
