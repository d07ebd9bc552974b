"""Check and measure the CUDA path in one command (at most about 8 minutes on an H100).

    python3 benchmarks/gpu_check.py OUT_DIR --check all  # first, whenever a GPU is at hand
    python3 benchmarks/gpu_check.py OUT_DIR            # everything
    python3 benchmarks/gpu_check.py OUT_DIR --quick    # shorter timings, a first look

``--check all`` decides everything pending in one call of at most 9 minutes on one H100
(ALL_BUDGET_S, the stages' limits in LIMITS['all']), in this order: the CUDA tests (every place
a CUDA graph is captured: the training step, the evaluation forward, each early-exit runner),
then the decisive figure of each check: speed (training and evaluation images/s of the default
path and its graph variants against the reference style), early exit (streaming and latency
against the graphed full forward at batch sizes 1 and 256, and whether they decide as the
simulation) and packs (packs of 9 and 15 paper MsdNets against one run alone, their memory, the
grid's projection). Each stage's JSON is in OUT_DIR as soon as it ends (stages.json: every
stage's status so far), so a call cut off still leaves what it finished.

Stages, each in its own process with its own time limit (LIMITS), so that a failing or hanging
stage is reported and the next one still runs:
  versions     the GPU, driver, CUDA, cuDNN, Python and torch
  sacred       installed from wheels (--wheels) into a temporary folder if it cannot be imported
  cuda_tests   pytest tests/test_cuda.py and every test file that skips without a GPU or is
               marked ``cuda`` (cuda_test_files); counts in OUT_DIR/cuda_tests.json
  throughput   benchmarks/train_throughput.py, the modes without torch.compile (those measured
               before on fewer steps: they are launch bound), with the test counts
  compile      the same for cuda_graph_compile: torch.compile 'default' inside our whole-step
               graph; the first step's seconds are its compile time
  profile      benchmarks/profile_step.py: kernels per step, their GPU time, the top kernels
  early_exit   benchmarks/early_exit.py --device cuda: streaming, latency and shrinking early exit
               at batch sizes 1, 16, 256 and 1024 against the graphed full forward (gpu_speedup)
  kernels      benchmarks/op_count.py --device cuda: CUDA kernels per step of each variant
  pack         benchmarks/pack_throughput.py: packs of 1, 3, 9 and 15 paper MsdNets against one
               run alone, and the fused convolutions alone; its JSON goes to
               benchmarks/results/<date>-pack-<device>.json
  max_autotune cuda_graph_max_autotune (torch.compile 'max-autotune'), with the time left
  concurrency  (only with --with concurrency) benchmarks/concurrent_training.py: 1, 2 and 4
               training processes on the GPU
The throughput-like stages' modes are merged into one JSON (OUT_DIR/throughput.json, copied to
benchmarks/results/<date>-<device>.json), with kernels per step per mode; the CUDA defaults it
decides (benchmarks/decide_defaults.py: a switch is on where the CUDA tests passed and it made
the step faster) go to OUT_DIR/decisions.json: copied to multiexit/accel/cuda_defaults.json and
committed with that JSON, they are the defaults. Writes OUT_DIR/summary.json and
OUT_DIR/stages.log (every stage's output) and prints a summary table last. Exit code: 0 when
every stage passed, 1 otherwise. All stages together take longer than one device call may:
--check runs one check's stages (CHECKS), within its budget.
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

import decide_defaults  # puts the repository on the module path
from multiexit.accel import cuda_defaults

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'
WHEELS = ('.whl', '../shared/device-wheels')  # relative to the repository
# seconds per stage (limit, kept for the stages after it), for the full check and --quick, in
# the order the stages run (2026-11-26, H100: tests 121 s, early exit 16 s, eager modes ~400
# images/s: launch bound; a torch.compile of the paper's MsdNet took 704 s on 2 CPU cores; the
# early-exit sweep of batch sizes is to take at most 90 s)
LIMITS = {False: dict(cuda_tests=(170, 200), throughput=(100, 110), compile=(120, 70),
                      profile=(30, 45), early_exit=(90, 25), kernels=(25, 0), pack=(150, 0),
                      max_autotune=(300, 0), concurrency=(90, 0)),
          True: dict(cuda_tests=(120, 100), throughput=(50, 60), compile=(80, 30),
                     profile=(20, 20), early_exit=(60, 0), kernels=(15, 0), pack=(100, 0),
                     max_autotune=(120, 0), concurrency=(40, 0)),
          # --check all: every stage keeps the sum of the later stages' limits; the CUDA tests
          # have grown since their 121 s (11 tests), the quick throughput modes are 4, the
          # early-exit sweep of two batch sizes took 16 s, and packs of 9 and 15 are new
          'all': dict(cuda_tests=(230, 265), throughput=(80, 185), early_exit=(45, 140),
                      pack=(140, 0))}
OPT_IN = ('concurrency',)  # run only when named by --with
# the stages of each issue's check (--check), each within its budget and one device call
CHECKS = {'speed': ('cuda_tests', 'throughput', 'compile', 'profile', 'kernels', 'max_autotune'),
          'early_exit': ('cuda_tests', 'early_exit'), 'pack': ('cuda_tests', 'pack'),
          'all': ('cuda_tests', 'throughput', 'early_exit', 'pack')}
BUDGET_S = {False: 470, True: 300, 'all': 520}  # 'all': one device call of at most 540 s
# the eager modes, measured before, on few steps; the graphed ones on more
THROUGHPUT = ['--steps', '120', '--eager-steps', '10', '--warmup', '6', '--modes',
              'reference,device_data,device_temperature,channels_last,amp,fused_sgd,cuda_graph,'
              'cuda_graph_fp32,cuda_graph_streams,cuda_graph_fp32_streams,default']
QUICK_THROUGHPUT = ['--steps', '60', '--eager-steps', '5', '--warmup', '5', '--modes',
                    'reference,cuda_graph,cuda_graph_streams,default']
COMPILED = ['--steps', '100', '--warmup', '6', '--no-eval', '--modes']  # + the mode
QUICK_EARLY_EXIT = ['--batch-sizes', '1', '256', '--repeats', '2']
# packs of 9 (the grid's target: 8x the solo run) and 15 (memory) against one run alone
DECISIVE_PACK = ['--ks', '1,9,15', '--micro-ks', '1,9', '--micro-dtypes', 'bf16']


def cuda_test_files():
    """tests/test_cuda.py and every other test file that skips without a GPU or is marked
    ``cuda``."""
    files = sorted((ROOT / 'tests').glob('test_*.py'))
    return ['tests/test_cuda.py'] + [
        f'tests/{f.name}' for f in files if f.name != 'test_cuda.py'
        and any(mark in f.read_text() for mark in ('cuda.is_available()', 'mark.cuda'))]


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
        self.write()
        return status

    def note(self, status=None, note=None, append=''):
        """Amend the last stage's row (and stages.json)."""
        row = self.rows[-1]
        row['status'] = status or row['status']
        row['note'] = (row['note'] if note is None else note) + append
        self.write()

    def write(self):
        """OUT_DIR/stages.json: every stage's row so far, rewritten as each one ends."""
        (self.out / 'stages.json').write_text(json.dumps(dict(
            rows=self.rows, elapsed_s=round(time.time() - self.start, 1)), indent=2) + '\n')


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


