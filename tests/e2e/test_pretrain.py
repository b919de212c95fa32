"""The pre-training driver end to end, under torchrun with 2 CPU processes (slow, still run in CI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.fixtures import ROOT
from tests.runs import metrics, torchrun

pytestmark = pytest.mark.slow


def test_resume_after_sigterm_is_exact_at_tp2(tmp_path, shards):
    """TP=2 (the DP=2 layout with micro-batching is tests/cluster/test_reliability.py's preemption storm)."""
    common = [f"data.prefix={shards}", "train.log_interval=1", "train.eval_interval=4", "train.save_interval=1000",
              "parallel.tensor_model_parallel_size=2"]
    total = 10
    code, out = torchrun(2, tmp_path / "straight", f"train.max_steps={total}", *common)
    assert code == 0, out[-3000:]
    straight = metrics(tmp_path / "straight")
    assert sorted(straight) == list(range(1, total + 1))

    run = tmp_path / "interrupted"
    proc = torchrun(2, run, "train.max_steps=1000", *common, wait=False)
    deadline = time.monotonic() + 300
    while max(metrics(run), default=0) < 3:  # let it train a few steps, then preempt it
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:] if proc.stdout else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards SIGTERM to its workers
    out, _ = proc.communicate(timeout=300)
    stopped = int((run / "latest").read_text())
    assert "stop signal" in out and 3 <= stopped < total, out[-3000:]
    code, out = torchrun(2, run, f"train.max_steps={total}", *common)
    assert code == 0 and "resumed from" in out, out[-3000:]

    resumed = metrics(run)
    assert sorted(resumed) == list(range(1, total + 1))
    for step in range(1, total + 1):  # bit-for-bit: CPU, fp32, same layout
        assert resumed[step]["loss"] == straight[step]["loss"], step
        assert resumed[step]["grad_norm"] == straight[step]["grad_norm"], step
    assert metrics(run, "valid")[8]["loss"] == metrics(tmp_path / "straight", "valid")[8]["loss"]


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path, shards):
    run = tmp_path / "killed"
    common = [f"data.prefix={shards}", "train.eval_interval=0", "train.save_interval=2", "train.keep_last=5",
              "train.log_interval=1"]
    proc = torchrun(2, run, "train.max_steps=1000", *common, wait=False)
    deadline = time.monotonic() + 300
    while not (run / "iter_0000004").exists():  # the save of step 4 has begun (step 2's is complete)
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    _kill_tree(proc)
    proc.wait(timeout=60)
    assert (run / "latest").read_text().strip() == "2"  # never points at the half-written step 4
    code, out = torchrun(2, run, "train.max_steps=5", *common)
    assert code == 0 and "resumed from" in out and "iter_0000002" in out, out[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps[-3:] == [3, 4, 5] and steps.count(3) == 2  # killed run's 3, 4, then the resumed run's 3, 4, 5
    assert (run / "latest").read_text().strip() == "5"


def _kill_tree(proc) -> None:
    """SIGKILL torchrun and its workers at once (a crash: no handler runs)."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in parent.children(recursive=True) + [parent]:
        p.kill()


def test_early_stopping_on_a_plateau(tmp_path, shards):
    # lr = 0: the validation loss cannot improve after the first evaluation
    code, out = torchrun(2, tmp_path / "plateau", f"data.prefix={shards}", "optim.lr=0", "train.max_steps=50",
                         "train.eval_interval=1", "train.early_stop_patience=3", "train.save_interval=1000")
    assert code == 0, out[-3000:]
    assert "early stopping" in out
    assert sorted(metrics(tmp_path / "plateau", "valid")) == [1, 2, 3, 4]  # best, then exactly 3 without improvement
    assert (tmp_path / "plateau" / "latest").read_text().strip() == "4"  # the final checkpoint


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_short_training_in_each_precision(tmp_path, shards, precision):
    code, out = torchrun(2, tmp_path / precision, f"data.prefix={shards}", f"train.precision={precision}",
                         "train.max_steps=4", "train.eval_interval=2", "train.log_interval=1",
                         "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")
    assert code == 0, out[-3000:]
    train = metrics(tmp_path / precision)
    assert sorted(train) == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in train.values())


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    """The demo corpus (small scale) packed by the real preprocessing tool."""
    if subprocess.run(["which", "espeak-ng"], capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng missing in CI: `make sysdeps` should have installed it")
        pytest.skip("espeak-ng not installed (make sysdeps)")
    root = tmp_path_factory.mktemp("demo")
    for cmd in (["tools/make_demo_corpus.py", "--out", str(root / "corpus"), "--scale", "0.2"],
                ["tools/preprocess_audio.py", "--input", str(root / "corpus" / "pretrain" / "manifest.jsonl"),
                 "--output-prefix", str(root / "shards"), "--workers", "2", "--valid-fraction", "0.1"]):
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return root


def test_pretraining_learns_the_masked_objective(tmp_path, demo_shards):
    from megatron_speech.common.rng import counter_rng
    from megatron_speech.models.wav2vec2.masker import compute_span_mask
    from tests.fixtures import tiny_config

    steps = 400
    code, out = torchrun(2, tmp_path / "learn", f"data.prefix={demo_shards / 'shards'}", f"train.max_steps={steps}",
                         f"optim.decay_steps={steps}", "optim.warmup_steps=30", "train.eval_interval=100",
                         "train.log_interval=10", "train.save_interval=1000", "train.seed=1")
    assert code == 0, out[-3000:]
    train, valid = metrics(tmp_path / "learn"), metrics(tmp_path / "learn", "valid")
    k = tiny_config().model.num_negatives
    chance = 1 / (k + 1)
    early = np.mean([train[s]["loss"] for s in (10, 20, 30)])
    late = np.mean([train[s]["loss"] for s in (steps - 20, steps - 10, steps)])
    assert late < early - 0.15, (early, late)  # the contrastive loss falls
    assert valid[steps]["accuracy"] > 2 * chance, valid[steps]  # well above guessing among K + 1
    assert valid[steps]["code_perplexity"] > 0.25 * 32  # no codebook collapse
    # the logged fraction of masked frames is what the masker produces for these crops (the objective is masked)
    cfg = tiny_config().model
    rng = counter_rng(0, 0, 0, 0)
    expected = np.mean([compute_span_mask((4, f), cfg.mask_prob, cfg.mask_length_frames, rng, min_masks=2).mean()
                        for f in range(50, 200, 5) for _ in range(5)])
    logged = np.mean([r["mask_fraction"] for r in train.values()])
    assert abs(logged - expected) < 0.06, (logged, expected)


def test_a_run_with_data_workers_exits_when_done(shards, tmp_path):
    """With DataLoader workers (which ignore SIGTERM: Slurm signals every process of a step), the driver stops them
    itself before exiting; left to interpreter exit, multiprocessing SIGTERMs and joins them, and waits forever."""
    proc = torchrun(1, tmp_path / "run", f"data.prefix={shards}", "data.num_workers=2", "train.max_steps=2",
                    "train.eval_interval=0", "train.save_interval=0", wait=False)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"still running 150 s after start (hung at exit?):\n{out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    assert "stopping at step 2: reached train.max_steps=2 (exit 0)" in out
