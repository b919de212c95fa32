"""Wraps a built model for training: mixed precision, megatron-core DDP, and the gradient finalization that
the time-sharded front-end needs. The one place where parallelism is applied to a model (torchtitan style)."""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module

from megatron_speech.compat.megatron_core import finalize_grads


def wrap_for_training(
    model: torch.nn.Module,
    use_distributed_optimizer: bool = True,
    overlap_grad_reduce: bool = False,
    bucket_size: int | None = None,
    overlap_param_gather: bool = False,
) -> DistributedDataParallel:
    """Float16Module (fp16/bf16 per the model's TransformerConfig) + megatron-core DDP; sets the config hooks
    megatron's schedules read (no_sync_func, finalize_model_grads_func)."""
    config = model.config
    local_params = model.local_params()
    tp_group = model.tp_group
    # Parameters applied to this rank's time slice have partial gradients: summed over TP exactly once.
    # megatron sums params marked `sequence_parallel` itself when SP is on; with SP off we do it in the same
    # place (after the DP reduction, before the optimizer), below.
    for p in local_params:
        p.sequence_parallel = True
    if config.fp16 or config.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
        bucket_size=bucket_size,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    # Every DP replica must start from the same weights: seeds are offset by DP rank (dropout must differ across
    # replicas), so each replica initialized its own. Broadcast DP rank 0's (megatron-core DDP's own helper).
    ddp.broadcast_params()
    config.no_sync_func = ddp.no_sync
    sum_local = tp_group.size() > 1 and not config.sequence_parallel
    config.finalize_model_grads_func = partial(finalize_grads, params=local_params if sum_local else [],
                                               tp_group=tp_group)
    return ddp


def sync_params(ddp) -> None:
    """Make the model's weights current. With parallel.overlap_param_gather the distributed optimizer leaves each
    updated weight shard on its owner rank until the next forward gathers the buckets one by one (overlapped with
    compute); whatever reads the weights before that (the EMA update, evaluation, a save, a rebuild of the wrapper)
    must gather them first, as Megatron-LM does before its saves. A no-op without the overlap."""
    if ddp.ddp_config.overlap_param_gather:
        ddp.start_param_sync(force_sync=True)
