"""Stop requests (SIGUSR1 / SIGTERM from Slurm or a user) turned into a decision every rank takes at the same
step: the local flag is all-reduced (MAX), so no rank saves at a different step or waits in a collective alone.

Exit codes, read by launch/*.sbatch:"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megatron_speech.parallel.initialize import compute_device

EXIT_DONE = 0
"""max_steps reached, or early-stopped: do not requeue."""
EXIT_PREEMPTED = 75
"""Stopped by a signal after saving a checkpoint: requeue me (EX_TEMPFAIL)."""
EXIT_DIVERGED = 3
"""Stopped on purpose: NaN/inf losses in a row, or the fp16 loss scale stuck at its floor. Do not requeue."""
EXIT_PEER_FAILED = 4
"""A collective failed: another rank died or hung past train.collective_timeout_seconds. Nothing was saved since
the last checkpoint; a restart resumes from it (requeue when the cause was a node, not a bug: see the log)."""
EXIT_SAVE_FAILED = 5
"""A checkpoint save failed (disk full, unwritable; train.on_save_error=stop, or the save at a signal or at the
end). `latest` still names the previous complete checkpoint. Free space, then restart."""


class StopSignal:
    """Installs handlers for SIGUSR1 and SIGTERM that only set a flag; `requested()` is a collective."""

    def __init__(self, enabled: bool = True):
        self._flag = False
        self.signal_name: str | None = None
        if enabled:
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._flag = True
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        flag = torch.tensor(1 if self._flag else 0, dtype=torch.int32, device=compute_device())  # NCCL: on the GPU
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
