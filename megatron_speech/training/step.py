"""One training step: micro-batches through megatron-core's forward_backward_no_pipelining, then the optimizer.

Loss normalization: the update is the mean over the masked frames of the whole global batch (fairseq divides the
summed InfoNCE by that count). The masks come with the batches, so one all-reduce before the step (`agree`, which
also carries the stop request) gives the global count N, and each micro-batch's loss sum is divided by N before
its backward. Dividing before backward rather than after (megatron's calculate_per_token_loss division in
finalize_model_grads) keeps backward magnitudes those of a mean loss: under fp16 a loss *sum* times the 2^16 loss
scale overflows on the first step of any real batch (per-frame gradients ~1/temperature = 10), and the overflow
threshold would move with the batch size. megatron's config keeps calculate_per_token_loss=True so that neither
the schedule (1/num_microbatches) nor DDP (1/dp) rescales; our finalize hook passes no token count."""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

from megatron_speech.parallel.initialize import compute_device

# Per micro-batch statistics computed on the device, summed over micro-batches and every rank (TP and DP).
STATS = ("loss_sum", "contrastive_sum", "num_masked", "accuracy_sum", "diversity_x_count", "code_perplexity_x_count")


def agree(local: list[float], stop: bool = False) -> tuple[list[float], bool]:
    """One all-reduce over every rank, before a step: this rank's host-side counts of its TP-replicated batches
    (each TP rank holds the same ones, hence the division by tp) become global totals, and its stop request
    (a signal) becomes whether any rank has one, so every rank stops after the same step."""
    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() \
        else 1
    values = torch.tensor([*local, 1.0 if stop else 0.0], dtype=torch.float64, device=compute_device())
    if dist.is_initialized():
        dist.all_reduce(values)
    *totals, stops = values.tolist()
    return [v / tp for v in totals], stops > 0


def batch_counts(batches: list[dict[str, Any]]) -> list[float]:
    """(masked frames, samples, frames) of this rank's micro-batches, read on the host (the loader's tensors)."""
    return [float(sum(int(b["mask"].sum()) for b in batches)), float(sum(b["waveform"].numel() for b in batches)),
            float(sum(b["mask"].numel() for b in batches))]


def loss_func(normalizer: float, output) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """megatron's 3-tuple form: (this rank's loss sum / the global masked count, masked frames of the TP group,
    stats to log)."""
    # Each rank reports sums over its own masked frames and group quantities weighted by its own count, so a
    # plain sum over all ranks gives global totals. All on the device: no host->device copy per micro-batch.
    local = output.local_count
    stats = torch.stack([
        output.loss.detach().float(),
        output.contrastive.float(),
        local,
        output.accuracy_sum,
        output.diversity * local,
        output.code_perplexity * local,
    ])
    return output.loss / normalizer, output.num_masked, {"stats": stats}


def to_device(batch: dict[str, Any], device: torch.device | None = None) -> dict[str, Any]:
    """The batch's tensors on `device` (default: this rank's compute device); other values (ids, texts) as they
    are. non_blocking: a batch the loader pinned copies while the GPU works."""
    device = compute_device() if device is None else device
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_step(batch_iterator: Iterator[dict[str, Any]], model, normalizer: float = 1.0):
    """Reads one micro-batch: waveform [B, T] positionally (Float16Module casts positional inputs only), the
    integer masks, distractor indices and LayerDrop's skipped layers (a host tuple) by keyword. `normalizer`: the
    global masked-frame count of the step."""
    batch = to_device(next(batch_iterator))
    output = model(batch["waveform"], mask=batch["mask"], negatives=batch["negatives"],
                   channel_mask=batch.get("channel_mask"), skip_layers=batch.get("skip_layers", ()))
    return output, partial(loss_func, normalizer)


def run_micro_batches(model, batches: list[dict[str, Any]], forward_only: bool = False,
                      forward_step_func=forward_step, normalizer: float = 1.0) -> torch.Tensor:
    """Forward (and backward) over micro-batches, each loss divided by `normalizer` (the step's global count);
    returns this rank's summed stats (pre-training's STATS unless another forward_step_func, e.g. fine-tuning's,
    reports others)."""
    stored = forward_backward_no_pipelining(
        forward_step_func=partial(forward_step_func, normalizer=normalizer),
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=0,  # unused: variable lengths
        micro_batch_size=0,
        forward_only=forward_only,
    )
    return torch.stack([s["stats"] for s in stored]).sum(0)


