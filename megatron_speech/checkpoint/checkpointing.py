"""Checkpoints with megatron-core dist_checkpointing: sharded, and loadable at another TP/DP layout.

<save_dir>/iter_0001000/   model, optimizer, EMA, per-rank RNG states (sharded), plus the common state
                           (scheduler, trainer state: step, sampler position, config) saved by rank 0
<save_dir>/iter_0001000/manifest.json   every file's size and SHA-256 (integrity.py), written before `latest` moves
<save_dir>/latest          the step of the newest *complete* checkpoint, replaced atomically (temp + rename)
                           only after every rank finished writing: a crash mid-save leaves the previous one.
<save_dir>/best            likewise, the best evaluation's checkpoint: out of the keep_last rotation (best.py)

Parallel I/O. Every save and load goes through megatron-core's fully parallel strategy wrappers over the DP
group: the tensors replicated over DP (model, EMA) are split between the DP ranks for writing, and on load each
rank reads a share and the ranks exchange the rest. The distributed optimizer's state is saved `dp_reshardable`
(each DP rank writes its shard as it holds it: no all-gather), loadable at any DP size but only at the TP size
that wrote it. `save_checkpoint(..., reshardable=True)` writes `fully_reshardable` instead (megatron all-gathers
the whole optimizer state onto every rank once): loadable at any TP/DP layout. The sharding type is recorded
in the checkpoint's content metadata and the load follows it.

Transformer Engine. TE's modules add `_extra_state` objects (FP8 scaling metadata) to the sharded state dict that
the local spec does not have (e.g. `...core_attention._extra_state`). Loading one spec's checkpoint into the
other handles them on purpose: an `_extra_state` the checkpoint lacks keeps the module's fresh state (logged), one
the model does not ask for is ignored; any other key the checkpoint lacks is an error naming it, before any read.

A failed save (disk full, unwritable) raises SaveError on every rank at once, removes its partial directory, leaves
`latest` alone. Loading verifies the manifest, refuses code in pickles; resuming falls back to the newest that verifies.

Trust: torch_dist metadata are pickles that torch reads with pickle.load; the checks above refuse one that names
anything but checkpoint metadata, but the manifest proves integrity, not origin: trusted sources only (share
safetensors, tools/convert_to_hf.py). Saves run with Slurm's stop signals blocked (common/stop_signals.py)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import (
    dict_list_map_inplace,
    extract_matching_values,
    merge,
    nested_values,
)
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
    load_sharded_metadata,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from megatron_speech.checkpoint import integrity
from megatron_speech.checkpoint.integrity import CheckpointIntegrityError
from megatron_speech.common.stop_signals import stop_signals_blocked
from megatron_speech.compat.megatron_core import (
    DP_RESHARDABLE,
    BucketLayoutError,
    load_optimizer_state,
    materialize_optimizer_state,
    zero_bucket_padding,
)

logger = logging.getLogger("megatron_speech")

ROUTINE_SHARDING = DP_RESHARDABLE
"""Distributed-optimizer state of a routine save: every DP rank writes the shard it holds (no communication);
reloads at any DP size, at the same TP size."""
RESHARDABLE_SHARDING = "fully_reshardable"
"""save_checkpoint(reshardable=True): gathered into parameter-shaped tensors; reloads at any TP/DP layout."""
SHARDING_KEY = "distrib_optim_sharding_type"
EXTRA_STATE = "_extra_state"
LATEST = "latest"
BEST = "best"


class Averages(Protocol):
    """What a checkpoint needs of the weights' moving average (training/ema.py's EMA is one)."""

    @property
    def enabled(self) -> bool: ...

    def by_param(self) -> dict[int, torch.Tensor]:
        """id(parameter) -> its average (fp32, the parameter's shape)."""
        ...


class SaveError(RuntimeError):
    """A checkpoint save failed; raised on every rank at the same point (so training may continue in step)."""


def checkpoint_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def latest_step(save_dir: str | Path, name: str = LATEST) -> int | None:
    """The step recorded in <save_dir>/latest (or the marker `name`), or None when there is no complete checkpoint."""
    if not (marker := Path(save_dir) / name).exists():
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


def _optimizer_format(optimizer) -> str | None:
    """"distributed" (megatron's ZeRO-1 optimizer) or "plain": their optimizer states are stored differently and do
    not load into each other."""
    if optimizer is None:
        return None
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in inner) else "plain"


