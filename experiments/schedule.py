"""The cells still to run, in order, and the failure that stops the grid: an error that every
cell would repeat (the data set missing, a setting given after -- that is wrong) stops it at
once, with that line, instead of failing all cells alike. The units to run are cells, or packs
of cells trained together (``cells.Pack``), whose cells each end with an outcome of their own.

A cell that fails with exit code 2 (bad input, reported as one 'error: ...' line) may fail
through its own settings (a size larger than the data set) or through what every cell shares.
To tell them apart, the cell that differs most from it in method, size and seed runs next; once
the same line has come from cells that differ in each of these that the cells vary in, the grid
stops. One cell after another, that takes two failed cells (of different methods, sizes and
seeds) rather than all of them; with --jobs, the cells already running finish first. With
packs, the pack that holds the cell that differs most runs next.
"""
import threading

from multiexit.errors import EXIT_CODE

DIMENSIONS = ('method', 'size', 'seed')


class Schedule:
    def __init__(self, units):
        self.units = list(units)
        every = [cell for unit in self.units for cell in unit.cells]
        self.varied = [d for d in DIMENSIONS if len({getattr(c, d) for c in every}) > 1]
        self.failures = {}  # error line -> the cells that failed with it
        self.repeated = None  # (error line, the cells that failed with it): every cell would
        self.lock = threading.Lock()

    def take(self):
        """The next unit to run, or None: none left, or an error that every cell repeats."""
        with self.lock:
            return None if self.repeated or not self.units else self.units.pop(0)

    def ended(self, cell, outcome):
        """Notes how a cell ended; after a failure with bad input, the cell that would tell
        whether every cell fails so runs next."""
        if outcome.status != 'failed' or outcome.code != EXIT_CODE or not outcome.error:
            return
        with self.lock:
            failed = self.failures.setdefault(outcome.error, [])
            failed.append(cell)
            seen = {d: {getattr(c, d) for c in failed} for d in self.varied}
            open_ = [d for d in self.varied if len(seen[d]) < 2]
            if not open_:
                self.repeated = outcome.error, failed
                return
            news = lambda unit: max(sum(getattr(c, d) not in seen[d] for d in open_)
                                    for c in unit.cells)
            probe = max(self.units, key=news, default=None)  # the first of the best
            if probe is not None and news(probe):
                self.units.remove(probe)
                self.units.insert(0, probe)

    def repeated_error(self):
        """The one line that says the grid stopped at an error every cell repeats."""
        line, failed = self.repeated
        names = ', '.join(c.name for c in failed)
        dims = ' and '.join(filter(None, [', '.join(self.varied[:-1]), *self.varied[-1:]]))
        differ = f', which differ in {dims},' if dims else ''
        cells = 'cells' if len(failed) > 1 else 'cell'
        return (f'{line.removeprefix("error: ")} ({cells} {names}{differ} failed with it, so '
                f'every cell would: the grid stopped; fix it and run the same command again)')
