"""Workarounds for megatron-core 0.16.1's internals (optimizer, DDP, dist_checkpointing, attention specs).

Each one names the release it targets and why; compat/__init__.py lists them all. megatron-core is imported
inside the functions: checkpoint/integrity.py's verifier CLI reads TORCH_DIST_METADATA_GLOBALS from here and
stays a torch-only import.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

MEGATRON_CORE_VERSION = "0.16.1"
"""The megatron-core release every workaround here (and in compat/cpu.py) was written against."""

DP_RESHARDABLE = "dp_reshardable"
"""megatron-core's name for the distributed optimizer's per-rank sharding type (metadata
`distrib_optim_sharding_type`)."""


# ------------------------------------------------------------------------------------------------------------
# Optimizer (torch-Adam fallback: no TE / apex fused Adam)


def patch_torch_adam_state_restore() -> None:
    """megatron-core 0.16.1 bug on the torch-Adam fallback (no TE / apex optimizer): loading a fully_reshardable
    distributed-optimizer checkpoint copies every per-parameter state key, including torch Adam's "step",
    which the checkpoint stores once in the param groups (restored just before), so it raises KeyError('step').
    Hide "step" from that copy. Idempotent; not applied when a fused optimizer is present."""
    from megatron.core.optimizer import distrib_optimizer as do

    cls = do.DistributedOptimizer
    if do.HAVE_APEX_OR_TE or getattr(cls, "_speech_step_patch", False):
        return
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):  # noqa: ANN001, ANN202 (megatron's private signature)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    cls._set_main_param_and_optimizer_states = set_states
    cls._speech_step_patch = True


def unshare_adam_steps(optimizer: Any) -> None:
    """megatron-core 0.16.1 bug on the torch-Adam fallback: after loading, every parameter's "step" is the
    *same* tensor object, and torch Adam increments each parameter's step in place, so the shared counter
    advances once per parameter per step and the bias corrections go wrong. Give each its own copy; call after
    `optimizer.load_state_dict`."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def materialize_optimizer_state(optimizer: Any) -> None:
    """megatron-core 0.16.1: a fresh torch Adam (the fallback without TE/apex) has no per-parameter state until
    its first step, and the DistributedOptimizer cannot describe the state it is about to load without it.
    megatron's own remedy (the private `_init_optimizer_states_with_dummy_values`) is a step on zero gradients
    (no change at the scheduler's initial lr), filled in-place by the load."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not inner.state and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def _dp_reshardable_entries(state: dict) -> Iterator[dict]:
    """Each parameter's (or gap's) entry of a dp_reshardable optimizer state: {"param": .., "exp_avg": ..,
    "padding": .., ...}, in megatron-core 0.16.1's layout param_state[gbuf][dtype][bucket] = [entry, ...]."""
    chained = [state] if "param_state" in state else [v for v in state.values() if isinstance(v, dict)]
    for opt_state in chained:  # one optimizer's state, or a ChainedOptimizer's {index: state}
        param_state = opt_state.get("param_state")
        if opt_state.get("param_state_sharding_type") != DP_RESHARDABLE or not param_state:
            continue
        for key, per_dtype in param_state.items():
            if isinstance(key, int):
                for buckets in per_dtype.values():
                    for bucket in buckets:
                        yield from bucket


def zero_bucket_padding(state: dict) -> None:
    """megatron-core 0.16.1 fills the gaps between parameters in a bucket with torch.empty: whatever memory held.
    Nothing reads them back, but a checkpoint should be a function of the training state (equal runs, equal
    bytes): zero them in a dp_reshardable optimizer state about to be saved."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for entry in _dp_reshardable_entries(state):
        padding = entry.get("padding")
        if getattr(padding, "obj", padding) is True:
            for value in entry.values():
                if isinstance(value, ShardedTensor) and value.data is not None:
                    value.data.zero_()


def _drop_live_steps(state: dict) -> dict:
    # megatron-core 0.16.1, dp_reshardable with torch's Adam (no TE/apex): the per-parameter "step" rides along
    # as a non-persistent object holding the *loading* optimizer's own counter, and its loader copies it over the
    # step megatron has just restored from the checkpoint's param groups: Adam's bias correction restarts. Drop
    # those entries so the restored step stays (a resumed step then equals the uninterrupted one).
    for entry in _dp_reshardable_entries(state):
        entry.pop("step", None)
    return state


class BucketLayoutError(ValueError):
    """A dp_reshardable optimizer state saved with another DDP bucket layout than the loading optimizer's."""


def load_optimizer_state(optimizer: Any, state: dict) -> None:
    """`optimizer.load_state_dict(state)` with megatron-core 0.16.1's loading bugs worked around (the live-step
    overwrite, the shared "step" tensors, the grad-mode copy). Raises BucketLayoutError when megatron refuses a
    dp_reshardable state written with another bucket layout."""
    try:
        # megatron-core 0.16.1: dp_reshardable's loader copies into the fp32 main params (views of leaves that
        # require grad) outside no_grad; autograd refuses that, and nothing here is to be recorded anyway
        with torch.no_grad():
            optimizer.load_state_dict(_drop_live_steps(state))
    except AssertionError as e:
        # megatron-core 0.16.1 only asserts (message "... unpadded elements ...") on a bucket layout mismatch
        if "unpadded elements" not in str(e):
            raise
        raise BucketLayoutError(str(e)) from None
    unshare_adam_steps(optimizer)