def _ema_entries(model_sd: dict, ema: Averages) -> dict[str, ShardedTensor]:
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


def _state(model, optimizer, ema: Averages | None, *, is_loading: bool, with_rng: bool,
           sharding: str) -> dict[str, Any]:
    model_sd = _unwrap(model).sharded_state_dict()
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata={SHARDING_KEY: sharding})
        if not is_loading:
            zero_bucket_padding(state["optimizer"])
    if ema is not None and ema.enabled:
        state["ema"] = _ema_entries(model_sd, ema)
    if with_rng:
        state["rng"] = _rng_entry()
    return state


def _dp_group():
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _save_strategy():
    # megatron's fully parallel wrapper (as Megatron-LM's --ckpt-fully-parallel-save): the DP replicas of a
    # tensor share its writing instead of DP rank 0 writing every replicated tensor alone.
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_group())


def _load_strategy(path: Path):
    # Each DP rank reads a share of what the group needs and the ranks exchange the rest.
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(path)), _dp_group())


def save_checkpoint(save_dir: str | Path, step: int, model, optimizer, scheduler, ema: Averages | None,
                    trainer_state: dict, keep_last: int = 0, *, reshardable: bool = False) -> Path:
    """Collective: every rank calls it. optimizer / scheduler / ema may be None (a weights-only checkpoint).
    reshardable=True stores the distributed optimizer's state so that it reloads at another TP size too (costs
    an all-gather of the whole optimizer state onto every rank); routine saves leave it False (any DP size, the
    same TP size). Returns the checkpoint directory."""
    path = checkpoint_dir(save_dir, step)

    def fresh_dir():
        if path.exists():  # debris of a save that died before `latest` moved: never a complete checkpoint
            shutil.rmtree(path)
        path.mkdir(parents=True)

    _on_rank0_then_agree(fresh_dir, f"creating {path}", path)
    sharding = RESHARDABLE_SHARDING if reshardable else ROUTINE_SHARDING
    state = _state(model, optimizer, ema, is_loading=False, with_rng=True, sharding=sharding)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["trainer"] = dict(trainer_state, step=step, layout=_layout(), optimizer_format=_optimizer_format(optimizer))
    try:  # blocked: megatron's writer Manager (spawned by a process's first save) must outlive USR1/TERM
        with stop_signals_blocked():
            dist_checkpointing.save(state, str(path), sharded_strategy=_save_strategy(),
                                    content_metadata={SHARDING_KEY: sharding})
    except CheckpointException as e:  # megatron gathers every rank's write results and raises this on all of them
        _discard(path)
        raise SaveError(f"writing {path} failed: {_write_failures(e)}; {_kept(save_dir)}") from None
    dist.barrier()  # every rank's shards are on disk
    try:
        manifest = integrity.compute_manifest(path)  # the same result or the same error on every rank
    except OSError as e:
        _discard(path)
        raise SaveError(f"{e}; {_kept(save_dir)}") from None

    def commit():
        integrity.write_manifest_file(path, manifest)
        tmp = Path(save_dir) / f".{LATEST}.tmp"
        tmp.write_text(f"{step}\n")
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, Path(save_dir) / LATEST)
        for old in rotated_out(save_dir, path, keep_last):
            shutil.rmtree(old, ignore_errors=True)

    _on_rank0_then_agree(commit, f"committing {path} (manifest, {LATEST})", path)
    return path


def rotated_out(save_dir: str | Path, newest: Path, keep_last: int) -> list[Path]:
    """What keep_last rotation deletes once `newest` is complete: all but the keep_last newest up to it (newer ones
    are a resumed-from-further-back run's, replaced when training gets there), never the one named by `best`."""
    done = sorted(p for p in Path(save_dir).glob("iter_*") if p.is_dir() and p <= newest)
    best = latest_step(save_dir, BEST)
    return [p for p in done[:-keep_last] if best is None or p.name != f"iter_{best:07d}"] if keep_last > 0 else []


def _on_rank0_then_agree(fn, what: str, path: Path) -> None:
    """Run fn on rank 0; if it raised, every rank raises the same SaveError (after rank 0 removed `path`, unless
    `latest` already names it)."""
    error = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:
            error = f"{what} failed: {e}"
            if not _named_by_latest(path):  # else only the pruning of old checkpoints failed: keep it
                _discard(path)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise SaveError(f"{box[0]}; {_kept(path.parent)}")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _named_by_latest(path: Path) -> bool:
    try:
        return latest_step(path.parent) == int(path.name[len("iter_"):])
    except ValueError:
        return False


