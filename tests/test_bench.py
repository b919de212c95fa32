"""bench/train_throughput.py runs a tiny config end to end and prints ratios; bench/gpu_check.sh's CPU dry path
works (its GPU path needs a GPU: docs/performance.md says how it is run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import train_throughput as bench  # noqa: E402

pytest.importorskip("transformers")


def test_throughput_bench_runs_tiny_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/train_throughput.py"), "--config", str(ROOT / "configs/tiny.yaml"),
         "--device", "cpu", "--impls", "ours,transformers", "--repeats", "1", "--warmup", "1", "--steps", "1",
         "--min-time", "0", "--batch-size", "1", "--seconds", "1", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ratio ours/transformers = " in proc.stdout
    summary = json.loads(out.read_text())
    assert set(summary["impls"]) == {"ours", "transformers"}
    for impl in summary["impls"].values():
        assert impl["audio_s_per_s"] > 0 and impl["mfu"] is None  # no MFU on CPU
    ratio = summary["ratios"]["ours/transformers"]
    assert ratio == pytest.approx(summary["impls"]["ours"]["audio_s_per_s"]
                                  / summary["impls"]["transformers"]["audio_s_per_s"])
    # the FLOP model credits both implementations with the same work
    assert summary["model_gflops_per_audio_s"] > 0
    assert summary["frames"] % 8 == 0 and summary["batch_size"] == 1


def test_summary_ratios_and_mfu_per_device():
    def result(impl, rate):
        return {"impl": impl, "audio_s_per_s": rate, "step_s": 75.0 / rate, "cpu_step_s": 75.0 / rate,
                "audio_seconds_per_step": 75.0, "model_flops_per_step": 75.0 * 119e9, "loss": 1.0,
                "peak_memory_gib": 10.0, "batch_size": 5, "frames": 744, "threads": 1}

    runs = {"ours": [result("ours", 2000.0), result("ours", 2200.0), result("ours", 1000.0)],
            "transformers": [result("transformers", 400.0)]}
    s = bench.summarize(runs, "NVIDIA A100-SXM4-40GB", bench.peak_tflops("NVIDIA A100-SXM4-40GB"), tp=2)
    ours = s["impls"]["ours"]
    assert ours["audio_s_per_s"] == 2000.0  # the median over repeats
    assert ours["audio_s_per_s_per_device"] == 1000.0  # TP=2 uses two GPUs
    assert ours["mfu"] == pytest.approx(1000.0 * 119e9 / 312e12)
    assert s["ratios"]["ours/transformers"] == pytest.approx(2.5)  # per device


def test_peak_table_and_batch_shape():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("Some Future GPU") is None
    cfg = bench.load(str(ROOT / "configs/xl.yaml"), [])
    batch_size, frames = bench.batch_shape(cfg, "cuda", None, None)
    # xl: 1.2M samples per micro-batch at 15 s crops (frames rounded down to a multiple of 8)
    assert frames == 744 and batch_size == 1_200_000 // cfg.model.num_samples(744) == 5
    assert bench.batch_shape(cfg, "cpu", None, None)[0] == 2


@pytest.mark.slow
def test_gpu_check_dry_path(tmp_path):
    """Without a GPU the script runs every stage on the CPU path at tiny sizes and writes one result file."""
    result = tmp_path / "out" / "gpu_check.txt"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--dry-run", str(result)], env=env,
                          capture_output=True, text=True, timeout=900)
    text = result.read_text()
    assert proc.returncode == 0, text[-6000:]
    for expected in ("== install", "gpu_vs_cpu   PASS", "bf16         PASS", "train_steps  PASS",
                     "sdpa_flash   SKIP", "TP=2: skipped: it needs 2 GPUs", "ratio ours/transformers = ",
                     "== checks.json", "== bench.json", "[CPU dry run: no GPU figures]"):
        assert expected in text, expected
