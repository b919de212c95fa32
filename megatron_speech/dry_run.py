"""`--dry-run`: check a run's config against a world size and print what each GPU will hold and compute.

    python -m megatron_speech.pretrain --config configs/xl.yaml --dry-run [--world-size 32] [key=value ...]
    python -m megatron_speech.dry_run --config ...                   (the same, without importing torch)

The world size comes from `--world-size`, else the launcher's environment (WORLD_SIZE from torchrun,
SLURM_NTASKS inside an sbatch allocation), else 1. Prints the parallel layout (TP x DP, micro-batches, global
batch in audio seconds), parameters per GPU, a memory estimate per GPU (weights, gradients and optimizer state
as megatron-core's distributed optimizer holds them, EMA, activations at the largest batch shapes the sampler
can form: models/wav2vec2/memory.py) and the FLOP model's numbers (models/wav2vec2/flops.py). Nothing here
forms a process group, builds a model or imports torch: launch/*.sbatch runs it on the batch node before starting
the job's GPUs.
Exit status: 0 when the launch would start, 2 with the list of problems otherwise.

Memory is an estimate (bytes of tensors saved for backward, by the model's own layout; see
`activation_bytes`); the CUDA context, NCCL buffers and allocator fragmentation come on top.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_speech.common.audio import SAMPLE_RATE
from megatron_speech.config import Config, format_help, load_config, parse_cli
from megatron_speech.data.crop import crop_num_frames
from megatron_speech.models.wav2vec2.flops import (
    ForwardFlops,
    forward_flops,
    per_rank_training_flops,
)
from megatron_speech.models.wav2vec2.memory import (
    activation_bytes,
    checkpoint_bytes,
    largest_tensor,
    model_state_bytes,
    parameter_counts,
)

GIB = 1024**3
A100_PEAK_FLOPS = 312e12
"""A100 dense bf16/fp16 tensor-core peak (docs/design.md §10)."""
TARGET_MFU = 0.45
"""The project's throughput target, used to label a projected step time."""
FLOP_REFERENCE_CROP_SECONDS = 15.0
"""docs/design.md §10 quotes FLOPs per audio-second at 15 s crops (or the longest crop, when shorter)."""


# ------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    """Everything the dry-run prints, computed from a Config and a world size."""

    cfg: Config
    world_size: int
    world_size_source: str
    tp: int
    dp: int
    max_crop_frames: int
    max_crop_batch: int
    worst_frames: int
    worst_batch: int
    params_total: int
    params_per_gpu: int
    state: dict[str, float]
    checkpoint: dict[str, float]
    activations_max_crop: dict[str, float]
    activations_worst: dict[str, float]
    flops_max_crop: ForwardFlops
    flops_reference: ForwardFlops
    flops_reference_seconds: float
    problems: list[str]
    notes: list[str]

    @property
    def activations_peak(self) -> float:
        return max(sum(self.activations_max_crop.values()), sum(self.activations_worst.values()))

    @property
    def memory_total(self) -> float:
        return sum(self.state.values()) + self.activations_peak


def _act(cfg: Config, tp: int, batch: int, frames: int) -> dict[str, float]:
    t, p = cfg.train, cfg.parallel
    return activation_bytes(cfg.model, batch, frames, precision=t.precision, tensor_model_parallel_size=tp,
                            sequence_parallel=p.sequence_parallel, recompute_transformer=t.recompute_transformer,
                            recompute_conv=t.recompute_conv)


def world_size_from_launcher(env: dict[str, str] | None = None) -> tuple[int, str]:
    """(world size, where it came from): torchrun's WORLD_SIZE, Slurm's SLURM_NTASKS, else 1."""
    env = os.environ if env is None else env
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if env.get(key):
            try:
                return int(env[key]), key
            except ValueError:
                raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None
    return 1, "default: no launcher environment"


