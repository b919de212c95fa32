"""PNG curves from a metrics.jsonl: loss, accuracy, code perplexity, learning rate, grad norm, throughput.

    python tools/plot_metrics.py RUN/metrics.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

PANELS = [("loss", "loss"), ("accuracy", "contrastive accuracy"), ("code_perplexity", "code perplexity"),
          ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("audio_seconds_per_second", "audio-s / s")]


def read_metrics(path: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{split: {metric: [(step, value), ...]}}; non-numeric values (NaN written as text, alarms) are skipped."""
    series: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not JSON ({e}); is this a metrics.jsonl?") from None
        for key, value in row.items():
            if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool):
                series[row["split"]][key].append((row["step"], float(value)))
    return series


def plot(path: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    series = read_metrics(path)
    if not series:
        raise ValueError(f"{path} holds no metrics")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in PANELS:
        splits = {split: rows[key] for split, rows in series.items() if rows.get(key)}
        if not splits:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for split, points in sorted(splits.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, label=split, marker="o" if split != "train" else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        target = out / f"{key}.png"
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.metrics.exists():
        parser.error(f"{args.metrics} does not exist")
    for path in plot(args.metrics, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
