"""Wall time of the quick grid (4 cells: training and evaluation) with --jobs 1 and --jobs 2,
each run in a fresh folder, alternating, in one run of this script on this machine.

    python3 benchmarks/grid_jobs.py                    # the three setups below, twice each
    python3 benchmarks/grid_jobs.py --setups 1 2 4 --repeat 1

A setup is N (``--jobs N`` with OMP_NUM_THREADS unset, as a user runs it: one cell uses every
core, and --jobs N gives each of N CPU cells cores / N threads) or N:T (the same with
OMP_NUM_THREADS=T). The default, 1 1:1 2, separates what running two cells at once gains from
what one thread per process gains. Writes benchmarks/results/<date>-grid_jobs-cpu.json: the
commands, every wall time, the load average before and after each, and whether every grid
wrote the same table (results/grid-quick.md).
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


def timed_grid(setup, work):
    jobs, _, threads = setup.partition(':')
    cmd = [sys.executable, '-m', 'experiments.grid', '--quick', '--jobs', jobs, '--snapshots',
           'snaps']
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])))
    env.pop('MULTIEXIT_SNAPSHOTS', None)
    env.pop('OMP_NUM_THREADS', None)
    if threads:
        env['OMP_NUM_THREADS'] = threads
    load = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f'error: {" ".join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}')
    return dict(setup=setup, jobs=int(jobs), omp_num_threads=threads or None,
                wall_s=round(wall, 2), load_average_before_after=[load, os.getloadavg()]), \
        (work / 'results' / 'grid-quick.md').read_text()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--setups', nargs='+', default=['1', '1:1', '2'],
                        help='N or N:T (--jobs N, OMP_NUM_THREADS=T)')
    parser.add_argument('--repeat', type=int, default=2)
    parser.add_argument('--out', type=Path, default=ROOT / 'benchmarks' / 'results')
    args = parser.parse_args()
    runs, tables = [], {}
    for _ in range(args.repeat):
        for setup in args.setups:
            with tempfile.TemporaryDirectory() as work:
                run, table = timed_grid(setup, Path(work))
            runs.append(run)
            tables.setdefault(table, []).append(setup)
            print(f'{setup}: {run["wall_s"]:.1f} s', flush=True)
    import torch
    result = dict(
        device='cpu', cpu_cores=os.cpu_count(), torch=torch.__version__,
        command='python3 benchmarks/grid_jobs.py ' + ' '.join(sys.argv[1:]),
        grid_command='python3 -m experiments.grid --quick --jobs N --snapshots snaps (a fresh '
                     'folder each time; OMP_NUM_THREADS unset, or T for a setup N:T)',
        date=str(datetime.date.today()), runs=runs,
        wall_s_by_setup={s: [r['wall_s'] for r in runs if r['setup'] == s] for s in args.setups},
        setups_by_distinct_grid_md=list(tables.values()))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f'{result["date"]}-grid_jobs-cpu.json'
    path.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