def failed_modes(checker, path):
    """The last stage FAILED if the throughput JSON at ``path`` records errors."""
    if path.is_file():
        errors = json.loads(path.read_text()).get('errors')
        if errors:
            checker.note('FAILED', 'errors: ' + ', '.join(errors))


MERGED = ('train_images_per_s', 'warmup_epoch_s', 'first_step_s', 'kernels_per_step', 'errors')


def merge_modes(into, part):
    """The modes measured in the throughput JSON ``part`` added to the one at ``into``
    (``part`` itself if there is none), with the command that measured them."""
    r = json.loads(part.read_text())
    if into.is_file():
        merged = json.loads(into.read_text())
        for key in MERGED:
            merged.setdefault(key, {}).update(r.get(key, {}))
        merged['skipped_modes'] = merged.get('skipped_modes', []) + r.get('skipped_modes', [])
        merged.setdefault('merged_commands', []).append(r['command'])
    else:
        merged = r
    into.write_text(json.dumps(merged, indent=2) + '\n')


def projected_runs(t):
    """{mode: seconds} of the paper's configuration (``t['paper_run']``: 300 epochs of 10,000
    training and 5,000 validation images) at each training mode's speed, with the default
    evaluation, plus the mode's first step (its compilation) once: what decides the default."""
    run, evals = t.get('paper_run'), t.get('eval_images_per_s', {})
    if not run or 'default' not in evals:
        return {}
    val_s = run['epochs'] * run['val_images'] / evals['default']
    return {mode: round(run['epochs'] * run['train_images'] / ips + val_s
                        + t.get('first_step_s', {}).get(mode, 0), 1)
            for mode, ips in t['train_images_per_s'].items()}


