"""What every training entry point shares (pretrain.py and finetune.py): forming the process groups, running the
loop and turning a failed peer into exit code 4 with a message (run_training), and the save / stop policy of the
loop (SavePolicy)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.distributed as dist

from megatron_speech.checkpoint.checkpointing import SaveError, checkpoint_dir, latest_step
from megatron_speech.parallel.faults import collective_failure_message, is_collective_failure
from megatron_speech.parallel.initialize import (
    destroy_parallel,
    env_from_slurm,
    initialize_parallel,
    world_size_from_env,
)
from megatron_speech.training.monitor import setup_logging
from megatron_speech.training.signals import (
    EXIT_DONE,
    EXIT_PEER_FAILED,
    EXIT_PREEMPTED,
    EXIT_SAVE_FAILED,
    StopSignal,
    stop_signals_blocked,
)

logger = logging.getLogger("megatron_speech")


def run_training(cfg, train: Callable[[object, dict[str, int], StopSignal], int]) -> int:
    """Validate `cfg` for the launched world (before any process group forms), initialize, and return
    `train(cfg, progress, stop)`'s exit code; `train` keeps progress["step"] at the last completed step. `stop`
    holds the stop-signal handlers, installed first: a warning signal during start-up stops the first step."""
    stop = StopSignal(cfg.train.exit_on_signal)
    env_from_slurm()
    cfg.validate(world_size_from_env())
    t = cfg.train
    initialize_parallel(cfg.parallel.tensor_model_parallel_size, t.seed, timeout_seconds=t.collective_timeout_seconds)
    setup_logging(dist.get_rank())
    progress = {"step": 0}
    try:
        exit_code = train(cfg, progress, stop)
    except Exception as e:
        if not is_collective_failure(e):
            raise
        # A peer died or hung: no teardown (it would wait on the peer); torchrun / srun end the other ranks.
        try:
            latest = latest_step(t.save_dir)
        except ValueError:
            latest = None
        logger.error("%s (exit %d)", collective_failure_message(e, progress["step"], latest,
                                                              t.collective_timeout_seconds), EXIT_PEER_FAILED)
        return EXIT_PEER_FAILED
    destroy_parallel()
    return exit_code


class SavePolicy:
    """When a training loop saves and how it ends, for pretrain.py and finetune.py alike: a save every
    train.save_interval steps (a failure stops the run or is only alarmed, train.on_save_error), a save before
    leaving on a stop signal (exit 75) or on early stopping, and a final save. `write(step, reshardable)` writes
    the checkpoint (checkpointing.save_checkpoint) and raises SaveError on failure, the same on every rank. The run's
    last checkpoint (train.max_steps or early stop) is written reshardable, loadable at another TP size too; the
    others in the fast per-DP-shard format (checkpointing.py)."""

    def __init__(self, train_cfg, monitor, write: Callable[[int, bool], None], stop: StopSignal | None = None):
        self.t, self.monitor, self._write = train_cfg, monitor, write
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
        return (EXIT_DONE, why) if self.save(step, reshardable=True) else \
            (EXIT_SAVE_FAILED, f"{why}; but its checkpoint save failed")

    def after_step(self, step: int, stop: bool) -> tuple[int, str] | None:
        """The interval save, then the stop signal (`stop`: the ranks' agreed decision, the step's out["stop"]):
        (exit code, reason) when the loop must end now, else None."""
        t = self.t
        if t.save_interval > 0 and step % t.save_interval == 0 and \
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
