"""Conversion to and from Hugging Face transformers' Wav2Vec2ForPreTraining, as data.

The key space on our side is megatron-core's `sharded_state_dict` naming at TP=1 ("canonical" keys): identical
for the local and the Transformer Engine layer specs (TE fuses each pre-LN LayerNorm into the following linear,
`linear_qkv.layer_norm_weight`; the local spec maps its `input_layernorm.` onto that name), so a TE-trained
checkpoint converts on a CPU machine. A table of key patterns plus per-tensor transforms (the fused QKV layout)
does the rest; everything else is a rename.
"""

from __future__ import annotations

import re

import torch

from .config import Wav2Vec2Config

# (our canonical key, HF key) templates: {i} is a layer / block index, {p} is "weight" or "bias".
# megatron's fused QKV rows are grouped per head, [q_h0, k_h0, v_h0, q_h1, ...] (head_dim rows each): that is
# what ColumnParallelLinear splits contiguously over TP ranks, so heads never straddle ranks.
RENAMES: list[tuple[str, str]] = [
    ("mask_emb", "wav2vec2.masked_spec_embed"),
    ("feature_extractor.blocks.{i}.conv.{p}", "wav2vec2.feature_extractor.conv_layers.{i}.conv.{p}"),
    ("feature_extractor.blocks.{i}.layer_norm.{p}", "wav2vec2.feature_extractor.conv_layers.{i}.layer_norm.{p}"),
    ("layer_norm.{p}", "wav2vec2.feature_projection.layer_norm.{p}"),
    ("post_extract_proj.{p}", "wav2vec2.feature_projection.projection.{p}"),
    ("encoder.pos_conv.weight_g", "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv.weight_v", "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    ("encoder.pos_conv.bias", "wav2vec2.encoder.pos_conv_embed.conv.bias"),
    ("encoder.block.final_layernorm.{p}", "wav2vec2.encoder.layer_norm.{p}"),
    ("encoder.block.layers.{i}.self_attention.linear_qkv.layer_norm_{p}", "wav2vec2.encoder.layers.{i}.layer_norm.{p}"),
    ("encoder.block.layers.{i}.self_attention.linear_proj.{p}", "wav2vec2.encoder.layers.{i}.attention.out_proj.{p}"),
    ("encoder.block.layers.{i}.mlp.linear_fc1.layer_norm_{p}", "wav2vec2.encoder.layers.{i}.final_layer_norm.{p}"),
    ("encoder.block.layers.{i}.mlp.linear_fc1.{p}", "wav2vec2.encoder.layers.{i}.feed_forward.intermediate_dense.{p}"),
    ("encoder.block.layers.{i}.mlp.linear_fc2.{p}", "wav2vec2.encoder.layers.{i}.feed_forward.output_dense.{p}"),
    ("quantizer.codevectors", "quantizer.codevectors"),
    ("quantizer.weight_proj.{p}", "quantizer.weight_proj.{p}"),
    ("project_q.{p}", "project_q.{p}"),
    ("project_hid.{p}", "project_hid.{p}"),
]
# One of ours <-> three of HF's ({x} is q, k or v).
QKV = ("encoder.block.layers.{i}.self_attention.linear_qkv.{p}", "wav2vec2.encoder.layers.{i}.attention.{x}_proj.{p}")
# Older transformers checkpoints store the weight-normed positional conv as weight_g / weight_v.
HF_LEGACY = {"pos_conv_embed.conv.weight_g": "pos_conv_embed.conv.parametrizations.weight.original0",
             "pos_conv_embed.conv.weight_v": "pos_conv_embed.conv.parametrizations.weight.original1"}
# Task heads of transformers' fine-tuned classes (Wav2Vec2ForCTC's lm_head, ...ForSequenceClassification's
# projector / classifier / layer_weights): not part of the encoder, dropped on import (split_task_heads).
HF_TASK_HEADS = ("lm_head.", "projector.", "classifier.", "layer_weights")
# Ours that a transformers checkpoint may lack: an encoder-only class has no pre-training heads, and transformers
# creates masked_spec_embed only when mask_time_prob or mask_feature_prob > 0. They keep the model's fresh
# initialization (fairseq's: uniform_ for mask_emb, the quantizer's and projections' own init).
HF_OPTIONAL = ("mask_emb", "quantizer.", "project_q.", "project_hid.")
_SLOTS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "x": r"(?P<x>[qkv])"}


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)
    return re.compile("".join(re.escape(t) if n % 2 == 0 else _SLOTS[t] for n, t in enumerate(parts)))


_TO_HF = [(_regex(ours), hf) for ours, hf in RENAMES]
_FROM_HF = [(_regex(hf), ours) for ours, hf in RENAMES]
_QKV_OURS, _QKV_HF = _regex(QKV[0]), _regex(QKV[1])

