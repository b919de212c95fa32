"""bench/train_throughput.py runs a tiny config end to end and prints ratios, and isolates a failing or hung
implementation (the summary and the MFU line still print); gpu_checks' fp16 check catches a loss that is never
scaled; the offline wheel list covers what the stages import; bench/gpu_check.sh's CPU dry path works (its GPU
path needs a GPU: docs/performance.md says how it is run)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import pytest

from tests.dist import run_ranks
from tests.fixtures import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_checks  # noqa: E402
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


def test_payload_compression_bench_quick(tmp_path):
    """bench/payload_compression.py --quick (a few seconds): both tables, sane ratios and rates."""
    from tools.demo_corpus import check_tools

    if check_tools():
        pytest.skip(f"not installed: {', '.join(check_tools())} (apt-get install espeak-ng flite sox)")
    out = tmp_path / "payload.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/payload_compression.py"), "--quick", "--kinds", "tts",
                           "tts+white", "music", "--json", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "FLAC size per audio-hour" in proc.stdout and "one augmenting worker, FLAC (seek)" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["sizes"]) == {"tts", "tts+white", "music"}
    for row in result["sizes"].values():
        assert 0.2 < row["L5"]["ratio"] < 1.0 and row["L8"]["mb_per_hour"] <= row["L0"]["mb_per_hour"]
    assert [r["utterance_s"] for r in result["loader"]] == [5.0, 20.0]
    for r in result["loader"]:
        assert all(rate > 0 for rate in r["audio_s_per_cpu_s"].values()) and r["decode_x_rt"] > 0


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
                     "fp16_scale   PASS", "sdpa_flash   SKIP", "TP=2: skipped: it needs 2 GPUs",
                     "ratio ours/transformers = ", "== checks.json", "== te.json", "== bench.json",
                     "== Transformer Engine (cpu): ok", "SKIPPED: Transformer Engine not importable here (",
                     "== figures", "MFU: ours n/a", "fp16: PASS | grad norm fp16/fp32 = ", "loss scale 65536 -> 65536",
                     "[CPU dry run: no GPU figures]"):
        assert expected in text, expected


# ---- isolation of the implementations ---------------------------------------------------------------------

def _fake_result(impl: str, rate: float) -> dict:
    return {"impl": impl, "audio_s_per_s": rate, "step_s": 2.0 / rate, "cpu_step_s": 2.0 / rate, "steps": 2,
            "audio_seconds_per_step": 2.0, "model_flops_per_step": 2.0 * 1e9, "loss": 1.0, "peak_memory_gib": 3.0,
            "batch_size": 2, "frames": 48, "threads": 1}


def _tiny_args(tmp_path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/tiny.yaml"), "--device", "cpu", "--impls", "ours,transformers",
            "--repeats", "2", "--json", str(tmp_path / "bench.json"), *extra]


def test_a_failing_peer_still_gives_the_summary_and_the_mfu_line(tmp_path, monkeypatch, capsys):
    calls = []

    def run_worker(args, impl, timeout=None):
        calls.append(impl)
        if impl == "transformers":
            raise bench.WorkerFailed(impl, "exit 1: ImportError: cannot import name 'Wav2Vec2ForPreTraining'")
        return _fake_result(impl, 10.0)

    monkeypatch.setattr(bench, "run_worker", run_worker)
    assert bench.main(_tiny_args(tmp_path, "--peak-tflops", "1")) == 1  # something failed: exit 1
    out = capsys.readouterr().out
    assert calls.count("transformers") == 1 and calls.count("ours") == 2  # not retried; ours kept measuring
    assert re.search(r"^transformers +FAILED: repeat 1: exit 1: ImportError", out, re.M), out
    assert re.search(r"^ours +10\.000 ", out, re.M), out
    # 10 audio-s/s x 1 GFLOP per audio-second = 10 GFLOP/s of a 1 TFLOP/s peak
    assert "MFU: ours 1.0% of 1 TFLOP/s dense bf16" in out, out
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert set(summary["impls"]) == {"ours"} and summary["ratios"] == {}
    assert summary["failed"] == {"transformers": "repeat 1: exit 1: ImportError: cannot import name "
                                                 "'Wav2Vec2ForPreTraining'"}


def test_ours_failing_says_the_mfu_was_not_measured(tmp_path, monkeypatch, capsys):
    def run_worker(args, impl, timeout=None):
        if impl == "ours":
            raise bench.WorkerFailed(impl, "timed out after 150 s (killed)")
        return _fake_result(impl, 4.0)

    monkeypatch.setattr(bench, "run_worker", run_worker)
    assert bench.main(_tiny_args(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "MFU: not measured: ours gave no result (repeat 1: timed out after 150 s (killed))" in out
    assert re.search(r"^transformers +4\.000 ", out, re.M), out


def test_a_hung_worker_is_killed_at_the_deadline_and_reported(tmp_path):
    # real processes: a 1 s budget cannot even import torch; both are reported, the summary still prints
    proc = subprocess.run([sys.executable, str(ROOT / "bench/train_throughput.py"),
                           *_tiny_args(tmp_path, "--repeats", "1", "--worker-timeout", "1")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert re.search(r"^ours +FAILED: repeat 1: timed out after 1 s \(killed\)", proc.stdout, re.M), proc.stdout
    assert re.search(r"^transformers +FAILED: repeat 1: timed out after 1 s", proc.stdout, re.M), proc.stdout
    assert "MFU: not measured: ours gave no result" in proc.stdout
    assert json.loads((tmp_path / "bench.json").read_text())["impls"] == {}


def test_figures_say_what_is_missing(tmp_path):
    (tmp_path / "te.json").write_text(json.dumps({"te": {"status": "SKIP", "why": "SKIPPED: Transformer Engine "
                                                                                  "not importable here (x)"}}))
    lines = gpu_checks.figures(str(tmp_path))
    assert "MFU: no benchmark result (bench.json: FileNotFoundError)" in lines
    assert "TE: SKIPPED: Transformer Engine not importable here (x)" in lines
    assert any(line.startswith("fp16: no result (checks.json") for line in lines)


# ---- the fp16 check ----------------------------------------------------------------------------------------

def _fp16_check(rank: int, world: int, path: str, unscaled: bool) -> dict:
    import torch

    from megatron_speech.parallel.initialize import destroy_parallel, initialize_parallel
    from megatron_speech.training import optim

    if unscaled:  # the bug of issue 13: the loss never multiplied by the scale, the gradients still divided
        build = optim.build_optimizer

        def build_optimizer(model, *args, **kwargs):
            optimizer = build(model, *args, **kwargs)
            model.config.grad_scale_func = None
            return optimizer

        optim.build_optimizer = build_optimizer
    gpu_checks.reference(path)
    ref = torch.load(path, weights_only=True)
    initialize_parallel(1, gpu_checks.SEED)
    try:
        return gpu_checks.check_fp16_scale("cpu", ref)
    finally:
        destroy_parallel()


# The scaled case (the check passes on the real wiring) is test_gpu_check_dry_path's `fp16_scale PASS`.
@pytest.mark.parametrize("unscaled", [True], ids=["unscaled_loss"])
def test_fp16_check_fails_when_the_loss_is_not_scaled(tmp_path, unscaled):
    (result,) = run_ranks(_fp16_check, 1, str(tmp_path / "ref.pt"), unscaled, timeout=300)
    assert result["fp16"]["loss_scale_before"] == 65536.0 and result["fp16"]["updated"]
    if unscaled:
        assert result["status"] == "FAIL", result
        assert result["grad_norm_ratio_fp16_fp32"] < 1e-3  # 1/65536 of the fp32 norm
    else:
        assert result["status"] == "PASS", result
        assert result["grad_norm_ratio_fp16_fp32"] == pytest.approx(1.0, abs=0.02)
        assert result["loss_scale"] == 65536.0


def _te_plumbing(rank: int, world: int) -> dict:
    from megatron_speech.parallel.initialize import destroy_parallel, initialize_parallel

    gpu_checks._te_skip = lambda device: None  # no TE here: the local spec stands in for it on both sides
    initialize_parallel(1, gpu_checks.SEED)
    try:
        return gpu_checks.check_te("cpu", config="configs/tiny.yaml", te_spec=False)
    finally:
        destroy_parallel()


def test_te_stage_plumbing_with_the_local_spec_standing_in():
    """The TE stage's save -> load -> no-mask and padded forward/backward -> compare, on CPU (the GPU check runs
    it with TE); and where TE does not import it skips, saying so."""
    assert gpu_checks.check_te("cpu")["why"].startswith("SKIPPED: Transformer Engine not importable here (")
    (result,) = run_ranks(_te_plumbing, 1, timeout=300)
    assert result["status"] == "PASS", result
    for part in ("save_local", "build_te", "load_local", "pretrain_te", "padded_te", "pretrain_local", "te_vs_local"):
        assert result[part]["status"] == "PASS", (part, result[part])
    assert result["padded_te"]["cosine_padded_vs_alone"] > 0.99
    assert result["te_vs_local"]["states_cosine"] > 0.999  # the same spec and the same (loaded) weights


# ---- the offline wheels ------------------------------------------------------------------------------------

# import name -> the wheel (bench/wheels.txt) that provides it
DISTRIBUTIONS = {"megatron": "megatron-core", "yaml": "pyyaml", "numpy": "numpy", "soundfile": "soundfile",
                 "soxr": "soxr", "psutil": "psutil", "rapidfuzz": "rapidfuzz", "packaging": "packaging",
                 "transformers": "transformers",
                 "safetensors": "safetensors", "tqdm": "tqdm"}
# present on the GPU machine (torch and its own dependencies), optional at run time (never imported by the
# stages unless configured so), or the project itself
NOT_WHEELS = {"torch", "megatron_speech", "tests", "tools", "bench", "train_throughput", "gpu_checks",
              "loader_throughput", "fixtures", "fairseq", "transformer_engine", "wandb", "matplotlib", "apex",
              "pyctcdecode", "kenlm"}  # beam search: only `evaluate --decoder beam` imports them


def _top_level_imports(paths) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names)


def test_wheel_list_covers_what_the_gpu_check_imports():
    pins = {}
    for line in (ROOT / "bench/wheels.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, version = line.strip().partition("==")
            assert version, f"bench/wheels.txt: {line!r} is not pinned (the GPU machine has no index)"
            pins[name.lower()] = version
    used = _top_level_imports([*(ROOT / "megatron_speech").rglob("*.py"), *(ROOT / "bench").glob("*.py"),
                               ROOT / "tests/fixtures.py", ROOT / "tools/demo_corpus.py"])
    unknown = used - set(DISTRIBUTIONS) - NOT_WHEELS
    assert not unknown, f"new third-party imports: add their wheels to bench/wheels.txt and here: {unknown}"
    missing = {DISTRIBUTIONS[m] for m in used & set(DISTRIBUTIONS)} - set(pins)
    assert not missing, f"bench/wheels.txt lacks {missing}"
    # what soundfile needs at import: cffi (ABI mode), which parses the declarations with pycparser
    assert {"soundfile", "cffi", "pycparser", "soxr"} <= set(pins)
    # every wheel the script installs is named in its module list, and the other way round
    script = (ROOT / "bench/gpu_check.sh").read_text()
    modules = " ".join(re.findall(r'^(?:CORE|HF)="([^"]*)"', script, re.M | re.S))
    listed = {entry.split("=")[0] for entry in modules.split()}
    assert listed == set(pins), (listed ^ set(pins))
