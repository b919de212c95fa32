"""`make demo` and `make demo-all`: the whole job on this machine's CPUs, from nothing to a summary.

    python tools/demo.py --out demo [--steps N] [--scale S]          (make demo)
    python tools/demo.py --out demo --all [--steps N] [--scale S]    (make demo-all)

1. a demo corpus from Debian's speech engines and recordings (tools/make_demo_corpus.py)
2. 16 kHz int16 shards + manifests + rejects (tools/preprocess_audio.py)
3. pre-training of the demo model (configs/demo.yaml) on 2 processes (TP=1, DP=2) with noise augmentation
   (megatron_speech.pretrain)
4. phoneme CTC fine-tuning (configs/finetune/phoneme.yaml) from that checkpoint and, with the same config and
   budget, from an untrained encoder of the same shape (megatron_speech.finetune); test PER of both
   (megatron_speech.evaluate)
5. export of the pre-trained one to Hugging Face (tools/convert_to_hf.py --model-class ctc), loaded back with
   transformers
6. plots (tools/plot_metrics.py) and a summary

--all replaces 4-5 with every task (phoneme, asr, speaker, emotion on the arousal proxy), each fine-tuned twice
with the same config and budget: from the pre-trained encoder and from an untrained one (pretrained=none). It
writes <out>/demo_all.json and prints a markdown table with the trivial baselines and the machine it ran on.
Each stage is skipped when its output is already complete, so a rerun continues.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# task -> (demo corpus set, fine-tuning config, the metrics reported)
TASKS = {
    "phoneme": ("phonemes", "configs/finetune/phoneme.yaml", ("per",)),
    "asr": ("phonemes", "configs/finetune/asr.yaml", ("wer", "cer")),
    "speaker": ("speaker", "configs/finetune/speaker.yaml", ("accuracy",)),
    "emotion": ("arousal_proxy", "configs/finetune/emotion.yaml", ("accuracy", "unweighted_accuracy")),
}
LABEL_KEYS = {"speaker": "speaker", "emotion": "arousal_proxy"}
PRETRAIN_CONFIG = "configs/demo.yaml"  # also the untrained encoder's shape (finetune.scratch_config)


def run(title: str, cmd: list[str], **env: str) -> float:
    """Run one stage; exit with its name if it fails. Returns its wall time in seconds."""
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    if result.returncode != 0:
        sys.exit(f"demo: '{title}' failed with exit code {result.returncode}")
    seconds = time.perf_counter() - start
    print(f"--- {title}: {seconds:.0f} s", flush=True)
    return seconds


def rows(metrics: Path, split: str) -> list[dict]:
    out = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in out if r["split"] == split]


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]


def demo_config() -> dict:
    return yaml.safe_load((ROOT / PRETRAIN_CONFIG).read_text())


def prepare_pretraining(out: Path, steps: int | None, scale: float) -> Path:
    """Stages 1-3 and the plots; returns the pre-training save_dir."""
    py = sys.executable
    corpus, shards, pretrain = out / "corpus", out / "shards" / "pretrain", out / "pretrain"
    if not (corpus / "README.md").exists():
        run("demo corpus", [py, "tools/make_demo_corpus.py", "--out", str(corpus), "--scale", str(scale)])
    if not Path(f"{shards}_train.manifest.jsonl").exists():
        shards.parent.mkdir(parents=True, exist_ok=True)
        run("preprocess", [py, "tools/preprocess_audio.py", "--input", str(corpus / "pretrain" / "manifest.jsonl"),
                           "--output-prefix", str(shards), "--workers", "2", "--valid-fraction", "0.05"])
    length = []  # default: the config's
    if steps:  # the schedule scaled to the run: decay to 0 at its end, warm-up at most a fifth of it
        warmup = min(demo_config()["optim"]["warmup_steps"], steps // 5)
        length = [f"train.max_steps={steps}", f"optim.decay_steps={steps}", f"optim.warmup_steps={warmup}"]
    run("pre-train (configs/demo.yaml, 2 processes)",
        [*torchrun(2), "-m", "megatron_speech.pretrain", "--config", PRETRAIN_CONFIG, f"data.prefix={shards}",
         f"data.noise_dir={corpus / 'musan'}", f"train.save_dir={pretrain}", *length])
    run("plots", [py, "tools/plot_metrics.py", str(pretrain / "metrics.jsonl"), "--out", str(pretrain / "plots")])
    return pretrain


def preprocess_labeled(out: Path, corpus_set: str) -> Path:
    """Train and valid shards of one labeled set (the test manifest is evaluated from the audio files)."""
    prefix = out / "shards" / corpus_set
    for split, split_prefix in (("train", prefix), ("valid", Path(f"{prefix}_valid"))):
        if not Path(f"{split_prefix}_train.manifest.jsonl").exists():
            run(f"preprocess {corpus_set}/{split}",
                [sys.executable, "tools/preprocess_audio.py", "--input", str(out / "corpus" / corpus_set /
                                                                             f"{split}.jsonl"),
                 "--output-prefix", str(split_prefix), "--valid-fraction", "0", "--workers", "2"])
    return prefix


def finetune_and_evaluate(out: Path, task: str, pretrained: Path | None, run_dir: Path,
                          extra: tuple[str, ...] = ()) -> dict:
    """Fine-tune `task` (from `pretrained`, or an untrained encoder when None) and score the test set."""
    corpus_set, config, _ = TASKS[task]
    prefix = preprocess_labeled(out, corpus_set)
    result_file = run_dir / "test_metrics.json"
    if not result_file.exists():
        what = "pre-trained" if pretrained else "untrained"
        seconds = run(f"fine-tune: {task}, {what} encoder (2 processes)",
                      [*torchrun(2), "-m", "megatron_speech.finetune", "--config", config,
                       f"pretrained={pretrained or 'none'}", f"finetune.scratch_config={PRETRAIN_CONFIG}",
                       f"data.prefix={prefix}",
                       f"data.valid_prefix={prefix}_valid", f"train.save_dir={run_dir}", *extra])
        run(f"evaluate {task} ({what}) on the held-out test set",
            [sys.executable, "-m", "megatron_speech.evaluate", "--checkpoint", str(run_dir), "--manifest",
             str(out / "corpus" / corpus_set / "test.jsonl"), "--metrics-json", str(result_file)])
        result = json.loads(result_file.read_text())
        result["finetune_seconds"] = seconds
        result_file.write_text(json.dumps(result, indent=1))
    return json.loads(result_file.read_text())


def trivial_baselines(corpus: Path) -> dict[str, dict[str, float]]:
    """What a model that learned nothing scores: all-blank CTC output (every reference unit deleted: PER, WER and
    CER 1.0), and the training set's most frequent class for the classification tasks."""
    out = {"phoneme": {"per": 1.0}, "asr": {"wer": 1.0, "cer": 1.0}}
    for task, key in LABEL_KEYS.items():
        corpus_set = TASKS[task][0]
        train = [json.loads(x)[key] for x in (corpus / corpus_set / "train.jsonl").read_text().splitlines() if x]
        test = [json.loads(x)[key] for x in (corpus / corpus_set / "test.jsonl").read_text().splitlines() if x]
        majority = Counter(train).most_common(1)[0][0]
        classes = sorted(set(test))
        out[task] = {"accuracy": sum(t == majority for t in test) / len(test),
                     "unweighted_accuracy": 1.0 / len(classes)}  # recall 1 on one class, 0 on the rest
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    return (f"{os.cpu_count()} vCPUs ({cpu}), Python {platform.python_version()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def pretraining_summary(pretrain: Path) -> dict:
    """The pre-training curve in a few numbers: where the valid accuracy left chance, and where it ended."""
    negatives = demo_config()["model"]["num_negatives"]
    train, valid = rows(pretrain / "metrics.jsonl", "train"), rows(pretrain / "metrics.jsonl", "valid")
    chance = 1 / (negatives + 1)
    # the plateau: loss ln(K + 1), accuracy 1 / (K + 1); "left" = the first evaluation at twice chance
    left = next((r["step"] for r in valid if r["accuracy"] >= 2 * chance), None)
    return {"steps": train[-1]["step"], "chance_accuracy": chance, "plateau_loss": math.log(negatives + 1),
            "left_plateau_at_step": left, "valid": [(r["step"], r["loss"], r["accuracy"]) for r in valid],
            "first_train": train[0], "last_train": train[-1]}


def encoders(out: Path, task: str, pretrain: Path) -> dict[str, dict]:
    """`task` fine-tuned from the pre-trained and from an untrained encoder, same config and budget."""
    return {encoder: finetune_and_evaluate(out, task, pretrain if encoder == "pretrained" else None,
                                           out / "finetune" / task / encoder)
            for encoder in ("pretrained", "untrained")}


def demo_all(out: Path, pretrain: Path, started: float) -> int:
    results = {f"{task}/{encoder}": result for task in TASKS
               for encoder, result in encoders(out, task, pretrain).items()}
    baselines = trivial_baselines(out / "corpus")
    curve = pretraining_summary(pretrain)
    summary = {"machine": machine(), "pretrain_config": PRETRAIN_CONFIG, "pretrain_steps": curve["steps"],
               "pretrain_left_plateau_at_step": curve["left_plateau_at_step"],
               "pretrain_valid_accuracy": curve["valid"][-1][2] if curve["valid"] else None,
               "results": results, "baselines": baselines, "wall_seconds": time.perf_counter() - started}
    (out / "demo_all.json").write_text(json.dumps(summary, indent=1))

    print("\n=== demo-all: test-set metrics, each task fine-tuned with the same config and budget")
    print(f"machine: {summary['machine']}; pre-training: {PRETRAIN_CONFIG}, {curve['steps']} steps; "
          f"this run (stages it did not skip): {summary['wall_seconds'] / 60:.1f} min\n")
    print("| task (test set) | metric | pre-trained encoder | untrained encoder | trivial baseline | fine-tune time |")
    print("|---|---|---|---|---|---|")
    for task, (corpus_set, _, keys) in TASKS.items():
        pre, scratch = results[f"{task}/pretrained"], results[f"{task}/untrained"]
        for key in keys:
            lower = key in ("per", "wer", "cer")
            name = f"{key.upper()} (lower is better)" if lower else f"{key} (higher is better)"
            print(f"| {task} ({corpus_set}, {int(pre['num_utterances'])} utt.) | {name} | {pre[key]:.3f} | "
                  f"{scratch[key]:.3f} | {baselines[task][key]:.3f} | "
                  f"{pre['finetune_seconds']:.0f} s / {scratch['finetune_seconds']:.0f} s |")
    print(f"\nwritten to {out / 'demo_all.json'}")
    return 0


def demo(out: Path, pretrain: Path, started: float) -> int:
    py = sys.executable
    phoneme = encoders(out, "phoneme", pretrain)
    finetune, hf_dir = out / "finetune" / "phoneme" / "pretrained", out / "hf" / "phoneme"
    run("export to transformers", [py, "tools/convert_to_hf.py", "--checkpoint", str(finetune), "--output",
                                   str(hf_dir), "--model-class", "ctc"])
    run("load the export with transformers",
        [py, "-c", "import sys, transformers; m = transformers.Wav2Vec2ForCTC.from_pretrained(sys.argv[1]); "
                   "print(type(m).__name__, sum(p.numel() for p in m.parameters()), 'parameters')", str(hf_dir)])

    curve = pretraining_summary(pretrain)
    first, last = curve["first_train"], curve["last_train"]
    print(f"\n=== summary (pre-training: {PRETRAIN_CONFIG}, {curve['steps']} steps)")
    print(f"{'':28s} {'first':>10s} {'last':>10s}")
    for key in ("loss", "accuracy", "code_perplexity", "audio_seconds_per_second"):
        print(f"train {key:22s} {first[key]:10.3f} {last[key]:10.3f}")
    print(f"the plateau: loss ln(K + 1) = {curve['plateau_loss']:.3f}, accuracy 1 / (K + 1) = "
          f"{curve['chance_accuracy']:.3f}")
    print("valid (step, loss, accuracy): " + ", ".join(f"{s} {lo:.2f} {a:.2f}" for s, lo, a in curve["valid"]))
    left = curve["left_plateau_at_step"]
    print(f"valid accuracy first at twice chance at step {left}" if left else
          "valid accuracy never reached twice chance: still on the plateau (more steps: --steps)")
    pre, scratch = phoneme["pretrained"], phoneme["untrained"]
    print(f"phoneme CTC fine-tuning (configs/finetune/phoneme.yaml), test set ({int(pre['num_utterances'])} "
          f"utterances, held-out voices): PER {pre['per']:.3f} from the pre-trained encoder, {scratch['per']:.3f} "
          f"from an untrained one (all-blank output: 1.000)")
    print(f"outputs: {pretrain} (pre-training), {out / 'finetune' / 'phoneme'} (fine-tuning), {hf_dir} "
          f"(transformers directory), plots in {pretrain / 'plots'}")
    print(f"this run (stages it did not skip): {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--steps", type=int, default=None,
                        help=f"pre-training steps (default: train.max_steps of {PRETRAIN_CONFIG})")
    parser.add_argument("--scale", type=float, default=1.0, help="demo corpus scale (default 1: ~2.6 h)")
    parser.add_argument("--all", action="store_true", help="all four tasks, pre-trained vs untrained encoder")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = args.out.resolve()
    pretrain = prepare_pretraining(out, args.steps, args.scale)
    return demo_all(out, pretrain, started) if args.all else demo(out, pretrain, started)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
