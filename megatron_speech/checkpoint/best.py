"""The best checkpoint (train.keep_best): <save_dir>/best holds the step of the checkpoint whose evaluation was the
best so far, as <save_dir>/latest holds the newest (checkpointing.py).

The marker only ever names a complete checkpoint: it moves (temp file + fsync + rename, like `latest`) after that
step's checkpoint is committed, and the checkpoint it named before is deleted only after the move, and only when the
keep_last rotation would not keep it anyway; until then the rotation leaves it alone (checkpointing.rotated_out).
A crash between the save and the move leaves the marker on the previous best, intact; `reconcile` on resume moves it
where an uninterrupted run would have it. Rank 0 does the file work; the others learn its outcome (a failure is a
SaveError on every rank, as a failed save is).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from megatron_speech.checkpoint.checkpointing import BEST, LATEST, SaveError, checkpoint_dir, latest_step, rotated_out
from megatron_speech.checkpoint.integrity import MANIFEST

logger = logging.getLogger("megatron_speech")


def best_step(save_dir: str | Path) -> int | None:
    """The step <save_dir>/best names, or None."""
    return latest_step(save_dir, BEST)


def is_complete(save_dir: str | Path, step: int) -> bool:
    """A committed checkpoint: its manifest is written just before `latest` moves to it."""
    return (checkpoint_dir(save_dir, step) / MANIFEST).is_file()


def write_marker(save_dir: str | Path, name: str, step: int) -> None:
    """<save_dir>/<name> := step, atomically (a reader sees the old or the new step, never a partial file)."""
    tmp = Path(save_dir) / f".{name}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(save_dir) / name)


def _move(save_dir: str | Path, step: int, keep_last: int) -> None:
    """Rank 0: name `step` best, then delete the previous best unless the rotation keeps it (or `latest` names it,
    or it is newer than `latest`: a future a fallback resume discarded, which that run's saves replace)."""
    if not is_complete(save_dir, step):
        raise ValueError(f"{checkpoint_dir(save_dir, step)} is not a complete checkpoint (no {MANIFEST})")
    previous = best_step(save_dir)
    write_marker(save_dir, BEST, step)
    latest = latest_step(save_dir, LATEST)
    if previous is None or previous == step or latest is None or previous >= latest:
        return
    old = checkpoint_dir(save_dir, previous)
    if old in rotated_out(save_dir, checkpoint_dir(save_dir, latest), keep_last):
        # Renamed now, deleted after the other ranks are released (_rank0_then_agree): removing an XL checkpoint on
        # a parallel filesystem can take minutes, which they would otherwise spend waiting in the broadcast.
        old.rename(old.with_name(f".{old.name}.deleting"))


def _rank0_then_agree(fn, what: str) -> None:
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:  # any failure must reach the broadcast: the other ranks wait there for rank 0
            error = f"{what} failed: {type(e).__name__}: {e}"
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise SaveError(error)


def _delete_renamed(save_dir: str | Path) -> None:
    """Rank 0, after the agreement: the previous best's directories _move renamed."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        for path in Path(save_dir).glob(".iter_*.deleting"):
            shutil.rmtree(path, ignore_errors=True)


def mark_best(save_dir: str | Path, step: int, keep_last: int) -> None:
    """Collective: <save_dir>/best names the (already saved) checkpoint of `step`; the previous best goes unless
    keep_last keeps it. Raises SaveError on every rank when rank 0 could not (the marker then names the previous
    best, which is kept)."""
    _rank0_then_agree(lambda: _move(save_dir, step, keep_last), f"marking {checkpoint_dir(save_dir, step)} as {BEST}")
    _delete_renamed(save_dir)


def reconcile(save_dir: str | Path, resumed_step: int, best: int | None, keep_best: bool, keep_last: int) -> None:
    """Collective, on resume from `resumed_step` whose state says the best evaluation was at step `best`: point the
    marker where an uninterrupted run would have it. It may lag (a crash between the best's save and the move) or
    lead (it names a checkpoint past the one resumed, from a run a fallback resume discarded: that step's save
    would rewrite the directory under it)."""
    def fix():
        marker = best_step(save_dir)
        if keep_best and best is not None and best <= resumed_step and is_complete(save_dir, best):
            if marker != best:
                logger.info("%s: naming step %d (the resumed run's best) instead of %s", Path(save_dir) / BEST, best,
                            marker)
                _move(save_dir, best, keep_last)
        elif marker is not None and marker > resumed_step:
            logger.warning("%s names step %d, past the resumed step %d: removed", Path(save_dir) / BEST, marker,
                           resumed_step)
            os.remove(Path(save_dir) / BEST)

    _rank0_then_agree(fix, f"reconciling {Path(save_dir) / BEST} on resume")
    _delete_renamed(save_dir)
