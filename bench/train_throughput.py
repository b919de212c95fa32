"""Training throughput of our model against transformers and fairseq, same config, same batch, same device.

    python bench/train_throughput.py --config configs/base.yaml [--device cpu|cuda] [--tp N]
        [--batch-size B] [--seconds S] [--repeats R] [--impls ours,transformers,fairseq] [--json OUT]

One full training step each (forward, backward, optimizer step with gradient clipping):
- ours: the real step (`training.step.train_step`: megatron-core's forward_backward_no_pipelining, megatron
  DDP, megatron's optimizer), at world size `--tp` (TP ranks of one replica; on CPU over gloo);
- transformers: `Wav2Vec2ForPreTraining` built from the identical config (`interop.config_to_hf`), the same
  waveform, masks and distractor indices, `torch.optim.AdamW`;
- fairseq (when importable): `Wav2Vec2Model` with the same architecture, `quantize_targets=True`, the same
  masks (it draws its own distractors, K per masked frame, as it always does), fairseq's criterion's loss
  terms, `torch.optim.AdamW`.
transformers quantizes and scores every frame, fairseq and ours only the masked ones: same config, same masks,
each doing what it does. Every measurement runs in a fresh process; implementations are interleaved within each
repeat (the order rotates) so machine noise hits all of them alike. Reported: median audio-seconds per second
over repeats (each repeat's own figure is its median step), ours / peer ratios, model FLOP/s from the FLOP
model, and MFU against the GPU's dense bf16 peak on CUDA. Each implementation is isolated: one that fails or
times out is reported (with why) and the others still run; the summary and the MFU line always print, and the
exit status is 1 when anything failed. `--deadline` bounds the whole run.

Dropouts and Gumbel noise stay on (training as configured). Defaults: on CPU 2 utterances of min(5 s, the
config's longest crop) in fp32; on CUDA the config's per-micro-batch sample budget at min(15 s, longest crop)
in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a plain checkout (the GPU check) as well as installed
IMPLS = ("ours", "transformers", "fairseq")
RESULT_TAG = "BENCH_RESULT "

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name().
# Order matters: the first substring that matches wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A6000", 155.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("V100", 125.0),  # fp16 tensor cores (no bf16 on Volta)
)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of the named GPU in TFLOP/s, or None when it is not in the table."""
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


# ----------------------------------------------------------------------------------------------------------
# shapes and the shared batch


def load(config: str, overrides: list[str]):
    from megatron_speech.config import load_config

    return load_config(config, overrides)


