"""megatron-core's optimizer (Adam, distributed across DP ranks, fp16 loss scaling) and its parameter
scheduler (linear warmup, then polynomial decay of power 1 = megatron's "linear")."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_speech.compat.megatron_core import patch_torch_adam_state_restore
from megatron_speech.config import OptimConfig, ParallelConfig, TrainConfig


def build_optimizer(model, optim: OptimConfig, train: TrainConfig, parallel: ParallelConfig):
    """Adam with weight decay off for biases and norms (megatron's standard overrides), clipping, and
    megatron's dynamic loss scaler under fp16."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        fp16=train.precision == "fp16",
        bf16=train.precision == "bf16",
        params_dtype=torch.float32,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
        initial_loss_scale=train.initial_loss_scale,
        min_loss_scale=train.min_loss_scale,
        loss_scale_window=train.loss_scale_window,
        hysteresis=train.loss_scale_hysteresis,
    )
    patch_torch_adam_state_restore()  # megatron-core 0.16.1 torch-Adam fallback bug (compat)
    optimizer = get_megatron_optimizer(config, [model])
    # megatron's schedules multiply the loss by config.grad_scale_func before backward, and the optimizer divides
    # the gradients by the loss scale: without the hook fp16 gradients come out 1/scale of their value (Adam's eps
    # then dominates, clipping never fires, the grad norm is wrong). Megatron-LM's training.py sets it the same
    # way; for fp32/bf16 the scale is 1. Every optimizer rebuild (fine-tuning's unfreeze) re-points it.
    model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(optimizer, optim: OptimConfig) -> OptimizerParamScheduler:
    if optim.decay_power != 1.0:
        raise ValueError(f"optim.decay_power={optim.decay_power}: megatron-core's scheduler decays linearly "
                         "(power 1); other powers are not supported")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=optim.decay_steps,
        lr_decay_style="linear",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=optim.decay_steps,
        wd_incr_style="constant",
    )