# The local spec's module names -> canonical (sharded_state_dict) names.
_LOCAL_TO_CANONICAL = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                       "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    # [H, ...] x 3 -> [heads, 3, head_dim, ...] -> [3H, ...]
    parts = [t.reshape(num_heads, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(-1, *q.shape[1:])


def _split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grouped = qkv.reshape(num_heads, 3, -1, *qkv.shape[1:])
    return tuple(grouped[:, i].reshape(-1, *qkv.shape[1:]) for i in range(3))


def to_hf(ours: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """Canonical state dict -> transformers Wav2Vec2ForPreTraining state dict. Unknown keys are errors."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in ours.items():
        m = _QKV_OURS.fullmatch(key)
        if m:
            for x, part in zip("qkv", _split_qkv(tensor, num_heads)):
                out[QKV[1].format(x=x, **m.groupdict())] = part.clone()
        else:
            out[_rename(key, _TO_HF)] = tensor.clone()
    return out


def from_hf(hf: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """transformers Wav2Vec2ForPreTraining (or bare Wav2Vec2Model) state dict -> canonical state dict."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in hf.items():
        key = _normalize_hf_key(key)
        m = _QKV_HF.fullmatch(key)
        if m:
            pending.setdefault((m["i"], m["p"]), {})[m["x"]] = tensor
        else:
            out[_rename(key, _FROM_HF)] = tensor.clone()
    for (i, p), parts in pending.items():
        if set(parts) != set("qkv"):
            raise ValueError(f"layer {i}: attention {p} needs q_proj, k_proj and v_proj; got {sorted(parts)}")
        out[QKV[0].format(i=i, p=p)] = _fuse_qkv(parts["q"], parts["k"], parts["v"], num_heads)
    return out


def split_task_heads(hf: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the state dict without transformers' task heads, the dropped keys): what from_hf accepts."""
    heads = sorted(k for k in hf if k.startswith(HF_TASK_HEADS))  # top-level: the encoder's are "wav2vec2.*"
    return {k: v for k, v in hf.items() if k not in heads}, heads


def hf_name(canonical_key: str) -> str:
    """The transformers name of one of our canonical keys (the fused QKV named by its q_proj part)."""
    m = _QKV_OURS.fullmatch(canonical_key)
    return QKV[1].format(x="q", **m.groupdict()) if m else _rename(canonical_key, _TO_HF)


def _normalize_hf_key(key: str) -> str:
    for old, new in HF_LEGACY.items():
        key = key.replace(old, new)
    if not key.startswith(("wav2vec2.", "quantizer.", "project_q.", "project_hid.")):
        key = "wav2vec2." + key  # a bare Wav2Vec2Model
    return key


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str:
    for pattern, template in table:
        m = pattern.fullmatch(key)
        if m:
            return template.format(**m.groupdict())
    raise ValueError(f"no conversion rule for key {key!r}: the model is outside the supported wav2vec 2.0 family "
                     "(layer-norm extractor, pre-LN transformer)")


# ---- model <-> canonical ---------------------------------------------------------------------------------


def canonical_state_dict(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """The model's parameters (or, with `grads`, their gradients: DDP's main_grad where present) under
    canonical keys, as full TP-gathered tensors. A collective: call it on every TP rank."""
    out = {}
    for name, param in model.named_parameters():
        value = param.detach()
        if grads:
            value = getattr(param, "main_grad", None)
            value = param.grad if value is None else value
            if value is None:
                continue
        out[_to_canonical(name)] = _gather_tp(value, param)
    return out


def load_canonical(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full canonical tensors into the (possibly TP-sharded) model; every parameter must be given."""
    params = dict(model.named_parameters())
    names = {_to_canonical(n): n for n in params}
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    with torch.no_grad():
        for key, tensor in state.items():
            param = params[names[key]]
            local = _shard_tp(tensor, param)
            if local.shape != param.shape:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} does not fit the model's {tuple(param.shape)}")
            param.copy_(local)


def _to_canonical(name: str) -> str:
    for local, canonical in _LOCAL_TO_CANONICAL.items():
        name = name.replace(local, canonical)
    return name


def _tp_info(param: torch.Tensor) -> tuple[int, int, int] | None:
    if not getattr(param, "tensor_model_parallel", False):
        return None
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    return (param.partition_dim, tp, parallel_state.get_tensor_model_parallel_rank()) if tp > 1 else None


def _gather_tp(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    info = _tp_info(param)
    if info is None:
        return value.clone()
    from megatron.core import parallel_state

    dim, tp, _ = info
    parts = [torch.empty_like(value) for _ in range(tp)]
    torch.distributed.all_gather(parts, value.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _shard_tp(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    info = _tp_info(param)
    if info is None:
        return tensor
    dim, tp, rank = info
    return tensor.chunk(tp, dim=dim)[rank]


# ---- configs ---------------------------------------------------------------------------------------------


def config_from_hf(hf_config) -> Wav2Vec2Config:
    """A transformers Wav2Vec2Config -> ours. Models outside the supported family are refused."""
    problems = []
    if hf_config.feat_extract_norm != "layer":
        problems.append(f"feat_extract_norm={hf_config.feat_extract_norm!r} (need 'layer')")
    if not hf_config.do_stable_layer_norm:
        problems.append("do_stable_layer_norm=False (post-LN transformer; need the pre-LN 'stable layer norm')")
    if hf_config.hidden_act != "gelu" or hf_config.feat_extract_activation != "gelu":
        problems.append(f"activations {hf_config.hidden_act!r}/{hf_config.feat_extract_activation!r} (need gelu)")
    if getattr(hf_config, "add_adapter", False) or getattr(hf_config, "adapter_attn_dim", None):
        problems.append("adapters")
    if problems:
        raise ValueError("unsupported wav2vec 2.0 variant: " + "; ".join(problems) + ". megatron-speech supports "
                         "the layer-norm extractor + pre-LN family (XLSR-53, XLS-R, large-lv60); fairseq's and "
                         "HF's 'base' (group norm, post-LN) cannot be represented by megatron-core's pre-LN layer")
    return Wav2Vec2Config(
        conv_layers=[tuple(x) for x in zip(hf_config.conv_dim, hf_config.conv_kernel, hf_config.conv_stride)],
        conv_bias=hf_config.conv_bias,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        ffn_hidden_size=hf_config.intermediate_size,
        layer_norm_eps=hf_config.layer_norm_eps,
        dropout=hf_config.hidden_dropout,
        attention_dropout=hf_config.attention_dropout,
        layerdrop=hf_config.layerdrop,
        activation_dropout=0.0,
        feature_proj_dropout=hf_config.feat_proj_dropout,
        feature_quantizer_dropout=hf_config.feat_quantizer_dropout,
        pos_conv_kernel=hf_config.num_conv_pos_embeddings,
        pos_conv_groups=hf_config.num_conv_pos_embedding_groups,
        final_dim=hf_config.proj_codevector_dim,
        num_codevector_groups=hf_config.num_codevector_groups,
        num_codevectors_per_group=hf_config.num_codevectors_per_group,
        codevector_dim=hf_config.codevector_dim,
        mask_prob=hf_config.mask_time_prob,
        mask_length=hf_config.mask_time_length,
        mask_min_masks=hf_config.mask_time_min_masks,
        mask_channel_prob=hf_config.mask_feature_prob,
        mask_channel_length=hf_config.mask_feature_length,
        num_negatives=hf_config.num_negatives,
        logit_temperature=hf_config.contrastive_logits_temperature,
        diversity_loss_weight=hf_config.diversity_loss_weight,
    )


def config_to_hf(cfg: Wav2Vec2Config, **overrides):
    """Ours -> a transformers Wav2Vec2Config (stable layer norm, layer-norm extractor)."""
    from transformers import Wav2Vec2Config as HFConfig

    cfg.validate()
    dims, kernels, strides = zip(*cfg.conv_layers)
    kwargs = dict(
        conv_dim=list(dims), conv_kernel=list(kernels), conv_stride=list(strides), conv_bias=cfg.conv_bias,
        num_feat_extract_layers=len(dims), feat_extract_norm="layer", do_stable_layer_norm=True,
        feat_extract_activation="gelu", hidden_act="gelu",
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.ffn_hidden_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        activation_dropout=0.0, feat_proj_dropout=cfg.feature_proj_dropout,
        feat_quantizer_dropout=cfg.feature_quantizer_dropout, layerdrop=cfg.layerdrop,
        num_conv_pos_embeddings=cfg.pos_conv_kernel, num_conv_pos_embedding_groups=cfg.pos_conv_groups,
        proj_codevector_dim=cfg.final_dim, num_codevector_groups=cfg.num_codevector_groups,
        num_codevectors_per_group=cfg.num_codevectors_per_group, codevector_dim=cfg.codevector_dim,
        mask_time_prob=cfg.mask_prob, mask_time_length=cfg.mask_length_frames, mask_time_min_masks=cfg.mask_min_masks,
        mask_feature_prob=cfg.mask_channel_prob, mask_feature_length=cfg.mask_channel_length,
        num_negatives=cfg.num_negatives, contrastive_logits_temperature=cfg.logit_temperature,
        diversity_loss_weight=cfg.diversity_loss_weight,
    )
    kwargs.update(overrides)
    return HFConfig(**kwargs)