def global_stats(stats: torch.Tensor, samples: float, frames: float) -> dict[str, float]:
    """All-reduce a STATS vector over every rank and turn it into per-frame metrics; `samples` and `frames`: the
    global totals of the batches (from `agree`)."""
    stats = stats.clone()
    if dist.is_initialized():
        dist.all_reduce(stats)
    s = dict(zip(STATS, stats.tolist()))
    n = max(s["num_masked"], 1.0)
    return {
        "loss": s["loss_sum"] / n,
        "contrastive": s["contrastive_sum"] / n,
        "accuracy": s["accuracy_sum"] / n,
        "diversity": s["diversity_x_count"] / n,
        "code_perplexity": s["code_perplexity_x_count"] / n,
        "mask_fraction": s["num_masked"] / max(frames, 1.0),
        "num_masked": s["num_masked"],
        "num_samples": samples,
    }


def evaluate_batches(model, batches: list[dict[str, Any]]) -> dict[str, float]:
    """Metrics of a forward-only pass over `batches` (this rank's share; a collective)."""
    (_, samples, frames), _ = agree(batch_counts(batches))
    stats = run_micro_batches(model, batches, forward_only=True) if batches else \
        torch.zeros(len(STATS), device=compute_device())
    return global_stats(stats, samples, frames)


def train_step(model, optimizer, batches: list[dict[str, Any]], stop: bool = False) -> dict[str, Any]:
    """Forward/backward over this DP rank's micro-batches, then one optimizer step, unless the global loss or a
    gradient is not finite (the step is skipped on every rank: the decision comes from all-reduced numbers).
    `stop`: this rank was asked to stop (a signal); out["stop"] says whether any rank was, the same on all.
    Returns the global metrics, whether the update happened (fp16 overflow also skips it), the grad norm, and
    `nonfinite`: None, "loss" or "gradient" (what made the step skip)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    (masked, samples, frames), stop = agree(batch_counts(batches), stop)
    metrics = global_stats(run_micro_batches(model, batches, normalizer=max(masked, 1.0)), samples, frames)
    return {**metrics, **apply_update(model, optimizer, metrics["loss"]), "stop": stop}


def apply_update(model, optimizer, loss: float) -> dict[str, Any]:
    """The optimizer step after the gradients are reduced, skipped on every rank alike when the global `loss` or
    a gradient is not finite. Returns finite, nonfinite (None, "loss" or "gradient"), updated (fp16 overflow
    also skips) and the grad norm."""
    nonfinite = None if math.isfinite(loss) else "loss"
    if nonfinite is None and not _has_loss_scaler(optimizer) and not _grads_finite(model):
        nonfinite = "gradient"
    updated, grad_norm = False, None
    if nonfinite is None:
        updated, grad_norm, _ = optimizer.step()
    return {"finite": nonfinite is None, "nonfinite": nonfinite, "updated": bool(updated), "grad_norm": grad_norm}


def _has_loss_scaler(optimizer) -> bool:
    # fp16's dynamic scaler already skips a step with inf/NaN gradients (and backs the scale off: an overflow,
    # counted by the loss-scale floor policy, not as a bad step). Without one (fp32, bf16) megatron's optimizer
    # would apply them, and one NaN gradient makes every weight NaN for good.
    return any(getattr(opt, "grad_scaler", None) is not None
               for opt in getattr(optimizer, "chained_optimizers", [optimizer]))


def _grads_finite(model) -> bool:
    """Whether every rank's gradient buffers are finite (all-reduced). After finalize_model_grads a NaN in any
    rank's contribution sits in some rank's reduced shard, so checking each rank's whole buffer suffices."""
    # megatron's DDP keeps gradients in contiguous buffers (a plain module has its `buffers()` method there)
    buffers = [b for name in ("buffers", "expert_parallel_buffers") if isinstance(getattr(model, name, None), list)
               for b in getattr(model, name)]
    if buffers:  # one fp32 sum per buffer: NaN and inf propagate, and nothing gradient-sized is allocated
        bad = (~torch.stack([b.grad_data.sum(dtype=torch.float32) for b in buffers]).isfinite().all())
    else:
        bad = torch.tensor(not all(p.grad is None or bool(p.grad.isfinite().all()) for p in model.parameters()),
                           device=compute_device())
    bad = bad.to(torch.int32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())
