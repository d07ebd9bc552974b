"""The runs of a snapshots folder on the command line: the table, filters, CSV and curves.

    python3 -m multiexit.runs [snapshots/] [--filter key=value ...] [--wide] [--csv runs.csv]
    python3 -m multiexit.runs --plot RUN ...          # RUN: a run id or a snapshot_name
"""
import argparse
import os
from pathlib import Path

from ..errors import reported_as_one_line
from . import find
from .curves import plot_curves
from .summary import LEGEND, WIDTH, summary
from .table import load_runs, parse_filter, select


def run_folder(name, snapshot_dir):
    """The folder of the run that ``name`` names: a run id, else what eval.py takes for it (a
    snapshot_name: its newest COMPLETED training run, said on the terminal)."""
    folder = Path(snapshot_dir) / str(name)
    if folder.is_dir():
        return folder
    path = find.resolve(name, snapshot_dir, say=print)
    return path if path.is_dir() else path.parent


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python3 -m multiexit.runs',
        description='List the sacred runs of a snapshots folder (a readable subset of columns; '
                    '--wide: more, --csv writes all of them).')
    parser.add_argument('snapshots', nargs='?',
                        default=os.environ.get('MULTIEXIT_SNAPSHOTS', 'snapshots'),
                        help='snapshots folder (default: $MULTIEXIT_SNAPSHOTS or snapshots)')
    parser.add_argument('--filter', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                        help='keep runs whose column KEY equals VALUE (compared as values: 4 '
                             'matches 4.0; * and ? glob the text), e.g. experiment=eval '
                             'status=COMPLETED cf_loss.call=ClassificationOnlyLoss')
    parser.add_argument('--wide', action='store_true',
                        help=f'more columns (start, duration, parent run, settings), not cut to '
                             f'{WIDTH} characters')
    parser.add_argument('--csv', metavar='PATH', help='write every column of the listed runs')
    parser.add_argument('--plot', nargs='+', default=[], metavar='RUN',
                        help='write training curves, from the first run of a resumed run\'s '
                             'chain, to <snapshots>/<run id>/curves.png; RUN: a run id or a '
                             'snapshot_name')
    args = parser.parse_args(argv)
    with reported_as_one_line():
        filters = [parse_filter(f) for f in args.filter]
        runs = select(load_runs(args.snapshots), filters)
        if runs.empty:
            print(f'no runs in {args.snapshots}' + (' match the filters' if filters else ''))
        else:
            print(summary(runs, wide=args.wide))
            print(LEGEND)
        if args.csv:
            runs.to_csv(args.csv, index=False)
            print(f'wrote {len(runs)} runs x {runs.shape[1]} columns to {args.csv}')
        for run in args.plot:
            run_dir = run_folder(run, args.snapshots)
            plot_curves(run_dir, run_dir / 'curves.png')
            print(f'wrote {run_dir / "curves.png"}')


if __name__ == '__main__':
    main()
