"""Stop requests (SIGUSR1 / SIGTERM from Slurm or a user) turned into a decision every rank takes at the same
step: the local flag rides the all-reduce that opens every step (step.agree), so no rank saves at a different step
or waits in a collective alone.

Slurm signals every process of a job step, not only the training process (DESIGN §9): DataLoader workers,
megatron's checkpoint-writer Manager (spawned at the first save) and wandb's service would die of USR1/TERM, and
the save at the signal with them. Helpers therefore start with the stop signals blocked (`stop_signals_blocked`
around their creation: a signal mask is inherited by fork and kept across exec) and DataLoader workers also
ignore them (`ignore_stop_signals`); only the training process acts on them. (wandb's Go service unblocks SIGTERM
itself: monitor.py goes on without wandb when it dies.)

Exit codes, read by launch/*.sbatch (which also maps a rank killed by a signal, e.g. NCCL's watchdog SIGABRT =
srun exit 134, to the bounded requeue of EXIT_PEER_FAILED: launch/common.sh):"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from multiprocessing import resource_tracker

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

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Slurm's warning signal (--signal=USR1@N) and preemption / scancel / time limit."""


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGUSR1/SIGTERM in the calling thread for the duration: processes started inside (spawned or forked,
    even across exec) inherit the block and survive the signals Slurm sends to every process of the step. In this
    process a signal that arrives meanwhile stays pending and reaches its handler when the block is lifted (other
    threads may take it earlier; StopSignal's handler only sets a flag)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # The first spawn starts multiprocessing's resource tracker, which then *unblocks* SIGTERM (SIG_UNBLOCK, not
        # a restore): start it here, under the block (so it too outlives USR1), and block again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(*_) -> None:
    """For helper processes (a DataLoader worker_init_fn): ignore SIGUSR1/SIGTERM; the training process decides
    when to stop and then ends its helpers itself."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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
