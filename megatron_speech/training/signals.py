"""Stop requests (SIGUSR1 / SIGTERM from Slurm or a user) turned into a decision every rank takes at the same
step: the local flag rides the all-reduce that opens every step (step.agree), so no rank saves at a different step
or waits in a collective alone.

Slurm signals every process of a job step, not only the training process (docs/design.md §9): DataLoader workers,
megatron's checkpoint-writer Manager (spawned at the first save) and wandb's service would die of USR1/TERM, and
the save at the signal with them. Helpers therefore start with the stop signals blocked (`stop_signals_blocked`
around their creation: a signal mask is inherited by fork and kept across exec) and DataLoader workers also
ignore them (`ignore_stop_signals`); only the training process acts on them. (wandb's Go service unblocks SIGTERM
itself: monitor.py goes on without wandb when it dies.)

Exit codes, read by launch/*.sbatch (which also maps a rank killed by a signal, e.g. NCCL's watchdog SIGABRT =
srun exit 134, to the bounded requeue of EXIT_PEER_FAILED: launch/common.sh):"""

from __future__ import annotations

import signal

# Re-exported: the helper-process side lives in a neutral module that data/ may import too.
from megatron_speech.common.stop_signals import STOP_SIGNALS as STOP_SIGNALS
from megatron_speech.common.stop_signals import ignore_stop_signals as ignore_stop_signals
from megatron_speech.common.stop_signals import stop_signals_blocked as stop_signals_blocked

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
    """Handlers for SIGUSR1 and SIGTERM that only set this rank's flag (`requested_here`). The ranks agree on it in
    the all-reduce that opens every training step (step.agree), so all of them stop after the same step with no
    collective of its own. Installed at the top of the entry point (driver.run_training): a warning that lands
    while the model builds or the data loads is kept for the first step instead of killing the process."""

    def __init__(self, enabled: bool = True):
        self._flag = False
        self.signal_name: str | None = None
        if enabled:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._flag = True
        self.signal_name = signal.Signals(signum).name

    @property
    def requested_here(self) -> bool:
        """Whether this rank got a stop signal (no collective)."""
        return self._flag