def _discard(path: Path) -> None:
    # A failed save's directory is never complete, and on a full disk its space is what the next try needs.
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def _kept(save_dir: str | Path) -> str:
    """What is left, and the free space: torch's writer reports a full disk as a short write ("unexpected pos")."""
    try:
        step = latest_step(save_dir)
        kept = (f"{Path(save_dir) / LATEST} still names step {step}" if step is not None
                else "no complete checkpoint exists yet")
    except ValueError as e:
        kept = str(e)
    try:
        kept += f" ({shutil.disk_usage(save_dir).free / 2**30:.1f} GiB free there)"
    except OSError:
        pass
    return kept


def _write_failures(e: CheckpointException) -> str:
    # Only the coordinator (rank 0) holds the per-rank details; the others know that some rank failed.
    if not e.failures:
        return "a rank could not write its shards (the details are in rank 0's log)"
    parts = []
    for rank, (exc, _) in sorted(e.failures.items()):
        cause = exc
        while cause.__cause__ is not None:  # "Worker failure: ..." wraps the OSError that says what happened
            cause = cause.__cause__
        parts.append(f"rank {rank}: {type(cause).__name__}: {cause}")
    return "; ".join(parts)


# The checkpoint resume_step has just verified, so that the load that follows does not read it all again. Only
# the path: every rank records the same one (the decision is collective), so every rank skips the same check.
_verified_by_resume: str | None = None


def resume_step(save_dir: str | Path) -> int | None:
    """The step to resume from: `latest`, or, when that checkpoint fails verification (damaged, incomplete,
    unsafe), the newest older one that passes (each one skipped is logged). None when there is no `latest`.
    Collective (or a single process). Raises CheckpointIntegrityError when no checkpoint at or before `latest`
    verifies. The next load_checkpoint of the step returned does not verify it again."""
    global _verified_by_resume
    _verified_by_resume = None
    latest = latest_step(save_dir)
    if latest is None:
        return None
    found = sorted((int(p.name.split("_")[1]) for p in Path(save_dir).glob("iter_*")
                    if p.is_dir() and p.name.split("_")[1].isdigit()), reverse=True)
    candidates = integrity.broadcast_from_rank0([s for s in found if s <= latest])  # rank 0's view: one decision
    refused = []
    for step in candidates:
        problems = integrity.verify_checkpoint(checkpoint_dir(save_dir, step))
        if not problems:
            if refused and _is_rank0():
                logger.warning("falling back to %s: the newer checkpoint(s) failed verification",
                               checkpoint_dir(save_dir, step))
            _verified_by_resume = str(checkpoint_dir(save_dir, step).resolve())
            return step
        refused.append(f"{checkpoint_dir(save_dir, step).name}: {'; '.join(problems)}")
        if _is_rank0():
            logger.warning("cannot resume from %s: %s", checkpoint_dir(save_dir, step), "; ".join(problems))
    if latest not in candidates:
        refused.insert(0, f"{checkpoint_dir(save_dir, latest).name} (named by {LATEST}): missing")
    raise CheckpointIntegrityError(f"no checkpoint in {save_dir} at or before step {latest} is intact:\n  - "
                                   + "\n  - ".join(refused))


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None, ema: Averages | None = None) -> dict:
    """Collective. Loads everything given (None = skip) at the current layout, resharding as needed. A full
    resume (optimizer given) also restores every rank's RNG states when the layout is the one that saved them.
    TE `_extra_state` entries the checkpoint lacks keep the module's own (see the module docstring); any other
    key it lacks is a ValueError naming it. Returns the trainer state."""
    global _verified_by_resume
    path = Path(path)
    if not (path / "metadata.json").exists():
        raise ValueError(f"{path} is not a complete dist_checkpointing checkpoint (no metadata.json)")
    if _verified_by_resume != str(path.resolve()):
        integrity.check_checkpoint(path)  # sizes, checksums, no code in pickles: before torch reads a byte
    _verified_by_resume = None  # one skip per resume_step: a later load of the same path verifies again
    common = dist_checkpointing.load_common_state_dict(str(path))
    restore_rng = optimizer is not None and common["trainer"]["layout"] == _layout()
    saved_keys = {sh.key for sh in load_sharded_metadata(str(path)).values()}
    model_sd = _unwrap(model).sharded_state_dict()
    template: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        if common.get("scheduler") is None:
            raise ValueError(f"{path} holds model weights only (no optimizer state): load it with "
                             "train.init_checkpoint, not as a run to resume")
        saved = common["trainer"].get("optimizer_format")
        if saved is not None and saved != _optimizer_format(optimizer):
            raise ValueError(f"{path} holds the optimizer state of a parallel.use_distributed_optimizer="
                             f"{saved == 'distributed'} run; resume with that setting (the two store Adam's state "
                             "differently), or start a new run from its weights with train.init_checkpoint")
        sharding = _saved_sharding(path, common)
        _check_reshardable(path, common, sharding, optimizer)
        materialize_optimizer_state(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                             metadata={SHARDING_KEY: sharding})
    if ema is not None and ema.enabled and any(k.startswith("ema.") for k in saved_keys):
        template["ema"] = _ema_entries(model_sd, ema)
    if restore_rng:
        template["rng"] = _rng_entry()
    template, fresh = _drop_absent_extra_state(path, template, saved_keys)
    loaded = dist_checkpointing.load(template, str(path), sharded_strategy=_load_strategy(path))
    # strict: every key the module has must come from the checkpoint, but for the _extra_state entries dropped
    # above, which take the module's own fresh values
    _unwrap(model).load_state_dict(merge(loaded["model"], fresh))
    if optimizer is not None:
        try:
            load_optimizer_state(optimizer, loaded["optimizer"])
        except BucketLayoutError as e:
            raise ValueError(f"{path}: its optimizer state was saved {ROUTINE_SHARDING} with another DDP bucket "
                             f"layout ({e}); resume with the same parallel.overlap_grad_reduce and bucket size, or "
                             "start a new run from its weights with train.init_checkpoint") from None
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


