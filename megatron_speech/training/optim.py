"""megatron-core's optimizer (Adam, distributed across DP ranks, fp16 loss scaling) and its parameter
scheduler: megatron's "linear" (linear warmup, then polynomial decay of power 1), or fairseq's tri_stage added
to it as one more decay style (ParamScheduler)."""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_speech.compat.megatron_core import patch_torch_adam_state_restore
from megatron_speech.config import OptimConfig, ParallelConfig, TrainConfig

TRI_STAGE = "tri_stage"


def optimizer_config(optim: OptimConfig, train: TrainConfig, parallel: ParallelConfig) -> OptimizerConfig:
    """megatron-core's optimizer settings. Its param groups carry max_lr = lr and min_lr, which the scheduler reads
    per group: min_lr is the schedule's floor (tri_stage: final_lr_scale x lr)."""
    return OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.final_lr_scale * optim.lr if optim.lr_schedule == TRI_STAGE else optim.min_lr,
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


def build_optimizer(model, optim: OptimConfig, train: TrainConfig, parallel: ParallelConfig):
    """Adam with weight decay off for biases and norms (megatron's standard overrides), clipping, and
    megatron's dynamic loss scaler under fp16."""
    config = optimizer_config(optim, train, parallel)
    patch_torch_adam_state_restore()  # megatron-core 0.16.1 torch-Adam fallback bug (compat)
    optimizer = get_megatron_optimizer(config, [model])
    # megatron's schedules multiply the loss by config.grad_scale_func before backward, and the optimizer divides
    # the gradients by the loss scale: without the hook fp16 gradients come out 1/scale of their value (Adam's eps
    # then dominates, clipping never fires, the grad norm is wrong). Megatron-LM's training.py sets it the same
    # way; for fp32/bf16 the scale is 1. Every optimizer rebuild (fine-tuning's unfreeze) re-points it.
    model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


class ParamScheduler(OptimizerParamScheduler):
    """megatron-core's scheduler with one more lr_decay_style, "tri_stage" (fairseq's TriStageLRSchedule, written
    here because megatron-core has no hold phase nor exponential decay to a floor). Its three phases map onto
    megatron's fields: warm up linearly from init_lr to max_lr over lr_warmup_steps, hold max_lr for hold_steps,
    decay exponentially to min_lr at lr_decay_steps (= warmup + hold + decay), then min_lr. num_steps counts the
    updates done, as fairseq's step_update(num_updates), so the lr of update n+1 is fairseq's. state_dict, resume
    (checkpoint values win, megatron's use_checkpoint_opt_param_scheduler) and step(increment=n) are megatron's.
    Other styles are megatron's own."""

    def __init__(self, optimizer, *, hold_steps: int = 0, **kwargs):
        self.hold_steps = hold_steps  # before super().__init__: it sets the first lr
        super().__init__(optimizer, **kwargs)

    def get_lr(self, param_group: dict) -> float:
        if self.lr_decay_style != TRI_STAGE:
            return super().get_lr(param_group)
        max_lr, min_lr = param_group.get("max_lr", self.max_lr), param_group.get("min_lr", self.min_lr)
        n, warmup, hold_end = self.num_steps, self.lr_warmup_steps, self.lr_warmup_steps + self.hold_steps
        if n < warmup:
            return self.init_lr + (max_lr - self.init_lr) * n / warmup
        if n < hold_end:
            return max_lr
        if n <= self.lr_decay_steps and max_lr > 0:
            # fairseq: peak x exp(-decay_factor x t), decay_factor = -log(final_lr_scale) / decay_steps
            return max_lr * math.exp(math.log(min_lr / max_lr) * (n - hold_end) / (self.lr_decay_steps - hold_end))
        return min_lr

    def state_dict(self) -> dict:
        return {**super().state_dict(), "hold_steps": self.hold_steps, "init_lr": self.init_lr}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("lr_decay_style")
        if saved != self.lr_decay_style:
            raise ValueError(f"the checkpoint's learning-rate schedule is {_schedule_name(saved)} but this run's "
                             f"optim.lr_schedule={_schedule_name(self.lr_decay_style)}: resume with "
                             f"optim.lr_schedule={_schedule_name(saved)}")
        # before super(): its last act is step(), which computes the lr from these
        self.hold_steps = self._check_and_set(self.hold_steps, state_dict.get("hold_steps", 0), "hold steps")
        self.init_lr = self._check_and_set(self.init_lr, state_dict.get("init_lr", self.init_lr), "initial lr")
        super().load_state_dict(state_dict)


def _schedule_name(style: str | None) -> str:
    return TRI_STAGE if style == TRI_STAGE else "linear"


def tri_stage_steps(optim: OptimConfig, max_steps: int) -> tuple[int, int, int]:
    """(warmup, hold, decay) steps: fairseq's int(max_update x ratio) of each phase_ratio."""
    return tuple(int(max_steps * r) for r in optim.phase_ratio)  # type: ignore[return-value]


def build_scheduler(optimizer, optim: OptimConfig, max_steps: int = 0) -> ParamScheduler:
    """optim.lr_schedule over the run's train.max_steps (needed by tri_stage, whose phases are fractions of it)."""
    wd = {"start_wd": optim.weight_decay, "end_wd": optim.weight_decay, "wd_incr_style": "constant"}
    if optim.lr_schedule == TRI_STAGE:
        if max_steps <= 0:
            raise ValueError("optim.lr_schedule=tri_stage needs train.max_steps (its phases are fractions of it)")
        warmup, hold, decay = tri_stage_steps(optim, max_steps)
        return ParamScheduler(optimizer, hold_steps=hold, init_lr=optim.init_lr_scale * optim.lr, max_lr=optim.lr,
                              min_lr=optim.final_lr_scale * optim.lr, lr_warmup_steps=warmup,
                              lr_decay_steps=warmup + hold + decay, lr_decay_style=TRI_STAGE,
                              wd_incr_steps=warmup + hold + decay, **wd)
    if optim.decay_power != 1.0:
        raise ValueError(f"optim.decay_power={optim.decay_power}: megatron-core's scheduler decays linearly "
                         "(power 1); other powers are not supported")
    return ParamScheduler(optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr,
                          lr_warmup_steps=optim.warmup_steps, lr_decay_steps=optim.decay_steps,
                          lr_decay_style="linear", wd_incr_steps=optim.decay_steps, **wd)