def make_plan(cfg: Config, world_size: int, world_size_source: str = "--world-size",
              env: dict[str, str] | None = None) -> Plan:
    """Check cfg against world_size (ValueError problems are collected, not raised) and estimate."""
    env = os.environ if env is None else env
    problems: list[str] = []
    notes: list[str] = []
    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.parallel
    if world_size < 1:
        raise ValueError(f"world size {world_size} must be >= 1")
    try:
        cfg.validate(world_size)
    except ValueError as err:
        problems += [line.strip()[2:] if line.strip().startswith("- ") else line
                     for line in str(err).splitlines()[1:]] or [str(err)]
    tp = max(1, p.tensor_model_parallel_size)
    dp = max(1, world_size // tp)

    # Data: a launch without shards fails after every GPU started; say it now.
    if not d.prefix:
        problems.append("data.prefix is empty: pass data.prefix=PREFIX (tools/preprocess_audio.py's output prefix)")
    for prefix in d.prefix:
        if not glob.glob(f"{prefix}_train_*.idx"):
            problems.append(f"data.prefix={prefix}: no shards {prefix}_train_NNNNN.idx/.bin found "
                            "(the path must be visible from every node)")
    if d.noise_dir:  # configs/xl.yaml's placeholder would otherwise fail only after the manifests loaded
        from megatron_speech.data.noise import check_noise_source  # numpy + soxr, not torch

        try:
            check_noise_source(d.noise_dir, d.noise_types)
        except (OSError, ValueError) as err:
            problems.append(str(err))
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit() and d.num_workers + 1 > int(cpus):
        notes.append(f"data.num_workers={d.num_workers} loader processes + the training process exceed "
                     f"--cpus-per-task={cpus}: raise --cpus-per-task or lower data.num_workers")

    # Batch shapes: at the longest crop, and the shape that puts the most frames in one micro-batch.
    max_samples = round(d.max_sample_seconds * SAMPLE_RATE)
    min_frames = m.mask_min_masks * m.mask_length_frames + 1
    try:
        max_frames = crop_num_frames(max_samples, max_samples, tp, min_frames, m.geometry)
    except ValueError as err:
        problems.append(str(err))
        max_frames = tp
    max_batch = max(1, d.max_tokens // m.num_samples(max_frames))
    min_crop = crop_num_frames(max_samples, max_samples, tp, 1, m.geometry)
    shortest = max(tp, m.num_frames(round(d.min_sample_seconds * SAMPLE_RATE)) // tp * tp)
    worst_frames, worst_batch, worst = max_frames, max_batch, _act(cfg, tp, max_batch, max_frames)
    step = max(tp, (max_frames - shortest) // 200 // tp * tp)  # ~200 shapes: the estimate is smooth in F
    for frames in range(shortest, min(min_crop, max_frames) + 1, step):
        batch = max(1, d.max_tokens // m.num_samples(frames))
        act = _act(cfg, tp, batch, frames)
        if sum(act.values()) > sum(worst.values()):
            worst_frames, worst_batch, worst = frames, batch, act

    counts = parameter_counts(m, tp)
    total = sum(parameter_counts(m, 1).values())
    per_gpu = sum(counts.values())
    state = model_state_bytes(per_gpu, t.precision, dp, p.use_distributed_optimizer, t.ema_decay > 0)
    checkpoint = checkpoint_bytes(per_gpu, largest_tensor(m, tp), t.precision, dp, p.use_distributed_optimizer,
                                  t.ema_decay > 0, total_params=total)
    reference_frames = max(1, m.num_frames(round(min(FLOP_REFERENCE_CROP_SECONDS, d.max_sample_seconds) * SAMPLE_RATE)))
    return Plan(cfg=cfg, world_size=world_size, world_size_source=world_size_source, tp=tp, dp=dp,
                max_crop_frames=max_frames, max_crop_batch=max_batch, worst_frames=worst_frames,
                worst_batch=worst_batch, params_total=total, params_per_gpu=per_gpu, state=state, checkpoint=checkpoint,
                activations_max_crop=_act(cfg, tp, max_batch, max_frames), activations_worst=worst,
                flops_max_crop=forward_flops(m, max_batch, max_frames),
                flops_reference=forward_flops(m, 1, reference_frames),
                flops_reference_seconds=m.num_samples(reference_frames) / SAMPLE_RATE, problems=problems, notes=notes)


# ------------------------------------------------------------------------------------------------------------
# Report


def _gib(n: float) -> str:
    """Bytes in binary units, three significant digits."""
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _flop(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


def _seconds(samples: float) -> float:
    return samples / SAMPLE_RATE


def format_plan(plan: Plan, config_name: str = "") -> str:
    cfg, tp, dp = plan.cfg, plan.tp, plan.dp
    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.parallel
    sp = p.sequence_parallel and tp > 1
    crop_samples = m.num_samples(plan.max_crop_frames)
    micro = dp * t.num_micro_batches
    lines = [f"dry run{f' of {config_name}' if config_name else ''}: world size {plan.world_size} "
             f"({plan.world_size_source}); no process group formed, no model built"]
    add = lines.append
    add(f"layout       {plan.world_size} GPUs = TP {tp} x DP {dp}; sequence parallel {'on' if sp else 'off'}; "
        f"distributed optimizer {'on' if p.use_distributed_optimizer else 'off'}; precision {t.precision}")
    add(f"batch        micro-batch <= {d.max_tokens:,} samples ({_seconds(d.max_tokens):.1f} s of audio), "
        f"{t.num_micro_batches} per step on each DP rank")
    add(f"             global batch <= {micro} micro-batches = {_seconds(micro * d.max_tokens):,.0f} s "
        f"({_seconds(micro * d.max_tokens) / 3600:.2f} h) of audio per step")
    add(f"             longest crop {_seconds(crop_samples):.2f} s = {plan.max_crop_frames} frames "
        f"({plan.max_crop_frames // tp} per TP rank); utterances per micro-batch at that crop: "
        f"{plan.max_crop_batch}")
    add(f"parameters   {plan.params_total / 1e6:,.1f} M in the model; {plan.params_per_gpu / 1e6:,.1f} M per GPU"
        + (f" (TP shards the transformer's matmuls over {tp})" if tp > 1 else ""))
    s = plan.state
    half = t.precision != "fp32"
    add(f"memory/GPU   weights {_gib(s['weights'])} ({'16-bit' if half else 'fp32'}) + gradients "
        f"{_gib(s['gradients'])} (fp32 buffer) + optimizer {_gib(s['optimizer'])} "
        f"({'fp32 master + ' if half else ''}Adam moments"
        + (f", sharded over {dp} DP ranks)" if p.use_distributed_optimizer else ", not sharded)")
        + (f" + EMA {_gib(s['ema'])}" if s["ema"] else ""))
    for label, frames, batch, act in (("longest crop", plan.max_crop_frames, plan.max_crop_batch,
                                       plan.activations_max_crop),
                                      ("fullest batch", plan.worst_frames, plan.worst_batch,
                                       plan.activations_worst)):
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in act.items())
        add(f"             activations at the {label} ({batch} x {frames} frames): {_gib(sum(act.values()))} "
            f"({parts})")
    recompute = [f"transformer {t.recompute_transformer}"] if t.recompute_transformer != "none" else []
    recompute += ["conv encoder"] if t.recompute_conv else []
    add(f"             total ~ {_gib(plan.memory_total)} per GPU (recompute: {', '.join(recompute) or 'none'}), "
        "plus CUDA context, NCCL buffers and fragmentation (~1-3 GiB); "
        + ", ".join(f"{gb} GB GPU: {'fits' if plan.memory_total + 3 * GIB <= gb * 1e9 * 0.95 else 'DOES NOT FIT'}"
                    for gb in (40, 80)))
    per_s = plan.flops_reference.scaled(1 / plan.flops_reference_seconds)
    add(f"FLOPs        {_flop(per_s.training)} per audio-second for training at "
        f"{plan.flops_reference_seconds:.3g} s crops (forward {_flop(per_s.total)} = conv {_flop(per_s.conv)} "
        f"+ transformer {_flop(per_s.transformer)} + attention {_flop(per_s.attention)} "
        f"+ other {_flop(per_s.other)})")
    fm = plan.flops_max_crop
    step_flops = fm.training * micro
    gpu_flops = per_rank_training_flops(fm, tp) * t.num_micro_batches
    audio = _seconds(crop_samples * plan.max_crop_batch * micro)
    add(f"             per step with full micro-batches at the longest crop ({audio:,.0f} s of audio): "
        f"{_flop(step_flops)} in all, {_flop(gpu_flops)} per GPU")
    add(f"             projection on A100 (312 TFLOP/s peak): >= {gpu_flops / A100_PEAK_FLOPS:.2f} s per step at "
        f"100% MFU, {gpu_flops / (A100_PEAK_FLOPS * TARGET_MFU):.2f} s at the {TARGET_MFU:.0%} target "
        f"({audio / (gpu_flops / (A100_PEAK_FLOPS * TARGET_MFU)) / plan.world_size:,.0f} audio-s/s per GPU)")
    latest = os.path.join(t.save_dir, "latest")
    resume = "a fresh start"
    if t.resume and os.path.exists(latest):
        with open(latest) as fh:
            resume = f"resume from step {fh.read().strip()}"
    add(f"checkpoints  {os.path.abspath(t.save_dir)} ({resume}); every {t.save_interval} steps, on signal and at "
        "the end")
    c = plan.checkpoint
    share = c["save_total"] / c["total"]
    add(f"             derived from the parameter count (not measured): {_gib(c['save_total'])} per save = weights "
        f"{_gib(c['weights'] * share)} + " + (f"EMA {_gib(c['ema'] * share)} + " if c["ema"] else "")
        + f"optimizer {_gib(c['optimizer'] * share)} (fp32 master + Adam moments); each of the {plan.world_size} ranks "
        f"writes ~{_gib(c['per_rank'])} (<= {_gib(c['per_rank_max'])}: replicas split by whole tensors) and reads "
        f"about as much on resume and to verify checksums")
    if p.use_distributed_optimizer:
        add(f"             (fully parallel save, optimizer dp_reshardable; with fully_reshardable and no parallel "
            f"save, DP rank 0 of each TP rank wrote {_gib(c['before'])} alone after gathering "
            f"{_gib(c['gathered_per_rank'])} of optimizer state into every rank's host memory)")
    for note in plan.notes:
        add(f"note         {note}")
    if plan.problems:
        add(f"PROBLEMS ({len(plan.problems)}): the launch would fail")
        lines.extend(f"  - {problem}" for problem in plan.problems)
    else:
        add("ok")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Command line


def split_args(argv: Sequence[str]) -> tuple[list[str], bool, int | None]:
    """Take `--dry-run` and `--world-size N` out of a driver's arguments: (the rest, dry run?, world size)."""
    rest: list[str] = []
    dry_run, world_size = False, None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--dry-run":
            dry_run = True
        elif arg == "--world-size" or arg.startswith("--world-size="):
            if arg == "--world-size":
                if i + 1 >= len(args):
                    raise ValueError("--world-size needs a number: --world-size 32")
                i += 1
                value = args[i]
            else:
                value = arg.split("=", 1)[1]
            try:
                world_size = int(value)
            except ValueError:
                raise ValueError(f"--world-size {value!r}: expected a positive integer") from None
            if world_size < 1:
                raise ValueError(f"--world-size {world_size}: expected a positive integer")
        else:
            rest.append(arg)
        i += 1
    if world_size is not None and not dry_run:
        raise ValueError("--world-size only applies with --dry-run (a launched run takes the launcher's)")
    return rest, dry_run, world_size


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `--dry-run`; returns 0 (would launch) or 2 (problems listed)."""
    try:
        # `python -m megatron_speech.dry_run ...` is a dry run whether or not it says so
        rest, _, world_size = split_args(["--dry-run", *(sys.argv[1:] if argv is None else argv)])
        path, overrides, want_help = parse_cli(rest)
        cfg = load_config(path, overrides)
        if world_size is None:
            world_size, source = world_size_from_launcher()
        else:
            source = "--world-size"
    except ValueError as err:
        print(f"dry run: {err}", file=sys.stderr)
        return 2
    if want_help:
        print(__doc__)
        print(format_help(cfg))
        return 0
    plan = make_plan(cfg, world_size, source)
    print(format_plan(plan, path or "defaults"), flush=True)
    return 2 if plan.problems else 0


if __name__ == "__main__":
    sys.exit(main())