def batch_shape(cfg, device: str, batch_size: int | None, seconds: float | None) -> tuple[int, int]:
    """(utterances, frames) of the benchmark micro-batch; frames are a multiple of 8 (any TP size up to 8)."""
    from megatron_speech.common.audio import SAMPLE_RATE

    m, d = cfg.model, cfg.data
    if seconds is None:
        seconds = min(d.max_sample_seconds, 15.0 if device == "cuda" else 5.0)
    frames = m.num_frames(round(seconds * SAMPLE_RATE))
    frames -= frames % 8
    if frames < 8:
        raise ValueError(f"--seconds {seconds}: the crop must hold at least 8 frames")
    if batch_size is None:
        batch_size = max(1, d.max_tokens // m.num_samples(frames)) if device == "cuda" else 2
    return batch_size, frames


def make_batch(model_cfg, batch_size: int, num_frames: int, seed: int = 0) -> dict:
    """Waveform [B, T] (T = 320 (F - 1) + 400), time mask [B, F] and distractor indices [B, F, K] as the data
    pipeline makes them (counter-based generator: identical in every process)."""
    import numpy as np
    import torch

    from megatron_speech.common.rng import counter_rng
    from megatron_speech.models.wav2vec2.masker import compute_span_mask, sample_negatives

    rng = counter_rng(seed, 0, 0, 0)
    wave = rng.standard_normal((batch_size, model_cfg.num_samples(num_frames))).astype(np.float32)
    mask = compute_span_mask((batch_size, num_frames), model_cfg.mask_prob, model_cfg.mask_length_frames, rng,
                             min_masks=model_cfg.mask_min_masks)
    negatives = sample_negatives(mask, model_cfg.num_negatives, rng)
    return {"waveform": torch.from_numpy(wave), "mask": torch.from_numpy(mask),
            "negatives": torch.from_numpy(negatives)}


def model_flops(model_cfg, batch: dict) -> float:
    """Training model FLOPs of one step on this batch (flops.py; the same figure credits every implementation)."""
    from megatron_speech.models.wav2vec2.flops import forward_flops

    b, f = batch["mask"].shape
    return forward_flops(model_cfg, b, f, num_masked=float(batch["mask"].sum())).training


# ----------------------------------------------------------------------------------------------------------
# one implementation's training step (runs in a worker process)


def setup_ours(cfg, batch: dict, device: str, precision: str, tp: int):
    from megatron_speech.models.wav2vec2.factory import build_model, gumbel_temperature
    from megatron_speech.parallel.initialize import initialize_parallel
    from megatron_speech.training.optim import build_optimizer
    from megatron_speech.training.parallelize import wrap_for_training
    from megatron_speech.training.step import train_step

    p, t = cfg.parallel, cfg.train
    t.precision = precision
    initialize_parallel(tp, t.seed)
    model = build_model(cfg.model, tp=tp, sequence_parallel=p.sequence_parallel and tp > 1, precision=precision,
                        recompute=t.recompute_transformer, recompute_conv=t.recompute_conv)
    model.to(device)  # megatron's layers are born on the GPU; the conv front-end and heads are not
    model.quantizer.temperature = gumbel_temperature(cfg.model, 0)
    ddp = wrap_for_training(model, p.use_distributed_optimizer, p.overlap_grad_reduce)
    optimizer = build_optimizer(ddp, cfg.optim, t, p)
    batches = [{k: v.to(device) for k, v in batch.items()}]

    def step() -> float:
        return train_step(ddp, optimizer, batches)["loss"]

    return step


def _param_groups(model, weight_decay: float) -> list[dict]:
    # no weight decay on biases and norms, as ours (megatron's defaults) and fairseq's recipes
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and p.requires_grad]
    other = [p for n, p in model.named_parameters() if p.ndim <= 1 and p.requires_grad]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def _peer_step(model, loss_fn, optim_cfg, device: str, precision: str):
    """A plain PyTorch training step: autocast (bf16/fp16), backward, clip, AdamW."""
    import contextlib

    import torch

    from megatron_speech.models.wav2vec2.factory import _DTYPES

    optimizer = torch.optim.AdamW(_param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                                  betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2), eps=optim_cfg.adam_eps)
    dtype = _DTYPES[precision]
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    autocast = (torch.autocast(device_type=device, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return float(loss.detach())

    return step


def setup_transformers(cfg, batch: dict, device: str, precision: str, tp: int):
    import torch
    from transformers import Wav2Vec2ForPreTraining

    from megatron_speech.models.wav2vec2 import interop
    from megatron_speech.models.wav2vec2.factory import gumbel_temperature

    torch.manual_seed(cfg.train.seed)
    model = Wav2Vec2ForPreTraining(interop.config_to_hf(cfg.model)).to(device).train()
    model.set_gumbel_temperature(gumbel_temperature(cfg.model, 0))
    wave, mask = batch["waveform"].to(device), batch["mask"].to(device)
    b, f, _ = batch["negatives"].shape
    # ours: frame index within the utterance; transformers: index into the flattened [B * F] targets
    negatives = (batch["negatives"] + (torch.arange(b) * f)[:, None, None]).to(device)

    def loss_fn():
        return model(wave, mask_time_indices=mask, sampled_negative_indices=negatives).loss

    return _peer_step(model, loss_fn, cfg.optim, device, precision)


def fairseq_config(model_cfg):
    """fairseq's Wav2Vec2Config for our architecture (layer-norm extractor, pre-LN encoder)."""
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config as FairseqConfig

    m = model_cfg
    return FairseqConfig(
        extractor_mode="layer_norm", conv_feature_layers=str([tuple(x) for x in m.conv_layers]),
        conv_bias=m.conv_bias, encoder_layers=m.num_layers, encoder_embed_dim=m.hidden_size,
        encoder_ffn_embed_dim=m.ffn_hidden_size, encoder_attention_heads=m.num_attention_heads,
        activation_fn="gelu", layer_norm_first=True, dropout=m.dropout, attention_dropout=m.attention_dropout,
        activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=m.feature_proj_dropout,
        dropout_features=m.feature_quantizer_dropout, final_dim=m.final_dim, logit_temp=m.logit_temperature,
        quantize_targets=True, feature_grad_mult=m.feature_grad_mult, latent_vars=m.num_codevectors_per_group,
        latent_groups=m.num_codevector_groups, latent_dim=m.codevector_dim,
        latent_temp=(m.gumbel_max_temperature, m.gumbel_min_temperature, m.gumbel_temperature_decay),
        mask_length=m.mask_length_frames, mask_prob=m.mask_prob, num_negatives=m.num_negatives,
        cross_sample_negatives=0, conv_pos=m.pos_conv_kernel, conv_pos_groups=m.pos_conv_groups,
    )


def setup_fairseq(cfg, batch: dict, device: str, precision: str, tp: int):
    import torch
    import torch.nn.functional as F
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model

    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    model = Wav2Vec2Model(fairseq_config(m)).to(device).train()
    wave, mask = batch["waveform"].to(device), batch["mask"].to(device)

    def loss_fn():  # fairseq's wav2vec criterion: InfoNCE sum + weighted extra losses x sample size
        out = model(source=wave, mask_indices=mask)
        logits = model.get_logits(out).float()
        target = model.get_targets(None, out)
        loss = F.cross_entropy(logits, target, reduction="sum")
        n = target.numel()
        diversity, feature_pen = model.get_extra_losses(out)
        loss = loss + m.diversity_loss_weight * diversity.float() * n
        if m.feature_penalty_weight > 0:
            loss = loss + m.feature_penalty_weight * feature_pen.float() * n
        return loss

    return _peer_step(model, loss_fn, cfg.optim, device, precision)


SETUP = {"ours": setup_ours, "transformers": setup_transformers, "fairseq": setup_fairseq}


def worker(args) -> None:
    """Builds one implementation, runs warm-up then timed steps, prints one RESULT line (rank 0)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load(args.config, args.override)
    batch_size, frames = batch_shape(cfg, args.device, args.batch_size, args.seconds)
    batch = make_batch(cfg.model, batch_size, frames)
    step = SETUP[args.worker](cfg, batch, args.device, args.precision, args.tp)
    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        loss = step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    cpu_times: list[float] = []  # this process's CPU seconds (all threads): robust to other load at 1 thread
    start = time.perf_counter()
    while len(times) < args.steps or (time.perf_counter() - start < args.min_time and len(times) < 1000):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        audio_seconds = batch["waveform"].numel() / 16000
        step_s = statistics.median(times)
        result = {
            "impl": args.worker, "step_s": step_s, "steps": len(times), "audio_seconds_per_step": audio_seconds,
            "audio_s_per_s": audio_seconds / step_s, "cpu_step_s": statistics.median(cpu_times),
            "model_flops_per_step": model_flops(cfg.model, batch),
            "loss": loss, "threads": torch.get_num_threads(), "batch_size": batch_size, "frames": frames,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        }
        print(RESULT_TAG + json.dumps(result), flush=True)
    if args.worker == "ours":
        from megatron_speech.parallel.initialize import destroy_parallel

        destroy_parallel()


# ----------------------------------------------------------------------------------------------------------
# the driver: fresh processes, interleaved repeats, medians, ratios


def available_impls(requested: list[str]) -> list[str]:
    """The requested implementations that can run here (fairseq is optional: skipped with a notice)."""
    out = []
    for impl in requested:
        if impl not in IMPLS:
            raise ValueError(f"--impls: unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
        if impl == "fairseq":
            probe = subprocess.run([sys.executable, "-c", "import fairseq.models.wav2vec.wav2vec2"],
                                   capture_output=True)
            if probe.returncode != 0:
                print("fairseq is not importable: skipped (pip install --no-build-isolation "
                      "fairseq-fixed==0.12.3.1 to compare against it)", file=sys.stderr)
                continue
        out.append(impl)
    return out


def worker_command(args, impl: str) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--worker", impl, "--config", args.config, "--device", args.device,
            "--precision", args.precision, "--tp", str(args.tp if impl == "ours" else 1),
            "--warmup", str(args.warmup), "--steps", str(args.steps), "--min-time", str(args.min_time)]
    for name in ("batch_size", "seconds", "threads"):
        value = getattr(args, name)
        if value:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    for o in args.override:
        argv += ["--override", o]
    if impl == "ours" and args.tp > 1:  # TP ranks are processes: torchrun, one rank per device (or CPU share)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.tp}",
                *argv]
    return [sys.executable, *argv]


def _busy_seconds() -> float | None:
    """CPU-seconds the whole machine has spent busy since boot (/proc/stat; None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_idle(max_seconds: float, max_other_cores: float = 0.2, window: float = 2.0) -> float | None:
    """Waits (up to max_seconds) until other processes use less than max_other_cores cores over `window`
    seconds; returns what they used in the last window (cores), None without /proc/stat."""
    deadline = time.monotonic() + max_seconds
    while True:
        b0 = _busy_seconds()
        if b0 is None:
            return None
        time.sleep(window)
        other = (_busy_seconds() - b0) / window
        if other < max_other_cores or time.monotonic() > deadline:
            return other


class WorkerFailed(RuntimeError):
    """One implementation's measurement process failed or timed out; `reason` is a one-line summary."""

    def __init__(self, impl: str, reason: str, output: str = ""):
        super().__init__(f"{impl}: {reason}" + (f"\n{output}" if output else ""))
        self.impl, self.reason, self.output = impl, reason, output


def _last_error_line(text: str) -> str:
    """The last line that looks like an exception (`SomeError: ...`), else the last non-empty line."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) or head in ("AssertionError", "SystemExit"):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def run_worker(args, impl: str, timeout: float | None = None) -> dict:
    """One fresh process; adds `other_cores`: the CPU the rest of the machine used meanwhile (cores), so a
    measurement taken under contention says so. Raises WorkerFailed when it exits without a result or runs
    past `timeout` (default --worker-timeout); its whole process group is killed then (torchrun's ranks too)."""
    env = dict(os.environ)
    if args.device == "cpu" and "OMP_NUM_THREADS" not in env and args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    timeout = args.worker_timeout if timeout is None else timeout
    b0, c0, t0 = _busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    proc = subprocess.Popen(worker_command(args, impl), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        raise WorkerFailed(impl, f"timed out after {timeout:.0f} s (killed)", (stdout + stderr)[-3000:]) from None
    except BaseException:  # Ctrl-C, or the stage's own timeout signalling us: never leave a worker behind
        _kill_group(proc)
        raise
    wall = time.perf_counter() - t0
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            if b0 is not None:
                own = _children_cpu_seconds() - c0
                result["other_cores"] = max(0.0, (_busy_seconds() - b0 - own) / wall)
            return result
    raise WorkerFailed(impl, f"exit {proc.returncode}: {_last_error_line(stderr or stdout)}",
                       f"{stdout[-3000:]}\n{stderr[-6000:]}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def summarize(runs: dict[str, list[dict]], device_name: str, peak: float | None, tp: int,
              failed: dict[str, str] | None = None) -> dict:
    """Medians per implementation, ours / peer ratios (per device) and MFU, over the implementations that gave at
    least one result; `failed` (implementation -> why) is carried along."""
    impls = {}
    for impl, results in runs.items():
        if not results:
            continue
        devices = tp if impl == "ours" else 1
        rate = statistics.median(r["audio_s_per_s"] for r in results)
        flops_per_audio_s = results[0]["model_flops_per_step"] / results[0]["audio_seconds_per_step"]
        per_device = rate / devices
        impls[impl] = {
            "audio_s_per_s": rate,
            "audio_s_per_s_per_device": per_device,
            "devices": devices,
            "repeats": [round(r["audio_s_per_s"], 4) for r in results],
            "other_cores": [round(r["other_cores"], 2) for r in results if "other_cores" in r],
            "step_s_median": statistics.median(r["step_s"] for r in results),
            # audio-seconds per CPU-second of the process: at 1 thread, independent of other load
            "audio_s_per_cpu_s": statistics.median(r["audio_seconds_per_step"] / r["cpu_step_s"] for r in results),
            "model_tflops_per_s_per_device": per_device * flops_per_audio_s / 1e12,
            "mfu": per_device * flops_per_audio_s / (peak * 1e12) if peak else None,
            "peak_memory_gib": max((r["peak_memory_gib"] or 0.0) for r in results) or None,
            "loss_last": results[-1]["loss"],
        }
    ratios, cpu_ratios = {}, {}
    if "ours" in impls:
        ours = impls["ours"]
        for impl, peer in impls.items():
            if impl != "ours":
                ratios[f"ours/{impl}"] = ours["audio_s_per_s_per_device"] / peer["audio_s_per_s_per_device"]
                cpu_ratios[f"ours/{impl}"] = ours["audio_s_per_cpu_s"] / peer["audio_s_per_cpu_s"]
    out = {"device": device_name, "peak_bf16_tflops": peak, "impls": impls, "ratios": ratios,
           "cpu_time_ratios": cpu_ratios, "failed": dict(failed or {})}
    first = next((results[0] for results in runs.values() if results), None)
    if first is not None:
        out.update(batch_size=first["batch_size"], frames=first["frames"],
                   audio_seconds_per_step=first["audio_seconds_per_step"],
                   model_gflops_per_audio_s=first["model_flops_per_step"] / first["audio_seconds_per_step"] / 1e9,
                   threads=first["threads"])
    return out


def device_description(device: str) -> str:
    import platform

    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a configs/*.yaml preset")
    ap.add_argument("--override", action="append", default=[], help="section.key=value (repeatable)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                    help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks for ours (peers run on one device)")
    ap.add_argument("--batch-size", type=int, default=None, help="utterances per step")
    ap.add_argument("--seconds", type=float, default=None, help="crop length per utterance, seconds")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per implementation")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (at least)")
    ap.add_argument("--min-time", type=float, default=2.0, help="keep stepping until this many seconds passed")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads per process (CPU; 0 = torch's)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense peak of the GPU (default: table)")
    ap.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds before a worker is killed")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run: no process starts that could not finish in time (each is "
                         "bounded by what is left), so the summary prints within it (bench/gpu_check.sh)")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each process, wait up to this many seconds for other processes to go quiet "
                         "(< 0.2 cores busy): for shared machines")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--worker", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    t_start = time.monotonic()  # the --deadline counts from here

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.worker:
        worker(args)
        return 0

    if args.tp < 1:
        raise SystemExit(f"--tp {args.tp}: must be >= 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        if torch.cuda.device_count() < args.tp:
            raise SystemExit(f"--tp {args.tp} needs {args.tp} GPUs (NCCL refuses two ranks on one GPU); "
                             f"{torch.cuda.device_count()} visible")
    cfg = load(args.config, args.override)
    batch_size, frames = batch_shape(cfg, args.device, args.batch_size, args.seconds)
    impls = available_impls([s for s in args.impls.split(",") if s])
    device_name = device_description(args.device)
    peak = args.peak_tflops or (peak_tflops(device_name) if args.device == "cuda" else None)
    load_avg = os.getloadavg()
    print(f"config {args.config} {' '.join(args.override)} | {args.device}: {device_name} | {args.precision} | "
          f"tp {args.tp} | batch {batch_size} x {cfg.model.num_samples(frames) / 16000:.2f} s ({frames} frames) | "
          f"load {load_avg[0]:.2f}", flush=True)

    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    failed: dict[str, str] = {}  # implementation -> why; it is not run again (its later repeats would fail alike)
    cut = 0  # measurements left out by the deadline
    longest = 0.0
    for r in range(args.repeats):
        order = impls[r % len(impls):] + impls[:r % len(impls)]  # rotate: no implementation always goes first
        for impl in order:
            if impl in failed:
                continue
            timeout = args.worker_timeout
            if args.deadline is not None:
                left = args.deadline - (time.monotonic() - t_start)
                # a repeat is only worth starting if it can finish like the slowest one so far did
                if left < max(5.0, 1.2 * longest) and runs[impl]:
                    cut += 1
                    continue
                if left < 5.0:
                    failed[impl] = f"repeat {r + 1}: not started: the --deadline of {args.deadline:.0f} s was reached"
                    print(f"  repeat {r + 1}/{args.repeats} {impl:13s} FAILED: {failed[impl]}", flush=True)
                    continue
                timeout = min(timeout, max(1.0, left))
            t0 = time.monotonic()
            try:
                result = run_worker(args, impl, timeout)
            except WorkerFailed as e:  # isolated: the other implementations still run and the summary prints
                failed[impl] = f"repeat {r + 1}: {e.reason}"
                print(f"  repeat {r + 1}/{args.repeats} {impl:13s} FAILED: {e.reason}", flush=True)
                if e.output:
                    print("    " + "\n    ".join(e.output.strip().splitlines()[-25:]), file=sys.stderr, flush=True)
                continue
            longest = max(longest, time.monotonic() - t0)
            runs[impl].append(result)
            print(f"  repeat {r + 1}/{args.repeats} {impl:13s} {result['audio_s_per_s']:9.3f} audio-s/s "
                  f"(median of {result['steps']} steps: {result['step_s'] * 1e3:.1f} ms/step, "
                  f"{result['cpu_step_s'] * 1e3:.1f} CPU-ms/step; other processes: "
                  f"{result.get('other_cores', float('nan')):.2f} cores)", flush=True)
    # an implementation that gave results before failing keeps them, but its failure is still reported
    summary = summarize(runs, device_name, peak, args.tp, failed)
    summary.update(config=args.config, overrides=args.override, precision=args.precision, tp=args.tp,
                   repeats=args.repeats, repeats_cut_by_deadline=cut, load_before=list(load_avg),
                   load_after=list(os.getloadavg()))
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failed or not summary["impls"] else 0


def print_summary(summary: dict) -> None:
    """The table, the ratios, the MFU line and what failed: printed whatever failed."""
    print(f"{'impl':13s} {'audio-s/s/dev':>14s} {'TFLOP/s/dev':>12s} {'MFU':>7s}")
    for impl, s in summary["impls"].items():
        mfu = f"{100 * s['mfu']:6.1f}%" if s["mfu"] is not None else "      -"
        print(f"{impl:13s} {s['audio_s_per_s_per_device']:14.3f} {s['model_tflops_per_s_per_device']:12.4f} {mfu}")
    for impl, why in summary["failed"].items():
        print(f"{impl:13s} FAILED: {why}")
    for name, value in summary["ratios"].items():
        print(f"ratio {name} = {value:.3f} (wall clock; by process CPU time: "
              f"{summary['cpu_time_ratios'][name]:.3f})")
    ours = summary["impls"].get("ours")
    if ours is None:
        why = summary["failed"].get("ours", "not run")
        print(f"MFU: not measured: ours gave no result ({why})")
    elif ours["mfu"] is None:
        print(f"MFU: n/a on {summary['device']} (no dense bf16 peak known; pass --peak-tflops on a GPU); ours "
              f"{ours['model_tflops_per_s_per_device']:.4f} model TFLOP/s per device")
    else:
        print(f"MFU: ours {100 * ours['mfu']:.1f}% of {summary['peak_bf16_tflops']:g} TFLOP/s dense bf16 "
              f"({ours['model_tflops_per_s_per_device']:.1f} model TFLOP/s per device, {summary['device']})")
    if summary.get("repeats_cut_by_deadline"):
        print(f"note: {summary['repeats_cut_by_deadline']} measurement(s) not started: the --deadline was near")
    if "model_gflops_per_audio_s" in summary:
        print(f"model FLOPs: {summary['model_gflops_per_audio_s']:.2f} GFLOP per audio-second (training, this "
              f"crop and mask) | load average {summary['load_before'][0]:.2f} -> {summary['load_after'][0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
