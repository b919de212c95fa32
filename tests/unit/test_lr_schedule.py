"""optim.lr_schedule: fairseq's tri_stage on megatron-core's scheduler, against fairseq's formula restated here;
linear stays megatron's; resume and the fine-tuning rebuild give the same lrs; bad settings name their key."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_speech.training.optim import build_scheduler, optimizer_config
from tests.fixtures import tiny_config


def fairseq_tri_stage(lr: float, max_update: int, phase_ratio, init_lr_scale: float, final_lr_scale: float):
    """fairseq/optim/lr_scheduler/tri_stage_lr_scheduler.py (TriStageLRSchedule.step_update), restated: the lr
    after `num_updates` updates."""
    peak, init, final = lr, init_lr_scale * lr, final_lr_scale * lr
    warmup, hold, decay = (int(max_update * r) for r in phase_ratio)
    warmup_rate = (peak - init) / warmup if warmup != 0 else 0
    decay_factor = -math.log(final_lr_scale) / decay

    def at(num_updates: int) -> float:
        if num_updates < warmup:
            return init + warmup_rate * num_updates
        offset = warmup
        if num_updates < offset + hold:
            return peak
        offset += hold
        if num_updates <= offset + decay:
            return peak * math.exp(-decay_factor * (num_updates - offset))
        return final

    return at


def _optimizer(cfg=None):
    """A torch Adam whose param group carries max_lr / min_lr as megatron-core's get_megatron_optimizer sets them
    from our OptimizerConfig (the scheduler reads them per group)."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    if cfg is not None:
        config = optimizer_config(cfg.optim, cfg.train, cfg.parallel)
        optimizer.param_groups[0].update(max_lr=config.lr, min_lr=config.min_lr)
    return optimizer


def _cfg(*overrides: str):
    return tiny_config(*overrides)


