"""`make demo`: the whole job on this machine's CPUs, from nothing to a summary.

    python tools/demo.py --out demo [--steps N] [--scale S]

1. a demo corpus from Debian's speech engines and recordings (tools/make_demo_corpus.py)
2. 16 kHz int16 shards + manifests + rejects (tools/preprocess_audio.py)
3. pre-training of the tiny model on 2 processes (TP=1, DP=2) with noise augmentation (megatron_speech.pretrain)
4. phoneme CTC fine-tuning from that checkpoint (megatron_speech.finetune), test PER (megatron_speech.evaluate)
5. export to Hugging Face (tools/convert_to_hf.py --model-class ctc), loaded back with transformers
6. plots (tools/plot_metrics.py) and a summary table
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

    phon, finetune, hf_dir = out / "shards" / "phonemes", out / "finetune" / "phoneme", out / "hf" / "phoneme"
    for split, prefix in (("train", phon), ("valid", Path(f"{phon}_valid"))):
        if not Path(f"{prefix}_train.manifest.jsonl").exists():
            run(f"preprocess phonemes/{split}", [py, "tools/preprocess_audio.py", "--input",
                                                 str(corpus / "phonemes" / f"{split}.jsonl"), "--output-prefix",
                                                 str(prefix), "--valid-fraction", "0", "--workers", "2"])
    run("fine-tune: phoneme CTC (2 processes)",
        [py, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_speech.finetune",
         "--config", "configs/finetune/phoneme.yaml", f"pretrained={pretrain}", f"data.prefix={phon}",
         f"data.valid_prefix={phon}_valid", f"train.save_dir={finetune}", f"train.max_steps={args.steps}"])
    run("evaluate on the held-out test voices",
        [py, "-m", "megatron_speech.evaluate", "--checkpoint", str(finetune), "--manifest",
         str(corpus / "phonemes" / "test.jsonl"), "--metrics-json", str(finetune / "test_metrics.json")])
    run("export to transformers", [py, "tools/convert_to_hf.py", "--checkpoint", str(finetune), "--output",
                                   str(hf_dir), "--model-class", "ctc"])
    run("load the export with transformers",
        [py, "-c", "import sys, transformers; m = transformers.Wav2Vec2ForCTC.from_pretrained(sys.argv[1]); "
                   "print(type(m).__name__, sum(p.numel() for p in m.parameters()), 'parameters')", str(hf_dir)])

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
    test = json.loads((finetune / "test_metrics.json").read_text())
    print(f"phoneme fine-tuning, test set (held-out voices): {json.dumps(test)}")
    print("(at demo scale the encoder has seen ~1 h of audio for a few hundred steps: expect PER near 1.0; "
          "see README 'Status')")
    print(f"outputs: {pretrain} (pre-training), {finetune} (fine-tuning), {hf_dir} (transformers directory), "
          f"plots in {pretrain / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
