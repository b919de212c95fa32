"""A collective that fails (a peer died: the connection closed; or hung: train.collective_timeout_seconds passed)
becomes one message naming the rank(s) that stopped answering and the last completed step, then an exit code.

Which ranks: every rank that catches the failure checks in at the rendezvous store (torchrun's agent hosts it, so
it outlives any worker; under plain srun rank 0 hosts it) and waits a few seconds for the others; the ranks that
never check in are the dead or stuck ones. A rank whose own collective is still waiting for its timeout checks in
later than that, so on a large job the list can include live ranks: torchrun's report ("Root Cause ... rank: N")
and the first failing rank's log are authoritative for a rank that exited.

This is the gloo path. On NCCL with TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (torch's default; launch/common.sh sets it)
the watchdog aborts the process first (SIGABRT): no exception reaches Python, srun reports 134 (137 for the ranks
`srun --wait` kills), and launch/common.sh gives it the same bounded requeue as exit 4.
"""

from __future__ import annotations

import logging
import os
import re
import time
from datetime import timedelta

import torch.distributed as dist

logger = logging.getLogger("megatron_speech")

CHECK_IN_SECONDS = 5.0
"""How long a failed rank waits for the other survivors to check in before naming the silent ones."""

# What gloo and NCCL put in the RuntimeError of a collective whose peer vanished or timed out.
_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe", "gloo",
            "NCCL")


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` comes from a collective whose peers stopped answering (not from our own code)."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _MARKERS)


def silent_ranks(wait_seconds: float = CHECK_IN_SECONDS) -> list[int] | None:
    """Ranks that did not check in at the store within wait_seconds (this rank checks in first); None when the
    store cannot be reached (it lived on the failed rank)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait_seconds))
        rank, world = dist.get_rank(), dist.get_world_size()
        prefix = f"megatron_speech/collective_failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        store.set(f"{prefix}/{rank}", "1")
        deadline = time.monotonic() + wait_seconds
        missing = [r for r in range(world) if r != rank]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"{prefix}/{r}"])]
            time.sleep(0.1)
        return missing
    except Exception:  # the store went down with the failed rank, or the group is gone
        return None


def collective_failure_message(error: BaseException, last_step: int, latest_checkpoint: int | None,
                               timeout_seconds: float) -> str:
    """The message a rank logs before exiting after `error` (see module docstring)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    silent = silent_ranks()
    if silent is None:
        who = "The failed rank is unknown here (the rendezvous store is unreachable: it lived on that rank)"
    elif silent:
        who = f"Rank(s) {silent} did not check in within {CHECK_IN_SECONDS:g} s: dead or stuck"
    else:
        who = "Every rank checked in: the failure was in the network, not a rank"
    # gloo prefixes its source location: "[.../gloo/transport/tcp/pair.cc:537] Read error ..."
    first = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [""])[0]) or type(error).__name__
    resume = (f"A restart resumes from the checkpoint of step {latest_checkpoint}" if latest_checkpoint is not None
              else "No checkpoint exists yet: a restart starts over")
    return (f"rank {rank}: a collective failed after step {last_step} (the last completed step): {first} "
            f"{who}. Collective timeout: train.collective_timeout_seconds={timeout_seconds:g}. {resume}.")
