"""The transformer layer spec: megatron-core's bidirectional (BERT-style, pre-LN) layer.

Two paths, chosen once at build time:
- Transformer Engine modules when TE imports and CUDA is present (fused LayerNorm+Linear, TE attention), with the
  attention's mask type following each call (no mask in pre-training, padding in fine-tuning);
- otherwise megatron-core's local modules with an SDPA attention core and an SP-capable LayerNorm. This is
  the path CI tests on every machine without TE/apex (megatron's own fallback, WrappedTorchNorm, refuses
  sequence parallelism).
Both keep identical `sharded_state_dict` keys (the local spec maps its LayerNorms onto TE's fused names), so
checkpoints and the HF key map do not care which path trained them.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import divide

from megatron_speech.compat.megatron_core import mask_type_from_call, zero_gradients_anchor


def fp32_layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """`norm` with fp32 statistics whatever the activation dtype, result in x's dtype: fp16 statistics over 512-1024
    channels lose precision (docs/design.md §5: LayerNorms stay fp32 under mixed precision)."""
    if x.is_cuda:
        # CUDA's layer_norm accumulates half/bf16 inputs in fp32 itself (its acc_type): an fp32 copy of the
        # activations would only add memory traffic. It wants the affine parameters in the input's dtype.
        return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)


class LayerNorm(torch.nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activation dtype, usable with sequence parallelism.

    Under SP its input is a local sequence slice, so its parameter gradients are partial sums over TP; the
    `sequence_parallel` attribute tells megatron's finalize_model_grads to all-reduce them.
    Signature `(config, hidden_size, eps)` is what megatron's ModuleSpec builds norms with.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_layer_norm(x, self)


class SDPAttention(MegatronModule):
    """Attention core on torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU).

    Drop-in for megatron's DotProductAttention (same constructor and forward), which materializes the
    [b, np, s, s] score matrix through a global buffer: 2.3 GB per layer for XL at 20 s crops and batch 8.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by the SDPA attention core")
        tp_size = pg_collection.tp.size() if pg_collection is not None else 1
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.head_dim = divide(projection_size, config.num_attention_heads)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        sq, b = query.shape[:2]
        # [s, b, np, hn] -> [b, np, s, hn] (SDPA's layout)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # megatron's padding mask: True = masked out, [b, 1, 1, s]; SDPA's bool mask: True = attend.
        mask = None if attention_mask is None else ~attention_mask
        dropout_p = self.dropout_p if self.training else 0.0
        # Heads are TP-local: their dropout must differ across TP ranks (megatron's DotProductAttention does
        # the same; under sequence parallelism the whole block already runs inside the fork).
        local_rng = not self.config.sequence_parallel and dropout_p > 0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if local_rng else nullcontext()
        with rng:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                 scale=self.softmax_scale)
        # [b, np, s, hn] -> [s, b, np * hn]
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


class LayerDropTransformerLayer(TransformerLayer):
    """megatron-core's TransformerLayer that LayerDrop can skip (layerdrop.py): while training with `skip` set, its
    output is its input (and no context), plus a zero that gives each of its parameters a zero gradient
    (compat/megatron_core.zero_gradients_anchor: megatron's DDP waits for every one).

    `skip` is set by the encoder before each forward and stays until the next one, not reset after: megatron's
    full recompute (TransformerBlock._checkpointed_forward) calls the layer again during backward, and the
    recomputation must skip what the forward skipped. One pipeline stage, so a micro-batch's backward always comes
    before the next micro-batch's forward."""

    skip: bool = False

    def forward(self, *args, **kwargs):
        if not (self.skip and self.training):
            return super().forward(*args, **kwargs)
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        zero = zero_gradients_anchor(self.parameters())
        if zero is not None:
            hidden_states = hidden_states + zero.to(hidden_states.dtype)
        return hidden_states, kwargs.get("context")


def te_available() -> bool:
    """True when Transformer Engine imports and CUDA is present (the only case its spec is used)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a half-installed TE raises more than ImportError
        return False
    return True


def local_layer_spec() -> ModuleSpec:
    """megatron-core's local BERT layer with our SP-capable LayerNorm and the SDPA attention core."""
    return ModuleSpec(
        module=LayerDropTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LayerNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.padding},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=mask_type_from_call(SDPAttention),
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LayerNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as TE's fused LayerNorm+Linear modules.
            sharded_state_dict_keys_map=dict(bert_layer_local_spec.submodules.sharded_state_dict_keys_map),
        ),
    )


def block_spec(num_layers: int, use_te: bool | None = None) -> TransformerBlockSubmodules:
    """Spec of the whole transformer block: `num_layers` layers and the final LayerNorm (pre-LN stack)."""
    if use_te is None:
        use_te = te_available()
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.bert.bert_layer_specs import get_bert_layer_with_transformer_engine_spec

        layer = get_bert_layer_with_transformer_engine_spec()
        assert layer.module is TransformerLayer  # what LayerDropTransformerLayer extends
        layer.module = LayerDropTransformerLayer
        attention = layer.submodules.self_attention.submodules
        attention.core_attention = mask_type_from_call(attention.core_attention)
        return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=TENorm)
    return TransformerBlockSubmodules(layer_specs=[local_layer_spec()] * num_layers, layer_norm=LayerNorm)
