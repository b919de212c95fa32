"""One training step: micro-batches through megatron-core's forward_backward_no_pipelining with per-token
loss normalization (the loss function returns a sum and the masked-frame count; finalize_model_grads divides
the summed gradients by the global count), then the optimizer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

# Per micro-batch statistics, reduced by the trainer: sums over masked frames, and the group's count.
STATS = ("loss_sum", "contrastive_sum", "num_masked", "accuracy_sum", "diversity_x_count", "code_perplexity_x_count")


def loss_func(output) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """megatron's 3-tuple form: (loss sum on this rank, masked frames of the TP group, stats to log)."""
    # Each rank reports sums over its own masked frames, group quantities weighted by its own count, so a
    # plain sum over all ranks (TP and DP) and micro-batches gives global totals.
    local = output.local_count
    stats = torch.stack([
        output.loss.detach().float(),
        output.contrastive.float(),
        local,
        output.accuracy_sum,
        output.diversity * local,
        output.code_perplexity * local,
    ])
    return output.loss, output.num_masked, {"stats": stats}


def forward_step(batch_iterator: Iterator[dict[str, Any]], model):
    """Reads one micro-batch: waveform [B, T] positionally (Float16Module casts positional inputs only), the
    integer masks and distractor indices by keyword."""
    batch = next(batch_iterator)
    output = model(batch["waveform"], mask=batch["mask"], negatives=batch["negatives"],
                   channel_mask=batch.get("channel_mask"))
    return output, loss_func


def train_step(model, optimizer, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Forward/backward over this DP rank's micro-batches, then one optimizer step. Returns the summed stats
    of this rank, whether the update happened (fp16 overflow skips it) and the gradient norm."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    stored = forward_backward_no_pipelining(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=0,  # unused: variable lengths
        micro_batch_size=0,
        forward_only=False,
    )
    updated, grad_norm, _ = optimizer.step()
    stats = torch.stack([s["stats"] for s in stored]).sum(0)
    return {"stats": stats, "updated": bool(updated), "grad_norm": grad_norm}