def _saved_sharding(path: Path, common: dict) -> str:
    # Checkpoints from before the content metadata were all saved fully_reshardable.
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    return content.get(SHARDING_KEY, RESHARDABLE_SHARDING)


def _check_reshardable(path: Path, common: dict, sharding: str, optimizer) -> None:
    if sharding != ROUTINE_SHARDING or _optimizer_format(optimizer) != "distributed":
        return
    saved_tp = common["trainer"]["layout"]["tp"]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if saved_tp != tp:
        raise ValueError(
            f"{path} stores the distributed optimizer's state as each rank held it ({ROUTINE_SHARDING}: a "
            f"routine save), which reloads at any DP size but only at TP={saved_tp}, not TP={tp}. Resume with "
            f"parallel.tensor_model_parallel_size={saved_tp}; to change TP keeping the optimizer state, load it at "
            f"TP={saved_tp} and save it again with save_checkpoint(..., reshardable=True); or start a new run "
            "from its weights with train.init_checkpoint")


def _drop_absent_extra_state(path: Path, template: dict, saved_keys: set[str]) -> tuple[dict, dict]:
    """The template without the TE `_extra_state` objects the checkpoint lacks (a local-spec or converted
    checkpoint loaded into a TE model), and those entries' fresh values (the module's own, to load back in their
    place). Any other key the checkpoint lacks is a ValueError naming it, raised before anything is read (torch
    would only say "Missing key" mid-load)."""
    wanted = {v.key for v in nested_values(template) if isinstance(v, ShardedBase)}
    absent = wanted - saved_keys
    if not absent:
        return template, {}
    others = sorted(k for k in absent if not k.endswith(EXTRA_STATE))
    if others:
        raise ValueError(f"{path} lacks {len(others)} key(s) this model needs: {', '.join(others[:8])}"
                         + (", ..." if len(others) > 8 else "")
                         + ". Is it a checkpoint of this model (architecture, parallel.use_distributed_optimizer, "
                         "precision)? Compare its stored config with this run's")
    if _is_rank0():
        logger.info("%s has no %s for %d module(s) (a checkpoint of the local spec or a conversion): they keep "
                    "their fresh state: %s", path, EXTRA_STATE, len(absent), ", ".join(sorted(absent)[:4]))
    # as megatron's validation.adjust_non_strict_load (which expects a template of sharded entries only); only
    # the model has _extra_state
    kept, dropped = extract_matching_values(template["model"],
                                            lambda v: not (isinstance(v, ShardedBase) and v.key in absent))
    dict_list_map_inplace(lambda v: v.data if isinstance(v, ShardedBase) else v, dropped)
    return dict(template, model=kept), dropped


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
