"""Bar chart of a throughput result: training and evaluation images/s per mode.

    python3 benchmarks/plot_speed.py benchmarks/results/2026-11-26-nvidia-h100-80gb-hbm3.json \
        docs/speed.png
"""
import argparse
import json

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('result', help='a JSON written by benchmarks/train_throughput.py')
    parser.add_argument('png')
    args = parser.parse_args()
    r = json.load(open(args.result))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw=dict(width_ratios=[3, 2]))
    for ax, key, title in ((axes[0], 'train_images_per_s', 'training, batch 64'),
                           (axes[1], 'eval_images_per_s', 'evaluation, batch 250')):
        modes = list(r[key])
        values = [r[key][m] for m in modes]
        bars = ax.barh(modes[::-1], values[::-1], color=['#c44e52' if m == 'reference' else
                                                         '#4c72b0' for m in modes[::-1]])
        ref = r[key].get('reference')
        for bar, v in zip(bars, values[::-1]):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f' {v:,.0f}' + (f' ({v / ref:.1f}x)' if ref else ''), va='center', fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('images/s')
        ax.set_xlim(0, max(values) * 1.35)
    fig.suptitle(f"Paper MsdNet + DBT on {r['device']} (torch {r['torch']}, {r['date']})",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f'wrote {args.png}')


if __name__ == '__main__':
    main()
