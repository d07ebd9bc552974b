"""Progress bars for the terminal that leave no trace in the saved run log."""
import re

from tqdm import tqdm

# tqdm's right-hand side, e.g. "12/156 [00:03<00:40,  3.5it/s]" or "... 1.20s/it]"
_BAR = re.compile(r'\d+/\d+ \[[^\]]*(it/s|s/it|\?)[^\]]*\]\s*$')


def bar(iterable, desc, total=None):
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def strip_progress(text):
    """Resolve carriage returns/backspaces as a terminal would, then drop progress-bar lines."""
    lines = []
    for line in text.split('\n'):
        while '\b' in line:
            i = line.index('\b')
            line = line[:max(i - 1, 0)] + line[i + 1:]
        line = line.rstrip('\r').split('\r')[-1]
        if not _BAR.search(line):
            lines.append(line)
    return '\n'.join(lines)
