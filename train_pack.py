"""Train several runs of a training script at once, as one fused network on one device: a pack.

    python3 train_pack.py --member seed=0 --member seed=1 --member seed=2 -- smoke
    python3 train_pack.py --member cf_loss.call=ClassificationOnlyLoss \\
                          --member cf_loss.call=DistillationBasedLoss
    python3 train_pack.py --script train_imagenet.py --member seed=0 --member seed=1 -- smoke
    python3 train_pack.py --member snapshots/3/config.json parent_snapshot=snapshots/3 \\
                          --member snapshots/4/config.json parent_snapshot=snapshots/4  # resume

Each ``--member`` takes what ``python3 train_cifar.py with ...`` takes (named configs, config
files, key=value); what follows ``--`` goes to every member. The members share the network,
optimizer, schedule, batch sizes, epochs and device switches, and may differ in everything else:
seed, data subset, loss (method, C, T, global_scale). Each is a run of its own in snapshots/
(config.json, run.json, cout.txt, metrics.json, last.pt, its best ep<N>.pt), which eval.py,
``python3 -m multiexit.runs``, the grid and a solo resume read like any other, and trains as it
would alone (docs/speed.md: packs). Its output lines start with ``[run <id>: <snapshot_name>]``.
A member whose loss turns non-finite fails as it would alone and the others go on; Ctrl-C
stops them all, each with how to resume it alone, and one more line with how to resume the pack.
"""
import argparse
import importlib
import sys
from pathlib import Path

import training_experiment


def parse_args(argv):
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(prog='python3 train_pack.py', description=__doc__.split(
        '\n')[0])
    parser.add_argument('--script', default='train_cifar.py',
                        choices=('train_cifar.py', 'train_imagenet.py'),
                        help='the training script whose runs the members are (default: '
                             'train_cifar.py)')
    parser.add_argument('--member', nargs='+', action='append', required=True,
                        metavar='UPDATE', help='one run: what follows "with" on its command line')
    args = parser.parse_args(argv)
    return args.script, [member + extra for member in args.member]


def main(argv=None):
    script, members = parse_args(list(sys.argv[1:] if argv is None else argv))
    ex = importlib.import_module(Path(script).stem).ex
    return training_experiment.run_pack(ex, members, script)


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the runs started or after they ended
        sys.exit(training_experiment.EXIT_CODE_INTERRUPTED)
