"""`make demo`: the whole job on this machine's CPUs, from nothing to a summary.

    python tools/demo.py --out demo [--steps N] [--scale S]

1. a demo corpus from Debian's speech engines and recordings (tools/make_demo_corpus.py)
2. 16 kHz int16 shards + manifests + rejects (tools/preprocess_audio.py)
3. pre-training of the tiny model on 2 processes (TP=1, DP=2) with noise augmentation (megatron_speech.pretrain)
4. plots (tools/plot_metrics.py) and a summary table
Each stage is skipped when its output is already complete, so a rerun continues.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(title: str, cmd: list[str], **env: str) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    if result.returncode != 0:
        sys.exit(f"demo: '{title}' failed with exit code {result.returncode}")
    print(f"--- {title}: {time.perf_counter() - start:.0f} s", flush=True)


def rows(metrics: Path, split: str) -> list[dict]:
    out = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in out if r["split"] == split]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--steps", type=int, default=400, help="pre-training steps (default 400)")
    parser.add_argument("--scale", type=float, default=1.0, help="demo corpus scale (default 1: ~2.6 h)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    py = sys.executable
    corpus, shards, pretrain = out / "corpus", out / "shards" / "pretrain", out / "pretrain"

    if not (corpus / "README.md").exists():
        run("demo corpus", [py, "tools/make_demo_corpus.py", "--out", str(corpus), "--scale", str(args.scale)])
    if not Path(f"{shards}_train.manifest.jsonl").exists():
        shards.parent.mkdir(parents=True, exist_ok=True)
        run("preprocess", [py, "tools/preprocess_audio.py", "--input", str(corpus / "pretrain" / "manifest.jsonl"),
                           "--output-prefix", str(shards), "--workers", "2", "--valid-fraction", "0.05"])
    run("pre-train (tiny, 2 processes)",
        [py, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_speech.pretrain",
         "--config", "configs/tiny.yaml", f"data.prefix={shards}", f"data.noise_dir={corpus / 'musan'}",
         f"train.save_dir={pretrain}", f"train.max_steps={args.steps}", "train.save_interval=100",
         "train.eval_interval=50", "train.log_interval=10", f"optim.decay_steps={max(args.steps, 50)}",
         "optim.warmup_steps=20"])
    run("plots", [py, "tools/plot_metrics.py", str(pretrain / "metrics.jsonl"), "--out", str(pretrain / "plots")])

    train, valid = rows(pretrain / "metrics.jsonl", "train"), rows(pretrain / "metrics.jsonl", "valid")
    first, last = train[0], train[-1]
    print("\n=== summary")
    print(f"{'':28s} {'first':>10s} {'last':>10s}")
    for key in ("loss", "accuracy", "code_perplexity", "audio_seconds_per_second"):
        print(f"train {key:22s} {first[key]:10.3f} {last[key]:10.3f}")
    if valid:
        print(f"valid {'loss':22s} {valid[0]['loss']:10.3f} {valid[-1]['loss']:10.3f}")
        print(f"valid {'accuracy':22s} {valid[0]['accuracy']:10.3f} {valid[-1]['accuracy']:10.3f}")
    print(f"chance accuracy (1 / (K + 1) distractors): {1 / 11:.3f}")
    print(f"outputs: {pretrain} (checkpoints, metrics.jsonl), plots in {pretrain / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
