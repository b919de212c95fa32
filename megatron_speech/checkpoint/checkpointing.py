"""Checkpoints with megatron-core dist_checkpointing: sharded, and loadable at another TP/DP layout.

<save_dir>/iter_0001000/   model, optimizer (fully_reshardable), EMA, per-rank RNG states (sharded), plus the
                           common state (scheduler, trainer state: step, sampler position, config) saved by rank 0
<save_dir>/latest          the step of the newest *complete* checkpoint, replaced atomically (temp + rename)
                           only after every rank finished writing: a crash mid-save leaves the previous one.

Trust: megatron-core's torch_dist format stores metadata as pickles that torch reads with pickle.load; a
distributed checkpoint is for trusted sources only. Checkpoints shared with others travel as safetensors
(tools/convert_to_hf.py).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from megatron_speech.training.optim import unshare_adam_steps

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
LATEST = "latest"


def checkpoint_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def latest_step(save_dir: str | Path) -> int | None:
    """The step recorded in <save_dir>/latest, or None when there is no complete checkpoint."""
    marker = Path(save_dir) / LATEST
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker} holds {text!r}, not a step number: fix or delete it")
    return int(text)


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _layout() -> dict[str, int]:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(), "world": dist.get_world_size()}


def _ema_entries(model_sd: dict, ema) -> dict[str, ShardedTensor]:
    # The EMA mirrors the model's sharded tensors (same sharding, keys prefixed), so it reshards like them.
    by_param = ema.by_param()
    out = {}
    for name, sh in model_sd.items():
        if isinstance(sh, ShardedTensor) and id(sh.data) in by_param:
            out[name] = dataclasses.replace(sh, key="ema." + sh.key, data=by_param[id(sh.data)], dtype=torch.float32)
    return out


def _rng_entry() -> ShardedObject:
    rank, world = dist.get_rank(), dist.get_world_size()
    from megatron.core import tensor_parallel

    state = {"cpu": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _state(model, optimizer, ema, *, is_loading: bool, with_rng: bool) -> dict[str, Any]:
    model_sd = _unwrap(model).sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIM_METADATA)
    if ema is not None and ema.enabled:
        state["ema"] = _ema_entries(model_sd, ema)
    if with_rng:
        state["rng"] = _rng_entry()
    return state


def save_checkpoint(save_dir: str | Path, step: int, model, optimizer, scheduler, ema, trainer_state: dict,
                    keep_last: int = 0) -> Path:
    """Collective: every rank calls it. optimizer / scheduler / ema may be None (a weights-only checkpoint).
    Returns the checkpoint directory."""
    path = checkpoint_dir(save_dir, step)
    if dist.get_rank() == 0:
        if path.exists():  # debris of a save that died before `latest` moved: never a complete checkpoint
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    state = _state(model, optimizer, ema, is_loading=False, with_rng=True)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["trainer"] = dict(trainer_state, step=step, layout=_layout())
    dist_checkpointing.save(state, str(path))
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        tmp = Path(save_dir) / f".{LATEST}.tmp"
        tmp.write_text(f"{step}\n")
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, Path(save_dir) / LATEST)
        if keep_last > 0:
            done = sorted(p for p in Path(save_dir).glob("iter_*") if p.is_dir())
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None, ema=None) -> dict:
    """Collective. Loads everything given (None = skip) at the current layout, resharding as needed. A full
    resume (optimizer given) also restores every rank's RNG states when the layout is the one that saved them.
    Returns the trainer state."""
    path = Path(path)
    if not (path / "metadata.json").exists():
        raise ValueError(f"{path} is not a complete dist_checkpointing checkpoint (no metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(path))
    restore_rng = optimizer is not None and common["trainer"]["layout"] == _layout()
    model_sd = _unwrap(model).sharded_state_dict()
    template: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        if common.get("scheduler") is None:
            raise ValueError(f"{path} holds model weights only (no optimizer state): load it with "
                             "train.init_checkpoint, not as a run to resume")
        _materialize_optimizer_state(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIM_METADATA)
    if ema is not None and ema.enabled and "ema" in _saved_top_keys(path):
        template["ema"] = _ema_entries(model_sd, ema)
    if restore_rng:
        template["rng"] = _rng_entry()
    loaded = dist_checkpointing.load(template, str(path))
    _unwrap(model).load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(optimizer)
    if scheduler is not None:
        if common.get("scheduler") is None:
            raise ValueError(f"{path} holds model weights only (no optimizer/scheduler): load it with "
                             "train.init_checkpoint, not as a run to resume")
        scheduler.load_state_dict(common["scheduler"])
    if "ema" in template:
        with torch.no_grad():  # torch_dist loads into the template's tensors in place; other strategies may not
            for name, sh in template["ema"].items():
                if loaded["ema"][name].data_ptr() != sh.data.data_ptr():
                    sh.data.copy_(loaded["ema"][name])
    if restore_rng:
        _restore_rng(loaded["rng"])
    return common["trainer"]


def _materialize_optimizer_state(optimizer) -> None:
    # A fresh torch Adam (megatron's fallback without TE/apex) has no per-parameter state until its first step,
    # and megatron's DistributedOptimizer cannot describe the state it is about to load without it. megatron's
    # own remedy is a step on zero gradients (no change at the scheduler's initial lr), filled in-place by the
    # load.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not inner.state and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def _saved_top_keys(path: Path) -> set[str]:
    metadata = dist_checkpointing.load_tensors_metadata(str(path))
    return {key.split(".", 1)[0] for key in metadata}


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
