"""Every task end to end through the command lines, on the synthetic corpus of tests/fixtures.py, from an untrained
tiny encoder (slow, still run in CI): each beats its trivial baseline (PER / CER below the all-blank output's 1.0,
accuracy above the most frequent label's). The phoneme run goes through torchrun at DP=2 with the encoder frozen
for its first steps (the optimizer rebuild under the distributed optimizer and overlapped grad reduce), then
`evaluate` on raw audio files and the Wav2Vec2ForCTC export, decoded by transformers, both of its best checkpoint
(train.keep_best, SAVE_DIR/best). A resumed run across the freeze boundary, on fairseq's tri_stage schedule and with
LayerDrop on, repeats the uninterrupted one exactly."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import ROOT, synthetic_corpus, synthetic_test_files

pytestmark = pytest.mark.slow

# From scratch the tiny preset's 0.02 init leaves the content of the 32-channel features small next to the
# positional conv's output, and CTC sits on its blank plateau for hundreds of steps; 0.1 leaves it in ~100.
COMMON = ["pretrained=none", "model.init_std=0.1", "model.dropout=0", "data.max_sample_seconds=4",
          "optim.warmup_steps=10", "train.save_interval=0", "mask_prob=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return synthetic_corpus(root), synthetic_test_files(root)


def finetune(task: str, save_dir: Path, *overrides: str, nproc: int = 1) -> str:
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "megatron_speech.finetune", "--config", f"configs/finetune/{task}.yaml",
           f"train.save_dir={save_dir}", *COMMON, *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout + r.stderr


def metrics(save_dir: Path, split: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r["split"] == split}


def tool(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout


def test_phoneme_dp2_then_evaluate_and_export(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from megatron_speech.checkpoint.model_io import checkpoint_config
    from megatron_speech.embed import load_waveform

    prefix, test_manifest = corpus
    run = tmp_path / "phoneme"
    log = finetune("phoneme", run, f"data.prefix={prefix}", "data.max_tokens=64000", "train.max_steps=200",
                   "optim.decay_steps=200", "freeze_encoder_steps=20", "train.eval_interval=100",
                   "train.log_interval=10", "train.keep_best=true", "train.save_interval=50", nproc=2)
    assert "world 2 = TP 1 x DP 2" in log and "encoder unfrozen" in log
    train = metrics(run, "train")
    assert [train[s]["encoder_frozen"] for s in (10, 20, 30)] == [1, 1, 0]
    assert all(r["task"] == "phoneme" and r["label_key"] == "phonemes" for r in train.values())
    valid = metrics(run, "valid")
    assert valid[200]["per"] < 0.9  # all-blank output: PER 1.0
    # the best PER's checkpoint (the first on a tie), kept out of keep_last=1 rotation, named by SAVE_DIR/best
    best = min(sorted(valid), key=lambda s: valid[s]["per"])
    assert (run / "best").read_text().strip() == str(best) and (run / "latest").read_text().strip() == "200"
    assert sorted(p.name for p in run.glob("iter_*")) == sorted({f"iter_{best:07d}", "iter_0000200"})
    assert f"best valid per: {valid[best]['per']:.4f} at step {best}" in log

    out = tool("-m", "megatron_speech.evaluate", "--checkpoint", str(run / "best"), "--manifest", str(test_manifest),
               "--output", str(tmp_path / "hyp.jsonl"))
    result = json.loads(out.strip().splitlines()[-1])
    assert result["num_utterances"] == 12 and result["num_rejected_files"] == 0
    assert result["per"] < 0.9, result

    tool("tools/convert_to_hf.py", "--checkpoint", str(run / "best"), "--output", str(tmp_path / "hf"),
         "--model-class", "ctc")
    hf = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.Wav2Vec2Processor.from_pretrained(tmp_path / "hf")
    cfg = checkpoint_config(run)
    hyps = {r["id"]: r["hypothesis"] for r in map(json.loads, (tmp_path / "hyp.jsonl").read_text().splitlines())}
    for uid in ("x000", "x005"):
        wave = load_waveform(str(test_manifest.parent / "test_audio" / f"{uid}.wav"), cfg.data.normalize,
                             cfg.data.normalize_eps)
        with torch.no_grad():
            ids = hf(wave).logits.argmax(-1)[0]
        assert processor.decode(ids) == hyps[uid]


def test_asr_beats_all_blank(corpus, tmp_path):
    prefix, _ = corpus
    finetune("asr", tmp_path / "asr", f"data.prefix={prefix}", "data.max_tokens=128000", "train.max_steps=250",
             "optim.decay_steps=250", "freeze_encoder_steps=0", "train.eval_interval=250")
    valid = metrics(tmp_path / "asr", "valid")[250]
    assert valid["cer"] < 0.9 and "wer" in valid  # all-blank output: CER 1.0


def _majority_accuracy(prefix: str, key: str) -> float:
    rows = [json.loads(line) for line in Path(f"{prefix}_valid.manifest.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["samples"] >= 8000]  # data.min_sample_seconds=0.5
    return collections.Counter(r[key] for r in rows).most_common(1)[0][1] / len(rows)


@pytest.mark.parametrize("task,key", [("speaker", "speaker"), ("emotion", "arousal_proxy")])
def test_classification_beats_the_majority_label(corpus, tmp_path, task, key):
    prefix, _ = corpus
    finetune(task, tmp_path / task, f"data.prefix={prefix}", "data.max_tokens=128000", "train.max_steps=120",
             "optim.decay_steps=120", "freeze_encoder_steps=20", "train.eval_interval=120")
    valid = metrics(tmp_path / task, "valid")[120]
    assert valid["label_key"] == key  # the emotion head on the arousal proxy is logged as such
    num_classes = {"speaker": 4, "emotion": 3}[task]
    assert valid["accuracy"] > _majority_accuracy(prefix, key) + 0.1, valid  # the most frequent label's
    assert valid["unweighted_accuracy"] > 1 / num_classes + 0.15, valid  # chance, per class


def test_resume_across_the_freeze_boundary_is_exact(corpus, tmp_path):
    import shutil

    from tests.unit.test_lr_schedule import fairseq_tri_stage

    prefix, _ = corpus
    # tri_stage [0.25, 0.25, 0.5] of 16 steps: warmup 4, hold to 8 (the unfreeze rebuilds the scheduler), decay.
    # LayerDrop on (its skips come from the step's counter key: nothing saved, the same after the resume), through
    # the frozen phase and the overlapped reduce after the unfreeze.
    common = [f"data.prefix={prefix}", "data.max_tokens=64000", "optim.lr_schedule=tri_stage", "optim.lr=2e-3",
              "optim.phase_ratio=[0.25, 0.25, 0.5]", "freeze_encoder_steps=8",
              "train.eval_interval=0", "train.log_interval=1", "model.dropout=0.1", "mask_prob=0.2",
              "model.layerdrop=0.3", "train.max_steps=16", "train.keep_last=2"]
    finetune("speaker", tmp_path / "straight", "train.save_interval=8", *common)
    # Its step-8 checkpoint (head-only optimizer: the last frozen update) is what a run stopped there leaves.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "iter_0000008", resumed / "iter_0000008")
    (resumed / "latest").write_text("8\n")
    log = finetune("speaker", resumed, *common)
    assert "resumed from" in log and "encoder unfrozen" in log
    straight, after = metrics(tmp_path / "straight", "train"), metrics(resumed, "train")
    assert sorted(after) == list(range(9, 17))
    assert [after[s]["loss"] for s in range(9, 17)] == [straight[s]["loss"] for s in range(9, 17)]
    # the lr after each update is fairseq's, through the unfreeze's rebuild and the resume
    expected = fairseq_tri_stage(2e-3, 16, (0.25, 0.25, 0.5), 0.01, 0.05)
    for s in range(1, 17):
        assert straight[s]["lr"] == pytest.approx(expected(s), rel=1e-6)
        assert s < 9 or after[s]["lr"] == straight[s]["lr"]
