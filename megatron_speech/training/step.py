"""One training step: micro-batches through megatron-core's forward_backward_no_pipelining with per-token
loss normalization (the loss function returns a sum and the masked-frame count; finalize_model_grads divides
the summed gradients by the global count), then the optimizer."""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
from megatron.core.utils import get_attr_wrapped_model

from megatron_speech.parallel.initialize import compute_device

# Per micro-batch statistics, summed over micro-batches and every rank (TP and DP) to get global totals.
STATS = ("loss_sum", "contrastive_sum", "num_masked", "accuracy_sum", "diversity_x_count",
         "code_perplexity_x_count", "num_samples", "num_frames")


def loss_func(batch_size: tuple[float, float], output) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """megatron's 3-tuple form: (loss sum on this rank, masked frames of the TP group, stats to log)."""
    # Each rank reports sums over its own masked frames, group quantities weighted by its own count, and its
    # share of the (TP-replicated) batch size, so a plain sum over all ranks gives global totals.
    local = output.local_count
    stats = torch.stack([
        output.loss.detach().float(),
        output.contrastive.float(),
        local,
        output.accuracy_sum,
        output.diversity * local,
        output.code_perplexity * local,
        local.new_tensor(batch_size[0]),
        local.new_tensor(batch_size[1]),
    ])
    return output.loss, output.num_masked, {"stats": stats}


def to_device(batch: dict[str, Any], device: torch.device | None = None) -> dict[str, Any]:
    """The batch's tensors on `device` (default: this rank's compute device); other values (ids, texts) as they
    are. non_blocking: a batch the loader pinned copies while the GPU works."""
    device = compute_device() if device is None else device
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_step(batch_iterator: Iterator[dict[str, Any]], model):
    """Reads one micro-batch: waveform [B, T] positionally (Float16Module casts positional inputs only), the
    integer masks and distractor indices by keyword."""
    batch = to_device(next(batch_iterator))
    tp = get_attr_wrapped_model(model, "tp_group").size()
    output = model(batch["waveform"], mask=batch["mask"], negatives=batch["negatives"],
                   channel_mask=batch.get("channel_mask"))
    size = (batch["waveform"].numel() / tp, batch["mask"].numel() / tp)
    return output, partial(loss_func, size)


def run_micro_batches(model, batches: list[dict[str, Any]], forward_only: bool = False,
                      forward_step_func=forward_step) -> torch.Tensor:
    """Forward (and backward) over micro-batches; returns this rank's summed stats (pre-training's STATS unless
    another forward_step_func, e.g. fine-tuning's, reports others)."""
    stored = forward_backward_no_pipelining(
        forward_step_func=forward_step_func,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=0,  # unused: variable lengths
        micro_batch_size=0,
        forward_only=forward_only,
    )
    return torch.stack([s["stats"] for s in stored]).sum(0)


def global_stats(stats: torch.Tensor) -> dict[str, float]:
    """All-reduce a STATS vector over every rank and turn it into per-frame metrics."""
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
        "mask_fraction": s["num_masked"] / max(s["num_frames"], 1.0),
        "num_masked": s["num_masked"],
        "num_samples": s["num_samples"],
    }


def train_step(model, optimizer, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Forward/backward over this DP rank's micro-batches, then one optimizer step, unless the global loss or a
    gradient is not finite (the step is skipped on every rank: the decision comes from all-reduced numbers).
    Returns the global metrics, whether the update happened (fp16 overflow also skips it), the grad norm, and
    `nonfinite`: None, "loss" or "gradient" (what made the step skip)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = global_stats(run_micro_batches(model, batches))
    return {**metrics, **apply_update(model, optimizer, metrics["loss"])}


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