def compiled_stage(checker, name, mode, out, throughput, limit, reserve):
    """One compiled throughput mode in a stage of its own (its own time box: a compilation
    cannot starve the other modes); its results are merged into ``throughput``."""
    part = out / f'{name}.json'
    checker.stage(name, [sys.executable, 'benchmarks/train_throughput.py', *COMPILED, mode,
                         '--json', part], limit, reserve)
    failed_modes(checker, part)
    if part.is_file():
        r = json.loads(part.read_text())
        if mode in r.get('first_step_s', {}):
            checker.note(append=f" first step (compilation) {r['first_step_s'][mode]:.0f} s")
        merge_modes(throughput, part)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='folder for the results (created)')
    parser.add_argument('--quick', action='store_true', help='shorter timings (a first look)')
    parser.add_argument('--budget-s', type=float, default=None,
                        help='time for all stages (default 470, --quick 300, --check all 520)')
    parser.add_argument('--wheels', default=None, help='folder of wheels for sacred (default: '
                        f'the first of {", ".join(WHEELS)} that holds some)')
    parser.add_argument('--skip', default='', help='stages to skip, comma-separated')
    parser.add_argument('--check', choices=sorted(CHECKS),
                        help='only the stages of one check: ' + '; '.join(
                            f'{name}: {", ".join(stages)}' for name, stages in CHECKS.items()))
    parser.add_argument('--with', dest='with_', default='',
                        help=f'opt-in stages to run too ({", ".join(OPT_IN)}), comma-separated')
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    every = args.check == 'all'  # the decisive figures, within one device call
    mode = 'all' if every else args.quick
    budget = args.budget_s or BUDGET_S[mode]
    limits = LIMITS[mode]
    quick = args.quick or every
    checker = Checker(out, budget)
    skip = set(filter(None, args.skip.split(',')))
    chosen = set(filter(None, args.with_.split(',')))
    unknown = (skip | chosen) - set(limits)
    if unknown:
        parser.error(f'unknown stages {sorted(unknown)}; known: {", ".join(limits)}')
    if args.check:
        skip |= set(limits) - set(CHECKS[args.check])
    run = lambda name: name in limits and name not in skip and (name not in OPT_IN
                                                                  or name in chosen)
    py = sys.executable

    print('[versions]', flush=True)
    cuda = versions()
    checker._row('versions', 'PASSED' if cuda else 'FAILED', 0, '' if cuda else 'no CUDA device')
    install_sacred(checker, args.wheels)

    counts = None
    if run('cuda_tests'):
        junit, files = out / 'cuda_tests.xml', cuda_test_files()
        _, output = checker.stage('cuda_tests', [py, '-m', 'pytest', '-v', '-rs', '-p',
                                                 'no:cacheprovider', '--durations=15',
                                                 f'--junitxml={junit}', *files],
                                  *limits['cuda_tests'])
        counts = test_counts(junit)
        (out / 'cuda_tests.json').write_text(json.dumps(dict(
            files=files, passed_failed_skipped=counts, row=checker.rows[-1]), indent=2) + '\n')
        if counts:
            checker.note(note='passed {}, failed {}, skipped {}'.format(*counts))

    throughput = out / 'throughput.json'
    if run('throughput'):
        limit, reserve = limits['throughput']
        limit = min(limit, checker.left() - reserve)
        cmd = [py, 'benchmarks/train_throughput.py',
               *(QUICK_THROUGHPUT if quick else THROUGHPUT), '--json', throughput]
        if counts:
            cmd += ['--cuda-tests', ','.join(map(str, counts))]
        checker.stage('throughput', cmd, limit, reserve)
        failed_modes(checker, throughput)
    if run('compile'):
        compiled_stage(checker, 'compile', 'cuda_graph_compile', out, throughput,
                       *limits['compile'])

    if run('profile'):
        checker.stage('profile', [py, 'benchmarks/profile_step.py', '--json',
                                  out / 'profile.json'], *limits['profile'])
    if run('early_exit'):
        early_exit = out / 'early_exit.json'
        checker.stage('early_exit', [py, 'benchmarks/early_exit.py', '--device', 'cuda',
                                     '--calibration', '1024', *(QUICK_EARLY_EXIT if quick else []),
                                     '--out', early_exit], *limits['early_exit'])
        if early_exit.is_file():
            e = json.loads(early_exit.read_text())
            if not all(r['identical'] for r in e['gpu_speedup']):
                checker.note('FAILED', 'early exit decided otherwise than the simulated one')
            elif not e['complete']:
                checker.note(append=f" (batch sizes done: {', '.join(e['full_forward'])})")
    if run('kernels'):
        checker.stage('kernels', [py, 'benchmarks/op_count.py', '--device', 'cuda', '--json',
                                  out / 'kernels.json'], *limits['kernels'])
    if run('pack'):
        pack = out / 'pack.json'
        limit = min(limits['pack'][0], checker.left() - limits['pack'][1])
        checker.stage('pack', [py, 'benchmarks/pack_throughput.py', '--json', pack,
                               *(DECISIVE_PACK if every else []),
                               '--deadline-s', str(max(limit - 40, 0))], *limits['pack'])
        if pack.is_file():
            r = json.loads(pack.read_text())
            shutil.copy(pack, RESULTS / (
                f"{r['date']}-pack-{r['device'].replace(' ', '-').lower()}.json"))
    if run('max_autotune'):
        compiled_stage(checker, 'max_autotune', 'cuda_graph_max_autotune', out, throughput,
                       *limits['max_autotune'])
    if run('concurrency'):
        seconds = '4' if args.quick else '6'
        procs = ['1', '2'] if args.quick else ['1', '2', '4']
        checker.stage('concurrency', [py, 'benchmarks/concurrent_training.py', '--procs', *procs,
                                      '--seconds', seconds, '--json', out / 'concurrency.json'],
                      *limits['concurrency'])
    decisions = None
    if throughput.is_file():
        r = json.loads(throughput.read_text())
        kept = RESULTS / f"{r['date']}-{r['device'].replace(' ', '-').lower()}.json"
        shutil.copy(throughput, kept)
        # the CUDA defaults this measurement decides: committed as cuda_defaults.PATH, they are
        # the defaults (benchmarks/decide_defaults.py)
        decisions = decide_defaults.decide(r, f'benchmarks/results/{kept.name}',
                                           cuda_defaults.load())
        decide_defaults.write(decisions, out / 'decisions.json')

    summary = dict(command=' '.join(['python3'] + sys.argv), rows=checker.rows,
                   total_s=round(time.time() - checker.start, 1), cuda_tests=counts,
                   decisions=decisions)
    for name in ('throughput', 'profile', 'early_exit', 'kernels', 'pack', 'concurrency'):
        f = out / f'{name}.json'
        summary[name] = json.loads(f.read_text()) if f.is_file() else None
    if summary['throughput']:
        summary['projected_paper_run_s_by_mode'] = projected_runs(summary['throughput'])
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
        kernels, first = t.get('kernels_per_step', {}), t.get('first_step_s', {})
        lines.append('')
        lines += [f'train {m:<24} {v:9.0f} img/s' + (f'  x{v / ref:5.2f}' if ref else '')
                  + (f'  {kernels[m]:6.0f} kernels/step' if m in kernels else '')
                  + (f'  first step {first[m]:.0f} s' if first.get(m, 0) > 5 else '')
                  for m, v in t['train_images_per_s'].items()]
        eref = t['eval_images_per_s'].get('reference')
        lines += [f'eval  {m:<24} {v:9.0f} img/s  x{v / eref:.2f}' if eref else
                  f'eval  {m:<24} {v:9.0f} img/s' for m, v in t['eval_images_per_s'].items()]
        for key in ('projected_paper_run_s', 'projected_full_run_s'):
            if t.get(key):
                lines.append(f'{key}: {t[key]:.0f} s ({t[key] / 60:.1f} min)')
        by_mode = sorted(s.get('projected_paper_run_s_by_mode', {}).items(), key=lambda kv: kv[1])
        if by_mode:
            lines.append('paper configuration by mode (compilation included): ' + ', '.join(
                f'{m} {v / 60:.1f} min' for m, v in by_mode[:5]))
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
    k = s.get('kernels')
    if k:
        lines.append('CUDA kernels per step (eager/graph) and CPU ops per step: ' + ', '.join(
            f"{v} {c['eager']['kernels']:.0f}"
            + (f"/{c['graph']['kernels']:.0f}" if 'graph' in c else '')
            + f" ({k['ops_per_step'][v]})" for v, c in k['cuda_kernels_per_step'].items()))
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
    if s.get('decisions'):
        lines.append('CUDA defaults this check decides (decisions.json; copied to '
                     f'{cuda_defaults.SHOWN} and committed, they are the defaults):')
        lines += [f"  {name:<16} {d['verdict']:<3} {d['why']}"
                  for name, d in s['decisions'].items()]
    lines.append(f"total {s['total_s']:.0f} s")
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
