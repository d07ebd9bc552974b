"""Check and measure the CUDA path in one command (at most about 8 minutes on an H100).

    python3 benchmarks/gpu_check.py OUT_DIR            # everything
    python3 benchmarks/gpu_check.py OUT_DIR --quick    # shorter timings, a first look

Stages, each in its own process with its own time limit, so that a failing or hanging stage is
reported and the next one still runs:
  versions     the GPU, driver, CUDA, cuDNN, Python and torch
  sacred       installed from wheels (--wheels) into a temporary folder if it cannot be imported
  cuda_tests   pytest tests/test_cuda.py
  throughput   benchmarks/train_throughput.py, every mode, with the test counts: its JSON goes to
               benchmarks/results/<date>-<device>.json (and OUT_DIR/throughput.json)
  profile      benchmarks/profile_step.py: kernels per step, their GPU time, the top kernels
  early_exit   benchmarks/early_exit.py --device cuda: streaming, latency and shrinking early exit
               at batch sizes 1, 16, 256 and 1024 against the graphed full forward (gpu_speedup)
  concurrency  benchmarks/concurrent_training.py: 1, 2 and 4 training processes on the GPU
Writes OUT_DIR/summary.json and OUT_DIR/stages.log (every stage's output) and prints a summary
table last. Exit code: 0 when every stage passed, 1 otherwise.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ('.whl', '../shared/device-wheels')  # relative to the repository
# seconds per stage (limit, kept for the stages after it), for the full check and --quick
# (2026-11-26, H100: tests 121 s, early exit 16 s, eager modes ~400 images/s: launch bound;
# the early-exit sweep of batch sizes is to take at most 90 s)
LIMITS = {False: dict(cuda_tests=(200, 250), throughput=(220, 150), profile=(50, 110),
                      early_exit=(90, 90), concurrency=(90, 0)),
          True: dict(cuda_tests=(150, 100), throughput=(80, 60), profile=(30, 40),
                     early_exit=(60, 30), concurrency=(40, 0))}
QUICK_MODES = 'reference,fused_sgd,cuda_graph,default,compile_default'


def versions():
    import torch

    lines = [f'python {sys.version.split()[0]}', f'torch {torch.__version__}',
             f'cuda {torch.version.cuda}', f'cudnn {torch.backends.cudnn.version()}']
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines += [f'device {p.name}, {p.total_memory / 2**30:.1f} GiB, '
                  f'{p.multi_processor_count} SMs, capability {p.major}.{p.minor}']
    try:
        smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                              '--format=csv,noheader'], capture_output=True, text=True, timeout=30)
        lines.append(f'nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}')
    except (OSError, subprocess.TimeoutExpired) as e:
        lines.append(f'nvidia-smi: {e}')
    print('\n'.join(lines))
    return torch.cuda.is_available()


class Checker:
    def __init__(self, out, budget_s):
        self.out, self.start, self.budget_s = out, time.time(), budget_s
        self.log = open(out / 'stages.log', 'w')
        self.rows = []
        self.env = dict(os.environ, PYTHONUNBUFFERED='1')

    def left(self):
        return self.budget_s - (time.time() - self.start)

    def stage(self, name, cmd, timeout_s, reserve_s=0):
        """Run ``cmd`` with a time limit: ``timeout_s``, cut so that ``reserve_s`` of the budget
        stays for the stages after it. Returns (ok, output)."""
        limit = min(timeout_s, self.left() - reserve_s)
        self.log.write(f'\n===== {name}: {" ".join(map(str, cmd))} (limit {limit:.0f} s)\n')
        self.log.flush()
        if limit < 10:
            return self._row(name, 'SKIPPED', 0, 'no time left in the budget'), ''
        t = time.time()
        try:
            proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=self.env, timeout=limit,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output, status = proc.stdout, 'PASSED' if proc.returncode == 0 else 'FAILED'
            note = '' if proc.returncode == 0 else f'exit code {proc.returncode}'
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
            status, note = 'TIMEOUT', f'stopped after {limit:.0f} s'
        self.log.write(output)
        self.log.flush()
        print(f'[{name}] {status} in {time.time() - t:.0f} s {note}', flush=True)
        return self._row(name, status, time.time() - t, note) == 'PASSED', output

    def _row(self, name, status, seconds, note):
        self.rows.append(dict(stage=name, status=status, seconds=round(seconds, 1), note=note))
        return status


def install_sacred(checker, wheels):
    """sacred importable, or installed from wheels into a temporary folder (put on the stages'
    PYTHONPATH)."""
    probe = [sys.executable, '-c', 'import sacred']
    if subprocess.run(probe, env=checker.env, capture_output=True).returncode == 0:
        return checker._row('sacred', 'PASSED', 0, 'already installed') == 'PASSED'
    folder = next((ROOT / w for w in ([wheels] if wheels else WHEELS)
                   if (ROOT / w).is_dir() and list((ROOT / w).glob('*.whl'))), None)
    if folder is None:
        return checker._row('sacred', 'FAILED', 0, 'not installed and no wheels found; '
                            'pass --wheels DIR (with sacred and its dependencies)') == 'PASSED'
    site = tempfile.mkdtemp(prefix='gpu_check_site_')
    ok, _ = checker.stage('sacred', [sys.executable, '-m', 'pip', 'install', '-q', '--no-index',
                                     '--no-deps', '--target', site,
                                     *sorted(folder.glob('*.whl'))], 120)
    checker.env['PYTHONPATH'] = os.pathsep.join(
        [str(site), str(ROOT)] + ([checker.env['PYTHONPATH']] if 'PYTHONPATH' in checker.env
                                  else []))
    return ok


def test_counts(xml_path):
    """(passed, failed, skipped) from pytest's JUnit XML."""
    try:
        suite = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
    total, failed = int(suite.get('tests', 0)), int(suite.get('failures', 0)) + int(
        suite.get('errors', 0))
    skipped = int(suite.get('skipped', 0))
    return total - failed - skipped, failed, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='folder for the results (created)')
    parser.add_argument('--quick', action='store_true', help='shorter timings (a first look)')
    parser.add_argument('--budget-s', type=float, default=None,
                        help='time for all stages (default 470, --quick 300)')
    parser.add_argument('--wheels', default=None, help='folder of wheels for sacred (default: '
                        f'the first of {", ".join(WHEELS)} that holds some)')
    parser.add_argument('--skip', default='', help='stages to skip, comma-separated')
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (280 if args.quick else 470)
    limits = LIMITS[args.quick]
    checker = Checker(out, budget)
    skip = set(filter(None, args.skip.split(',')))
    py = sys.executable

    print('[versions]', flush=True)
    cuda = versions()
    checker._row('versions', 'PASSED' if cuda else 'FAILED', 0, '' if cuda else 'no CUDA device')
    install_sacred(checker, args.wheels)

    counts = None
    if 'cuda_tests' not in skip:
        junit = out / 'cuda_tests.xml'
        _, output = checker.stage('cuda_tests', [py, '-m', 'pytest', '-v', '-rs', '-p',
                                                 'no:cacheprovider', f'--junitxml={junit}',
                                                 'tests/test_cuda.py'], *limits['cuda_tests'])
        counts = test_counts(junit)
        if counts:
            checker.rows[-1]['note'] = 'passed {}, failed {}, skipped {}'.format(*counts)

    throughput = out / 'throughput.json'
    if 'throughput' not in skip:
        quick = (['--steps', '100', '--eager-steps', '20', '--warmup', '5', '--modes',
                  QUICK_MODES] if args.quick
                 else ['--steps', '200', '--eager-steps', '40', '--warmup', '8'])
        limit, reserve = limits['throughput']
        limit = min(limit, checker.left() - reserve)
        cmd = [py, 'benchmarks/train_throughput.py', *quick, '--json', throughput,
               '--deadline-s', str(max(limit - 90, 0))]  # a compilation takes a minute or more
        if counts:
            cmd += ['--cuda-tests', ','.join(map(str, counts))]
        checker.stage('throughput', cmd, limit, reserve)
        if throughput.is_file():
            r = json.loads(throughput.read_text())
            if r.get('errors'):
                checker.rows[-1]['status'] = 'FAILED'
                checker.rows[-1]['note'] = 'errors: ' + ', '.join(r['errors'])
            dest = ROOT / 'benchmarks' / 'results' / (
                f"{r['date']}-{r['device'].replace(' ', '-').lower()}.json")
            shutil.copy(throughput, dest)

    if 'profile' not in skip:
        checker.stage('profile', [py, 'benchmarks/profile_step.py', '--json',
                                  out / 'profile.json'], *limits['profile'])
    if 'early_exit' not in skip:
        early_exit = out / 'early_exit.json'
        quick = ['--batch-sizes', '1', '256', '--repeats', '2'] if args.quick else []
        checker.stage('early_exit', [py, 'benchmarks/early_exit.py', '--device', 'cuda',
                                     '--calibration', '1024', *quick, '--out', early_exit],
                      *limits['early_exit'])
        if early_exit.is_file():
            e = json.loads(early_exit.read_text())
            if not all(r['identical'] for r in e['gpu_speedup']):
                checker.rows[-1]['status'] = 'FAILED'
                checker.rows[-1]['note'] = 'early exit decided otherwise than the simulated one'
            elif not e['complete']:
                checker.rows[-1]['note'] += f" (batch sizes done: {', '.join(e['full_forward'])})"

    if 'concurrency' not in skip:
        seconds = '4' if args.quick else '6'
        procs = ['1', '2'] if args.quick else ['1', '2', '4']
        checker.stage('concurrency', [py, 'benchmarks/concurrent_training.py', '--procs', *procs,
                                      '--seconds', seconds, '--json', out / 'concurrency.json'],
                      *limits['concurrency'])

    summary = dict(command=' '.join(['python3'] + sys.argv), rows=checker.rows, total_s=round(time.time() - checker.start, 1),
                   cuda_tests=counts)
    for name in ('throughput', 'profile', 'early_exit', 'concurrency'):
        f = out / f'{name}.json'
        summary[name] = json.loads(f.read_text()) if f.is_file() else None
    (out / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    print(table(summary))
    sys.exit(0 if all(r['status'] == 'PASSED' for r in checker.rows) else 1)


def table(s):
    lines = ['', f"{'stage':<12} {'status':<8} {'s':>6}  note"]
    lines += [f"{r['stage']:<12} {r['status']:<8} {r['seconds']:6.0f}  {r['note']}"
              for r in s['rows']]
    t = s.get('throughput')
    if t:
        ref = t['train_images_per_s'].get('reference')
        lines.append('')
        lines += [f'train {m:<24} {v:9.0f} img/s  x{v / ref:.2f}' if ref else
                  f'train {m:<24} {v:9.0f} img/s' for m, v in t['train_images_per_s'].items()]
        eref = t['eval_images_per_s'].get('reference')
        lines += [f'eval  {m:<24} {v:9.0f} img/s  x{v / eref:.2f}' if eref else
                  f'eval  {m:<24} {v:9.0f} img/s' for m, v in t['eval_images_per_s'].items()]
        for key in ('projected_paper_run_s', 'projected_full_run_s'):
            if t.get(key):
                lines.append(f'{key}: {t[key]:.0f} s ({t[key] / 60:.1f} min)')
        if t.get('peak_memory_bytes'):
            lines.append(f"peak GPU memory: {t['peak_memory_bytes'] / 2**20:.0f} MiB")
    c = s.get('concurrency')
    if c:
        lines += [f"{n} concurrent training process(es): {row['total_images_per_s']:.0f} img/s"
                  for n, row in c['procs'].items()]
    p = s.get('profile')
    if p:
        lines.append(f"profile: {p['kernels_per_step']:.0f} kernels per step, "
                     f"{p['gpu_kernel_ms_per_step']:.1f} ms of GPU time; eager step "
                     f"{p['eager_step_ms']:.1f} ms, graph replay {p['graph_replay_ms']:.1f} ms")
        lines += [f"  {k['ms_per_step']:7.3f} ms {k['calls_per_step']:5.0f}x {k['name'][:80]}"
                  for k in p['top_kernels'][:8]]
    e = s.get('early_exit')
    if e:
        lines.append('early exit against the graphed full forward, q=0.5 (speedup, MACs ratio):')
        for b, full in e['full_forward'].items():
            lines.append(f"  batch {b:>4}: full {full['images_per_s']:8.0f} img/s; " + ', '.join(
                f"{r['mode']} x{r['speedup']:.2f} (x{r['macs_ratio']:.1f})"
                + ('' if r['identical'] else ' NOT IDENTICAL') for r in e['gpu_speedup']
                if str(r['batch_size']) == b and r['q'] == 0.5))
        lines += [f"  {'met' if t['met'] else 'MISSED'}: {t['what']}"
                  + (f" (x{t['speedup']:.2f})" if 'speedup' in t else '') for t in e['targets']]
    lines.append(f"total {s['total_s']:.0f} s")
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
