"""What the loop reports and watches: metrics (console, JSONL, wandb), early stopping, and the alarms users
asked fairseq for (code-perplexity collapse, fp16 loss scale at its floor, NaN/inf losses in a row).
megatron-core has none of these: written here."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from megatron_speech.common.audio import SAMPLE_RATE
from megatron_speech.config.rules import best_metric

logger = logging.getLogger("megatron_speech")


class Monitor:
    """Rank 0 writes; every rank keeps the same counters (they are fed all-reduced numbers), so every rank
    takes the same stop decisions at the same step."""

    def __init__(self, cfg, rank: int, num_codes: int):
        self.cfg, self.rank, self.num_codes = cfg, rank, num_codes
        t = cfg.train
        self.metrics_path = Path(t.save_dir) / cfg.logging.metrics_file
        self.best_name, self.higher_is_better = best_metric(cfg)
        self.best: dict[str, Any] = {"metric": self.best_name, "step": None, "value": None}
        self.evals_without_improvement = 0
        self.low_perplexity_evals = 0
        self.bad_steps = 0
        self.nonfinite_steps = 0
        self.floor_steps = 0
        self._wandb = None
        self._last_time = time.perf_counter()
        self._samples = 0.0
        if rank == 0:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            if cfg.logging.wandb:
                os.environ.setdefault("WANDB_MODE", cfg.logging.wandb_mode)
                import wandb

                from megatron_speech.config import config_to_dict
                from megatron_speech.training.signals import stop_signals_blocked

                # wandb.init starts its service (wandb-core, plus the resource tracker): started blocked, Slurm's
                # USR1 to the whole step leaves them alive. wandb-core is a Go program and unblocks SIGTERM, which
                # ends it: hence _wandb_call, so that a preempted run still saves.
                with stop_signals_blocked():
                    self._wandb = wandb.init(project=cfg.logging.wandb_project,
                                             name=cfg.logging.wandb_run_name or None, dir=t.save_dir,
                                             config=config_to_dict(cfg), resume="allow")

    # ---- logging -----------------------------------------------------------------------------------------

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in values.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._wandb_call("log", {f"{split}/{k}": v for k, v in record.items() if k not in ("step", "split")},
                         step=step)

    def train_step(self, step: int, out: dict[str, Any], lr: float, loss_scale: float, values: dict[str, Any],
                   shown: str) -> None:
        """Every train.log_interval steps: a metrics line (the loop's fields, then the unit's `values`) and the
        console line (`shown` is the unit's part). Throughput counts the audio of every step since the last line."""
        self._samples += out["num_samples"]
        if step % self.cfg.train.log_interval:
            return
        now = time.perf_counter()
        rate = self._samples / SAMPLE_RATE / max(now - self._last_time, 1e-9)
        self._last_time, self._samples = now, 0.0
        grad_norm = float(out["grad_norm"]) if out["grad_norm"] is not None else float("nan")
        self.write(step, "train", {"loss": out["loss"], **values, "lr": lr, "grad_norm": grad_norm,
                                   "loss_scale": loss_scale, "audio_seconds_per_second": rate,
                                   "skipped": not out["updated"], "nonfinite": out.get("nonfinite"),
                                   "nonfinite_steps": self.nonfinite_steps + (not out["finite"])})  # counted next
        if self.rank == 0:
            logger.info("step %7d | %s | lr %.3e | gnorm %.3f | scale %g | %.0f audio-s/s", step, shown, lr,
                        grad_norm, loss_scale, rate)

    # ---- decisions (same inputs on every rank -> same answers) ---------------------------------------------

    def check_step(self, out: dict[str, Any], loss_scale: float, step: int | None = None) -> str | None:
        """A reason to stop now, or None. Counts (and logs) the steps skipped for a NaN/inf loss or gradient."""
        t = self.cfg.train
        if out["finite"]:
            self.bad_steps = 0
        else:
            cause = out.get("nonfinite") or "loss"
            self.bad_steps += 1
            self.nonfinite_steps += 1
            if self.rank == 0:
                logger.warning("step %s skipped: NaN/inf %s (%d in a row, %d in this run so far)", step, cause,
                               self.bad_steps, self.nonfinite_steps)
            if self.bad_steps >= t.max_bad_steps:
                return (f"{self.bad_steps} steps in a row with a NaN/inf {cause}, the last at step {step} "
                        f"(train.max_bad_steps={t.max_bad_steps}). Likely cause: {_LIKELY_CAUSE[cause]}")
        if t.precision == "fp16" and t.loss_scale_floor_steps > 0:
            self.floor_steps = self.floor_steps + 1 if loss_scale <= t.min_loss_scale else 0
            if self.floor_steps >= t.loss_scale_floor_steps:
                return (f"the fp16 loss scale sat at its floor ({t.min_loss_scale:g}) for {self.floor_steps} steps: "
                        "gradients overflow even unscaled. Train in bf16 (train.precision=bf16), or lower the lr")
        return None

    def check_eval(self, step: int, metrics: dict[str, float]) -> str | None:
        """Keeps the best train.best_metric (`best`: its step and value; a tie is no improvement) and stops early
        on it: a reason to stop (after saving), or None. Also raises the collapse alarm."""
        t = self.cfg.train
        floor = t.perplexity_floor_fraction * self.num_codes
        if t.perplexity_floor_evals > 0:
            self.low_perplexity_evals = self.low_perplexity_evals + 1 if metrics["code_perplexity"] < floor else 0
            if self.low_perplexity_evals >= t.perplexity_floor_evals:
                self.alarm(step, f"codebook collapse: code perplexity {metrics['code_perplexity']:.1f} below "
                                 f"{floor:.1f} ({t.perplexity_floor_fraction:g} x {self.num_codes} codes) for "
                                 f"{self.low_perplexity_evals} evaluations")
        value, best = float(metrics[self.best_name]), self.best["value"]
        if math.isfinite(value) and (best is None or (value > best if self.higher_is_better else value < best)):
            self.best.update(step=step, value=value)
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        if t.early_stop_patience > 0 and self.evals_without_improvement >= t.early_stop_patience:
            return (f"early stopping: validation {self.best_name} has not improved on {self.best['value']:.4f} "
                    f"(step {self.best['step']}) for {self.evals_without_improvement} evaluations "
                    f"(train.early_stop_patience={t.early_stop_patience})")
        return None

    def alarm(self, step: int, message: str) -> None:
        if self.rank == 0:
            logger.warning("ALARM at step %d: %s", step, message)
            self.write(step, "alarm", {"message": message})
            self._wandb_call("alert", title="megatron-speech alarm", text=message)

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best), "evals_without_improvement": self.evals_without_improvement,
                "low_perplexity_evals": self.low_perplexity_evals, "bad_steps": self.bad_steps,
                "nonfinite_steps": self.nonfinite_steps, "floor_steps": self.floor_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        old_best = state.pop("best_valid", None)  # checkpoints from before train.best_metric: the best valid loss
        if old_best is not None and math.isfinite(old_best) and self.best_name == "loss":
            self.best.update(value=old_best)
        best = state.pop("best", None)
        if best is not None and best.get("metric") != self.best_name:
            # another train.best_metric than the checkpoint's run: its best says nothing about this one
            logger.warning("the checkpoint's best valid %s is not train.best_metric=%s: the best starts over",
                           best.get("metric"), self.best_name)
            state["evals_without_improvement"] = 0
        elif best is not None:
            self.best = dict(best)
        for k, v in state.items():
            setattr(self, k, v)

    def close(self) -> None:
        self._wandb_call("finish")

    def _wandb_call(self, method: str, *args, **kwargs) -> None:
        """wandb is a mirror of metrics.jsonl, never a reason to stop: when its service is gone (preemption's
        SIGTERM reaches every process of a Slurm step and ends wandb-core), warn once and go on without it."""
        if self._wandb is None:
            return
        try:
            getattr(self._wandb, method)(*args, **kwargs)
        except Exception as e:  # ConnectionResetError, wandb.Error, ...: whatever its transport raises
            logger.warning("wandb stopped working (%s: %s): metrics keep going to %s only; `wandb sync` what it "
                           "wrote so far", type(e).__name__, e, self.metrics_path)
            self._wandb = None


_LIKELY_CAUSE = {
    "loss": ("the forward pass: an input batch with NaN/inf samples (a damaged shard), weights already non-finite, "
             "or activations overflowing (under fp16: train.precision=bf16)"),
    "gradient": ("the backward pass overflowed while the loss stayed finite: lower optim.lr or lengthen "
                 "optim.warmup_steps"),
}


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def setup_logging(rank: int) -> None:
    """Our INFO lines on rank 0 only; megatron-core's chatter (per-shard index loading, optimizer config dumps)
    and the warnings every CPU run repeats (no TE/apex, deprecated collectives) stay out of the console."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                    ".*is deprecated. Please use `torch.distributed.*", ".*not a leaf Tensor is being accessed.*",
                    ".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