def _lrs(scheduler, n: int) -> list[float]:
    out = [scheduler.optimizer.param_groups[0]["lr"]]
    for _ in range(n):
        scheduler.step(increment=1)
        out.append(scheduler.optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("max_steps, ratio, init, final", [
    (13_000, (0.1, 0.4, 0.5), 0.01, 0.05),   # fairseq's vox_10m / vox_1h
    (1_003, (0.1, 0.4, 0.5), 0.01, 0.05),    # phases that do not divide evenly
    (500, (0.0, 0.3, 0.7), 0.01, 0.01),      # no warmup
    (400, (0.25, 0.0, 0.75), 0.1, 0.2),      # no hold
])
def test_tri_stage_is_fairseqs_formula_at_every_step(max_steps, ratio, init, final):
    cfg = _cfg("optim.lr_schedule=tri_stage", "optim.lr=3e-4", f"optim.phase_ratio={list(ratio)}",
               f"optim.init_lr_scale={init}", f"optim.final_lr_scale={final}", f"train.max_steps={max_steps}")
    expected = fairseq_tri_stage(3e-4, max_steps, ratio, init, final)
    warmup, hold, _ = (int(max_steps * r) for r in ratio)
    # every step around the phase boundaries and the decay's end, every 7th elsewhere, then beyond the end
    edges = {b + d for b in (0, warmup, warmup + hold, max_steps) for d in range(-3, 4)}
    steps = sorted({n for n in range(0, max_steps + 20, 7)} | {n for n in edges if n >= 0})
    scheduler, done, got = build_scheduler(_optimizer(cfg), cfg.optim, cfg.train.max_steps), 0, []
    for n in steps:
        scheduler.step(increment=n - done)
        done = n
        got.append(lr := scheduler.optimizer.param_groups[0]["lr"])
        assert lr == pytest.approx(expected(n), rel=1e-12, abs=0), n
    assert got[0] == pytest.approx(init * 3e-4 if warmup else 3e-4) and got[-1] == pytest.approx(final * 3e-4)
    if hold:
        assert got[steps.index(warmup)] == got[steps.index(warmup + hold - 1)] == 3e-4


def test_linear_default_is_megatrons_scheduler_unchanged():
    cfg = _cfg("optim.lr=1e-3", "optim.warmup_steps=10", "optim.decay_steps=100", "optim.min_lr=1e-5")
    assert cfg.optim.lr_schedule == "linear"
    ours = _lrs(build_scheduler(_optimizer(cfg), cfg.optim, cfg.train.max_steps), 130)
    megatron = OptimizerParamScheduler(_optimizer(), init_lr=0.0, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=10,
                                       lr_decay_steps=100, lr_decay_style="linear", start_wd=0.01, end_wd=0.01,
                                       wd_incr_steps=100, wd_incr_style="constant")
    assert ours == _lrs(megatron, 130)
    # and a checkpoint of megatron's own scheduler (a run from before lr_schedule) resumes into ours
    resumed = build_scheduler(_optimizer(cfg), cfg.optim, cfg.train.max_steps)
    resumed.load_state_dict(megatron.state_dict())
    assert resumed.optimizer.param_groups[0]["lr"] == ours[130]


def test_resume_and_the_finetuning_rebuild_give_the_same_lrs():
    cfg = _cfg("optim.lr_schedule=tri_stage", "optim.lr=1e-4", "train.max_steps=200")
    whole = _lrs(build_scheduler(_optimizer(cfg), cfg.optim, 200), 200)
    for k in (0, 7, 20, 21, 99, 100, 150, 200):  # mid-warmup, the boundaries, mid-decay, the end
        first = build_scheduler(_optimizer(cfg), cfg.optim, 200)
        _lrs(first, k)
        state = first.state_dict()
        resumed = build_scheduler(_optimizer(cfg), cfg.optim, 200)
        resumed.load_state_dict(state)
        assert [whole[k]] + _lrs(resumed, 200 - k)[1:] == whole[k:]
        rebuilt = build_scheduler(_optimizer(cfg), cfg.optim, 200)  # finetune_unit.build_trainer's unfreeze
        rebuilt.step(increment=k)
        assert rebuilt.optimizer.param_groups[0]["lr"] == whole[k]
    # the checkpoint's schedule wins over a changed config (megatron's use_checkpoint_opt_param_scheduler)
    longer = build_scheduler(_optimizer(), _cfg("optim.lr_schedule=tri_stage", "optim.lr=1e-4").optim, 400)
    longer.load_state_dict(state)
    assert longer.optimizer.param_groups[0]["lr"] == whole[200]


def test_resuming_under_another_schedule_names_the_key():
    tri = build_scheduler(_optimizer(), _cfg("optim.lr_schedule=tri_stage").optim, 100)
    linear = build_scheduler(_optimizer(), _cfg().optim, 100)
    with pytest.raises(ValueError, match="optim.lr_schedule=linear: resume with optim.lr_schedule=tri_stage"):
        linear.load_state_dict(tri.state_dict())
    with pytest.raises(ValueError, match="optim.lr_schedule=tri_stage: resume with optim.lr_schedule=linear"):
        tri.load_state_dict(linear.state_dict())


@pytest.mark.parametrize("overrides, message", [
    (["optim.phase_ratio=[0.1, 0.4, 0.4]"], r"optim\.phase_ratio=\[0\.1, 0\.4, 0\.4\].*sum to 1 \(they sum to 0\.9\)"),
    (["optim.phase_ratio=[-0.1, 0.6, 0.5]"], r"optim\.phase_ratio=.*must be >= 0"),
    (["optim.final_lr_scale=0"], r"optim\.final_lr_scale=0\.0 must be in \(0, 1\]"),
    (["optim.init_lr_scale=2"], r"optim\.init_lr_scale=2\.0 must be in \(0, 1\]"),
    (["optim.lr_schedule=tri_stage", "train.max_steps=3", "optim.phase_ratio=[0.5, 0.4, 0.1]"],
     r"optim\.phase_ratio=.* gives 0 decay steps of train\.max_steps=3"),
    (["optim.lr_schedule=cosine"], r"optim\.lr_schedule"),
])
def test_bad_schedule_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        _cfg(*overrides)
