"""Wall time of the quick grid (4 cells: training and evaluation) with --jobs 1 and --jobs 2,
each run in a fresh folder, alternating, in one run of this script on this machine.

    python3 benchmarks/grid_jobs.py                    # --jobs 1 and 2, twice each
    python3 benchmarks/grid_jobs.py --jobs 1 2 4 --repeat 1

The grids run as a user runs them, with this process's environment (no OMP_NUM_THREADS: one
cell uses every core, and --jobs N gives each of N CPU cells cores / N threads). Writes
benchmarks/results/<date>-grid_jobs-cpu.json: the commands, every wall time, the load average
before and after each, and whether every grid wrote the same grid.md.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_grid(jobs, work):
    cmd = [sys.executable, '-m', 'experiments.grid', '--quick', '--jobs', str(jobs),
           '--snapshots', 'snaps']
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])))
    env.pop('MULTIEXIT_SNAPSHOTS', None)
    load = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f'error: {" ".join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}')
    return dict(jobs=jobs, wall_s=round(wall, 2), load_average_before_after=[load,
                os.getloadavg()]), (work / 'results' / 'grid.md').read_text()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--jobs', nargs='+', type=int, default=[1, 2])
    parser.add_argument('--repeat', type=int, default=2)
    parser.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results')
    args = parser.parse_args()
    runs, tables = [], set()
    for _ in range(args.repeat):
        for jobs in args.jobs:
            with tempfile.TemporaryDirectory() as work:
                run, table = timed_grid(jobs, Path(work))
            runs.append(run)
            tables.add(table)
            print(f'--jobs {jobs}: {run["wall_s"]:.1f} s', flush=True)
    import torch
    result = dict(
        device='cpu', cpu_cores=os.cpu_count(), torch=torch.__version__,
        command='python3 benchmarks/grid_jobs.py ' + ' '.join(sys.argv[1:]),
        grid_command='python3 -m experiments.grid --quick --jobs N --snapshots snaps (fresh '
                     'folder, OMP_NUM_THREADS unset)',
        date=str(datetime.date.today()), runs=runs,
        wall_s_by_jobs={j: [r['wall_s'] for r in runs if r['jobs'] == j] for j in args.jobs},
        same_tables=len(tables) == 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f'{result["date"]}-grid_jobs-cpu.json'
    path.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