# ------------------------------------------------------------------------------------------------------------
# DDP


def disarm_ddp(ddp: Any) -> None:
    """Disarm a megatron DistributedDataParallel wrapper that a rebuild replaces (fine-tuning's unfreeze).
    megatron-core 0.16.1 registers its gradient hooks on the parameters' gradient accumulators without keeping
    handles; they stay attached, and each starts with `if param in self.param_to_bucket_group`: emptying that
    map makes them no-ops, so the new wrapper alone handles every gradient (tests/e2e/test_finetune.py checks the
    gradients after a rebuild). With parallel.overlap_param_gather the current weights are gathered first."""
    if getattr(ddp, "use_forward_hook", False):
        ddp.disable_forward_pre_hook(param_sync=True)
    ddp.param_to_bucket_group.clear()


def finalize_grads(model_chunks: list, num_tokens: torch.Tensor | None = None, pg_collection: Any = None,
                   force_all_reduce: bool = False, *, params: list[torch.nn.Parameter],
                   tp_group: Any) -> None:
    """megatron-core 0.16.1's finalize_model_grads (the signature its schedules call as
    config.finalize_model_grads_func) without its division by the token count: the loss functions already divide
    by the step's global count before backward (training/step.py says why). Then the TP sum of `params`' partial
    gradients (the local-slice parameters when TP > 1 and SP is off; megatron sums those marked
    `sequence_parallel` only when SP is on). Bind params and tp_group with functools.partial."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model_chunks, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    grads = [p.main_grad.data for p in params if p.requires_grad]
    if not grads:
        return
    coalesced = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(coalesced, group=tp_group)
    for buf, synced in zip(grads, _unflatten_dense_tensors(coalesced, grads)):
        buf.copy_(synced)


def zero_gradients_anchor(params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """A scalar 0 that depends on every trainable one of `params` (None when none is): added to the output of a
    module that did not run (a layer LayerDrop skips), it gives each of them a zero gradient, as if it had run.
    megatron-core 0.16.1's DDP marks a parameter's gradient ready in a hook on its gradient accumulator, which fires
    only when autograd reaches the parameter; with overlap_grad_reduce a bucket is reduced only once all of its
    parameters are ready on the last micro-batch, so a parameter without a gradient leaves its bucket unreduced:
    finish_grad_sync asserts "Communication call has not been issued for this bucket" (or, on the first step, whose
    counts become the expected ones, the bucket group's reset asserts on the next). With the anchor every hook fires
    once per micro-batch whichever layers ran, under micro-batching, recompute (it fires in the recomputation) and
    the distributed optimizer alike; the gradients are exact zeros (finite for fp16's scaler, nothing to clip) and
    the optimizer treats the parameter as one with a zero gradient (Adam's moments still move it, as megatron does
    for any zero gradient). The cost is one gradient-sized zero per parameter."""
    firsts = [p.reshape(-1)[:1].float() for p in params if p.requires_grad]  # one element each: no overflow
    if not firsts:
        return None
    return torch.cat(firsts).sum() * 0.0


# ------------------------------------------------------------------------------------------------------------
# Attention specs


def attention_mask_type(attention_mask: torch.Tensor | None) -> Any:
    """The AttnMaskType a bidirectional attention call needs: `no_mask` without a mask (pre-training's unpadded
    crops, validation, `embed`), `padding` with one (fine-tuning's padded batches). megatron-core 0.16.1's BERT
    specs fix `padding` at build time; Transformer Engine asserts when a padding type comes without a mask
    ("Please provide attention_mask for padding!") and would ignore a mask passed under `no_mask`."""
    from megatron.core.transformer.enums import AttnMaskType

    return AttnMaskType.no_mask if attention_mask is None else AttnMaskType.padding


def mask_type_from_call(core_attention: type) -> type:
    """`core_attention` (TE's TEDotProductAttention, our SDPAttention) taking its mask type from each call's mask
    (attention_mask_type) instead of the type megatron-core 0.16.1's SelfAttention passes (the spec's fixed
    one)."""

    class CallMaskType(core_attention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):  # noqa: ANN001, ANN202
            return super().forward(query, key, value, attention_mask,
                                   attn_mask_type=attention_mask_type(attention_mask), **kwargs)

    CallMaskType.__name__ = CallMaskType.__qualname__ = f"{core_attention.__name__}CallMaskType"
    return CallMaskType


# ------------------------------------------------------------------------------------------------------------
# dist_checkpointing's torch_dist format


TORCH_DIST_METADATA_GLOBALS: dict[str, set[str]] = {
    # megatron-core 0.16.1's torch_dist strategy pickles these classes into a checkpoint's `.metadata`
    "megatron.core.dist_checkpointing.strategies.torch": {"MCoreMetadata", "MCoreSavePlan"},
}
"""megatron-core's classes that checkpoint/integrity.py's restricted unpickler accepts in `.metadata`."""
