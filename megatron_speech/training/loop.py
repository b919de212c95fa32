"""The training loop that pre-training and fine-tuning share, and what each of them supplies to it (a TrainUnit).

    unit = PretrainUnit(...)                       # the model, its trainer, the step, the evaluation
    step, loader_state = restore(cfg.train, resume_from, unit, ema, monitor)
    loader = build_..._loader(..., loader_state)
    exit_code = Loop(cfg, unit, loader, ema, monitor, stop, progress).run(step)

The loop owns what both must do alike: the scheduler and EMA after an update, the throughput clock and the
metrics line, the divergence checks, evaluation (and again with the EMA weights swapped in; none before
train.validate_after_steps), the best train.best_metric and early stopping on it, the best checkpoint
(train.keep_best: checkpoint/best.py), the interval / signal / final saves and the exit code (training/signals.py).
A unit owns what differs: what happens before a step (the Gumbel temperature; unfreezing the encoder), the step
itself, the evaluation, what it logs, and the extra state it keeps in a checkpoint. The pattern is fairseq2's
TrainUnit; megatron-core has no loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from megatron_speech.checkpoint.best import mark_best, reconcile
from megatron_speech.checkpoint.checkpointing import BEST, SaveError, checkpoint_dir, load_checkpoint, save_checkpoint
from megatron_speech.config import config_to_dict
from megatron_speech.training.ema import EMA
from megatron_speech.training.monitor import Monitor
from megatron_speech.training.parallelize import sync_params
from megatron_speech.training.signals import (
    EXIT_DIVERGED,
    EXIT_DONE,
    EXIT_PREEMPTED,
    EXIT_SAVE_FAILED,
    StopSignal,
    stop_signals_blocked,
)

logger = logging.getLogger("megatron_speech")


class TrainUnit:
    """One kind of training, as the loop sees it. `ddp`, `optimizer` and `scheduler` are the current trainer: a
    unit may replace them in `before_step` (fine-tuning does when the encoder unfreezes); the loop reads them anew
    every step and at every save."""

    ddp: Any
    optimizer: Any
    scheduler: Any
    has_evaluation: bool = False
    evaluate_at_end: bool = False  # also evaluate the last step when it is off the evaluation interval

    def before_step(self, step: int) -> None:
        """Called with the number of steps done so far, before the next one."""

    def train_step(self, batches: list[dict[str, Any]], stop: bool) -> dict[str, Any]:
        """Forward, backward and optimizer step (training/step.py's contract: loss, finite, nonfinite, updated,
        grad_norm, num_samples, stop)."""
        raise NotImplementedError

    def train_values(self, out: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """(the unit's own metrics.jsonl fields of a train step, its part of the console line)."""
        return {}, f"loss {out['loss']:.4f}"

    def evaluate(self) -> dict[str, float]:
        """Metrics on the validation data with the weights as they are (a collective)."""
        raise NotImplementedError

    def eval_values(self, step: int, metrics: dict[str, float]) -> tuple[dict[str, Any], str, dict[str, float]]:
        """After an evaluation: (fields added to its metrics.jsonl lines, the console text, what the best metric,
        early stopping and the alarms watch: Monitor.check_eval)."""
        return {}, " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), metrics

    def state_dict(self) -> dict[str, Any]:
        """Extra state a checkpoint keeps for this unit (beside the loader's, the monitor's and the config)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        """After the loop ended (e.g. report the best evaluation)."""


def restore(train_cfg, resume_from: int | None, unit: TrainUnit, ema: EMA, monitor: Monitor
            ) -> tuple[int, dict[str, Any] | None]:
    """Load the checkpoint of step `resume_from` (None: a fresh run) into the unit's trainer, the EMA, the monitor
    and the unit, and point <save_dir>/best at the resumed run's best (checkpoint/best.py reconcile); returns (the
    step to continue from, the loader's state)."""
    if resume_from is None:
        return 0, None
    path = checkpoint_dir(train_cfg.save_dir, resume_from)
    state = load_checkpoint(path, unit.ddp, unit.optimizer, unit.scheduler, ema)
    monitor.load_state_dict(state["monitor"])
    unit.load_state_dict(state)
    reconcile(train_cfg.save_dir, state["step"], monitor.best["step"], train_cfg.keep_best, train_cfg.keep_last)
    logger.info("resumed from %s", path)
    return state["step"], state["loader"]


class Loop:
    """Runs a TrainUnit to train.max_steps, an early stop, a divergence or a stop signal; `run` returns the exit
    code and keeps progress["step"] at the last completed step (training/driver.py reports it if a peer fails)."""

    def __init__(self, cfg, unit: TrainUnit, loader, ema: EMA, monitor: Monitor, stop: StopSignal,
                 progress: dict[str, int]):
        self.cfg, self.t, self.unit, self.loader = cfg, cfg.train, unit, loader
        self.ema, self.monitor, self.stop, self.progress = ema, monitor, stop, progress
        self.saves = SavePolicy(cfg.train, monitor, self._write, stop,
                                lambda step: mark_best(self.t.save_dir, step, self.t.keep_last))

    def _write(self, step: int, reshardable: bool) -> None:
        u = self.unit
        sync_params(u.ddp)
        save_checkpoint(self.t.save_dir, step, u.ddp, u.optimizer, u.scheduler, self.ema,
                        {"loader": self.loader.state_dict(), "monitor": self.monitor.state_dict(), **u.state_dict(),
                         "config": config_to_dict(self.cfg)}, keep_last=self.t.keep_last, reshardable=reshardable)

    def _evaluate(self) -> dict[str, float]:
        sync_params(self.unit.ddp)  # the weights the evaluation reads must be current (parallelize.sync_params)
        return self.unit.evaluate()

    def evaluation_due(self, step: int) -> bool:
        t = self.t
        return self.unit.has_evaluation and t.eval_interval > 0 and step % t.eval_interval == 0 and \
            step >= t.validate_after_steps

    def validate(self, step: int) -> tuple[int, str] | None:
        """Evaluate (then with the EMA weights); keep a new best's checkpoint (train.keep_best). (exit code,
        reason) when the run must end (early stopping, after its save; a failed best save under
        train.on_save_error=stop), else None."""
        metrics = self._evaluate()
        tags, shown, watched = self.unit.eval_values(step, metrics)
        self.monitor.write(step, "valid", {**metrics, **tags})
        logger.info("step %7d | valid %s", step, shown)
        if self.ema.enabled:
            backup = self.ema.copy_to()
            self.monitor.write(step, "valid_ema", {**self._evaluate(), **tags})
            self.ema.restore(backup)
        why = self.monitor.check_eval(step, watched)
        if why:
            return self.saves.early_stop(step, why)
        if self.t.keep_best and self.monitor.best["step"] == step:
            return self.saves.save_best(step)
        return None

    def run(self, step: int) -> int:
        try:
            return self._run(step)
        finally:
            # Stop the DataLoader workers now. Left to interpreter exit, multiprocessing terminates them with SIGTERM,
            # which they ignore (Slurm signals every process of the step: data/stream.py), and joins them forever.
            self.loader.close()

    def _run(self, step: int) -> int:
        t, unit, monitor, saves = self.t, self.unit, self.monitor, self.saves
        exit_code, reason, evaluated_at = EXIT_DONE, f"reached train.max_steps={t.max_steps}", None
        while step < t.max_steps:
            unit.before_step(step)
            out = unit.train_step(next(self.loader), self.stop.requested_here)
            step = self.progress["step"] = step + 1
            if out["updated"]:
                unit.scheduler.step(increment=1)
                if self.ema.enabled:
                    sync_params(unit.ddp)
                    self.ema.update()
            loss_scale = float(unit.optimizer.get_loss_scale())
            values, shown = unit.train_values(out)
            monitor.train_step(step, out, unit.optimizer.param_groups[0]["lr"], loss_scale, values, shown)
            why = monitor.check_step(out, loss_scale, step)
            if why:  # keep the last good checkpoint as `latest`: nothing worth saving now
                exit_code, reason = EXIT_DIVERGED, why
                break
            if self.evaluation_due(step):
                evaluated_at = step
                ending = self.validate(step)
                if ending:
                    exit_code, reason = ending
                    break
            ending = saves.after_step(step, out["stop"])
            if ending:
                exit_code, reason = ending
                break
        if exit_code == EXIT_DONE and unit.has_evaluation and unit.evaluate_at_end and evaluated_at != step:
            exit_code, reason = self.validate(step) or (exit_code, reason)
        exit_code, reason = saves.finish(step, exit_code, reason)
        unit.finish()
        best = monitor.best
        if best["step"] is not None:
            kept = f" (checkpoint: {self.t.save_dir}/{BEST})" if t.keep_best else ""
            logger.info("best valid %s: %.4f at step %d%s", best["metric"], best["value"], best["step"], kept)
        logger.info("stopping at step %d: %s (exit %d)", step, reason, exit_code)
        monitor.close()
        return exit_code


class SavePolicy:
    """When the loop saves and how it ends: a save every train.save_interval steps (a failure stops the run or is
    only alarmed, train.on_save_error), a save at a new best evaluation (train.keep_best), a save before leaving on
    a stop signal (exit 75) or on early stopping, and a final save; never two at one step. `write(step,
    reshardable)` writes the checkpoint (checkpointing.save_checkpoint) and raises SaveError on failure, the same on
    every rank; `mark_best(step)` points <save_dir>/best at a saved step (best.mark_best; SaveError likewise). The
    run's last checkpoint (train.max_steps or early stop) is written reshardable, loadable at another TP size too;
    the others in the fast per-DP-shard format."""

    def __init__(self, train_cfg, monitor, write: Callable[[int, bool], None], stop: StopSignal | None = None,
                 mark_best: Callable[[int], None] | None = None):
        self.t, self.monitor, self._write, self._mark_best = train_cfg, monitor, write, mark_best
        self.stop = stop if stop is not None else StopSignal(train_cfg.exit_on_signal)
        self.saved_at: int | None = None

    def save(self, step: int, reshardable: bool = False) -> bool:
        """Save at `step`; False (after an alarm) when the save failed on some rank."""
        try:
            # Blocked while writing: megatron's writer Manager (spawned by the first save) and its per-save writer
            # processes inherit the block and outlive Slurm's USR1/TERM; a signal that lands now is handled after.
            with stop_signals_blocked():
                self._write(step, reshardable)
        except SaveError as e:
            self.monitor.alarm(step, f"checkpoint save failed: {e}")
            return False
        logger.info("saved %s", checkpoint_dir(self.t.save_dir, step))
        self.saved_at = step
        return True

    def early_stop(self, step: int, why: str) -> tuple[int, str]:
        """(exit code, reason) for a run that stops on an evaluation (`why`), after saving it."""
        return (EXIT_DONE, why) if self.saved_at == step or self.save(step, reshardable=True) else \
            (EXIT_SAVE_FAILED, f"{why}; but its checkpoint save failed")

    def save_best(self, step: int) -> tuple[int, str] | None:
        """A new best evaluation at `step`: its checkpoint (unless this step's is saved already), then the `best`
        marker, signals blocked throughout (a USR1 now is served after, by the stop save of this step, which is
        then already done). A failure is alarmed, and ends the run under train.on_save_error=stop; the marker keeps
        naming the previous best, which is kept."""
        if self.saved_at != step and not self.save(step, reshardable=step >= self.t.max_steps):
            return self._failed("the best checkpoint's save failed")
        try:
            with stop_signals_blocked():
                self._mark_best(step)
        except SaveError as e:
            self.monitor.alarm(step, f"naming the best checkpoint failed: {e}")
            return self._failed("naming the best checkpoint failed")
        logger.info("best: %s", checkpoint_dir(self.t.save_dir, step))
        return None

    def _failed(self, what: str) -> tuple[int, str] | None:
        return (EXIT_SAVE_FAILED, f"{what} (train.on_save_error=stop)") if self.t.on_save_error == "stop" else None

    def after_step(self, step: int, stop: bool) -> tuple[int, str] | None:
        """The interval save, then the stop signal (`stop`: the ranks' agreed decision, the step's out["stop"]):
        (exit code, reason) when the loop must end now, else None."""
        t = self.t
        if t.save_interval > 0 and step % t.save_interval == 0 and self.saved_at != step and \
                not self.save(step, reshardable=step >= t.max_steps) and t.on_save_error == "stop":
            return EXIT_SAVE_FAILED, "the checkpoint save failed (train.on_save_error=stop)"
        if stop:
            if self.saved_at == step or self.save(step):
                return EXIT_PREEMPTED, f"stop signal ({self.stop.signal_name or 'on another rank'})"
            return EXIT_SAVE_FAILED, "stop signal; but its checkpoint save failed"
        return None

    def finish(self, step: int, exit_code: int, reason: str) -> tuple[int, str]:
        """A run that completed saves its last step unless it just did."""
        if exit_code == EXIT_DONE and self.saved_at != step and not self.save(step, reshardable=True):
            return EXIT_SAVE_FAILED, f"{reason}; but the final save failed"
        return exit_code, reason
