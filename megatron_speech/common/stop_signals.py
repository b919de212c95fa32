"""Stop signals and helper processes. Slurm signals every process of a job step, not only the training process
(docs/design.md §9): DataLoader workers, megatron's checkpoint-writer Manager and wandb's service would die of
USR1/TERM, and the save at the signal with them. Helpers therefore start with the stop signals blocked
(`stop_signals_blocked` around their creation: a signal mask is inherited by fork and kept across exec) and DataLoader
workers also ignore them (`ignore_stop_signals`); only the training process acts on them (training/signals.py).

Neutral: data/ (the DataLoader workers) and training/ both use it, and it imports neither.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from multiprocessing import resource_tracker

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
