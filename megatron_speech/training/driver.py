"""How every training entry point starts and ends (pretrain.py and finetune.py): the stop-signal handlers first,
the config checked against the launched world, the process groups formed, then the driver's `train`; a failed or
hung peer becomes exit code 4 with a message. The loop itself is training/loop.py."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.distributed as dist

from megatron_speech.checkpoint.checkpointing import latest_step
from megatron_speech.parallel.faults import collective_failure_message, is_collective_failure
from megatron_speech.parallel.initialize import (
    destroy_parallel,
    env_from_slurm,
    initialize_parallel,
    world_size_from_env,
)
from megatron_speech.training.monitor import setup_logging
from megatron_speech.training.signals import EXIT_PEER_FAILED, StopSignal

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
