"""The CUDA defaults decided by a GPU's measurement: which speed switch is on by default, with the
figures that decided it, from a throughput JSON of benchmarks/train_throughput.py as
benchmarks/gpu_check.py writes it (with the CUDA tests' counts).

    python3 benchmarks/decide_defaults.py benchmarks/results/<date>-<device>.json
        # rewrites multiexit/accel/cuda_defaults.json; --out FILE: elsewhere

The rule, switch by switch (``pairs``: the throughput modes with and without the switch):
  - measured with and without it (both modes, without error) and the CUDA tests passed (none
    failed): on if a run of the paper's configuration (300 epochs of 10,000 images, its first
    step, the compilation, included) is at least MARGIN faster with it, off otherwise;
  - else on if the measured default path had it on (``run_defaults``) and the CUDA tests passed:
    a measured default stays until its own pair is measured;
  - else the committed decision stands (this measurement says nothing about it), or off where
    there is none: a switch is opt-in until a measurement shows it correct and faster.
Committing the rewritten file is what changes a default (multiexit/accel/cuda_defaults.py reads
it; print_config's comments say which measurement decided each)."""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multiexit.accel import cuda_defaults  # noqa: E402

MARGIN = 0.02  # faster: by 2 % or more; less is within a timing's noise
PAPER_RUN = dict(epochs=300, train_images=10_000)  # what 'faster' is measured on
ABOUT = ('The default of each CUDA speed switch and the measurement that decided it, written by '
         'benchmarks/decide_defaults.py (run by benchmarks/gpu_check.py); read by '
         'multiexit/accel/cuda_defaults.py. A switch is on by default only where a decision '
         "here says 'on' and names the measurement; commit a check's file to change a default.")


def pairs(amp):
    """{switch: [(its value when on, the mode with it, the same mode without it)]}, the modes of
    benchmarks/train_throughput.py; streams and compile at the precision ``amp`` decided."""
    fp32 = '' if amp else '_fp32'
    return {
        'cuda_graph': [(True, 'cuda_graph', 'fused_sgd')],
        'amp': [(True, 'cuda_graph', 'cuda_graph_fp32')],
        'channels_last': [],  # no graphed NCHW mode; the eager pair is bound by kernel launches
        'cuda_streams': [(True, f'cuda_graph{fp32}_streams', f'cuda_graph{fp32}')],
        'compile': [('default', f'cuda_graph_compile{fp32}', f'cuda_graph{fp32}')] + (
            [('max-autotune', 'cuda_graph_max_autotune', 'cuda_graph')] if amp else []),
        'cudnn_benchmark': [(True, 'cudnn_benchmark', 'default')],
    }


def run_s(t, mode):
    """Seconds of the paper configuration's training at ``mode``'s measured speed, its first
    step (compilation, capture) once."""
    run = t.get('paper_run') or PAPER_RUN
    return (run['epochs'] * run['train_images'] / t['train_images_per_s'][mode]
            + t.get('first_step_s', {}).get(mode, 0))


def decide(t, measured_by, current=None):
    """{switch: decision} from the throughput JSON ``t`` (its file: ``measured_by``, relative to
    the repository), the committed decisions ``current`` standing where ``t`` says nothing."""
    current = current or {}
    tests = t.get('cuda_tests') or {}
    tests_ok = tests.get('failed') == 0 and tests.get('passed', 0) > 0
    measured = {m for m in t.get('train_images_per_s', {}) if m not in t.get('errors', {})}
    defaults = t.get('run_defaults', {})
    source = dict(measured_by=measured_by, device=t.get('device'), date=t.get('date'),
                  cuda_tests=tests)
    out = {}
    for name in ('cuda_graph', 'amp', 'channels_last', 'cuda_streams', 'compile',
                 'cudnn_benchmark'):  # amp before the switches compared at its precision
        amp = cuda_defaults.default(out, 'amp')
        done = [(value, on, off) for value, on, off in pairs(amp)[name]
                if {on, off} <= measured] if tests_ok else []
        if done:
            value, on, off = min(done, key=lambda p: run_s(t, p[1]))
            ratio = run_s(t, off) / run_s(t, on)
            faster = ratio >= 1 + MARGIN
            out[name] = dict(
                verdict='on' if faster else 'off', **({'value': value} if value is not True
                                                      and faster else {}), **source,
                basis='pair', figures={m: round(t['train_images_per_s'][m], 1) for m in (on, off)},
                why=f'{on} against {off}: a paper run x{ratio:.2f} as fast with it '
                    f"({'at least' if faster else 'below'} x{1 + MARGIN:.2f})")
        elif tests_ok and defaults.get(name) and 'default' in measured:
            out[name] = dict(
                verdict='on', **({'value': defaults[name]} if defaults[name] is not True else {}),
                **source, basis='default path',
                figures={'default': round(t['train_images_per_s']['default'], 1)},
                why='on in the measured default path, whose CUDA tests passed; not measured '
                    'against the same path without it')
        elif name in current:
            out[name] = current[name]
        else:
            out[name] = dict(verdict='off', why='not measured on a GPU yet')
    return out


def write(decisions, path):
    Path(path).write_text(json.dumps(dict(about=ABOUT, switches=decisions), indent=2) + '\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('throughput', help="a throughput JSON with the CUDA tests' counts")
    parser.add_argument('--out', default=cuda_defaults.PATH,
                        help='the decisions to rewrite (default: the committed ones)')
    args = parser.parse_args()
    path = Path(args.throughput).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    current = cuda_defaults.load(args.out) if Path(args.out).is_file() else {}
    decisions = decide(json.loads(path.read_text()), str(shown), current)
    write(decisions, args.out)
    for name, d in decisions.items():
        print(f"{name:<16} {d['verdict']:<4} {d.get('value', '')!s:<12} {d['why']}")
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
