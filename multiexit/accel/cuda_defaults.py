"""The default of each CUDA speed switch, as a GPU measured it: ``cuda_defaults.json`` beside this
module holds one decision per switch (``on`` or ``off``, the measurement that decided it, its
figures and why). A switch is on by default only where a committed decision says so, naming the
measurement; a switch without one is off (opt-in) until a device check measures it correct and
faster. ``benchmarks/decide_defaults.py`` (run by ``benchmarks/gpu_check.py``) writes the
decisions from a check's measurements, so committing a check's file is what changes a default.
The library only reads the file."""
import json
from pathlib import Path

PATH = Path(__file__).with_name('cuda_defaults.json')
SHOWN = 'multiexit/accel/cuda_defaults.json'  # how print_config's comments name it
VERDICTS = ('on', 'off')


def load(path=None):
    """{switch: decision} of the file at ``path`` (default ``PATH``), checked: every verdict is
    'on' or 'off', and an 'on' names the measurement (``measured_by``) that decided it.
    ValueError naming the file otherwise: a committed file the library cannot trust is a bug,
    not a default to guess."""
    path = Path(path or PATH)
    decisions = json.loads(path.read_text())['switches']
    for name, d in decisions.items():
        if d.get('verdict') not in VERDICTS:
            raise ValueError(f"{path}: {name}'s verdict must be 'on' or 'off', got "
                             f"{d.get('verdict')!r}")
        if d['verdict'] == 'on' and not d.get('measured_by'):
            raise ValueError(f'{path}: {name} is on but names no measurement (measured_by)')
    return decisions


def default(decisions, name):
    """The default of switch ``name``: its decided value when on (True, or the mode of a switch
    with modes, ``compile``), False when off or undecided."""
    d = decisions.get(name)
    return d.get('value', True) if d and d['verdict'] == 'on' else False


def where_from(decisions, name):
    """Where the default of ``name`` comes from, for its comment in print_config."""
    d = decisions.get(name, {})
    if not d.get('measured_by'):
        return f'default off: not measured on a GPU yet ({SHOWN})'
    measured = f"measured on {d.get('device', 'a GPU')}, {d.get('date', '?')}"
    if d['verdict'] == 'on':
        return f'default on: {measured} ({SHOWN})'
    return f'default off: not faster, {measured} ({SHOWN})'
