"""The context network: conv positional embedding + megatron-core TransformerBlock, in megatron's layouts.

Input and output are this TP rank's frames, [s/tp, b, h]. What crosses TP ranks is fixed at build time by
`sequence_parallel` (no branches on the TP size in forward; at TP=1 every exchange is the identity):
- SP on:  the block runs on the local slice ([s/tp, b, h] is megatron's SP layout); the positional conv runs on
          the gathered full sequence (gather backward = split) and its output is split back (split backward =
          all-gather), so its parameters see the full sequence and get the full gradient on every rank
          (replicated: never reduced).
- SP off: the local slice is gathered once before the block (backward = split) and the block's replicated
          output is split after it (backward = all-gather, so every rank gets the full gradient of the
          replicated activations, although each rank's loss only covers its own frames).
The positional conv is always computed on the full sequence: this avoids 64-frame halo exchanges and keeps its
parameters replicated (docs/design.md §3 lets us pick; this is the simpler of the two to prove correct).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from .position_encoder import ConvPositionEncoder


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Wav2Vec2Encoder(MegatronModule):
    """[s/tp, b, h] (local frames, after masking) -> [s/tp, b, h] after the final LayerNorm."""

    def __init__(self, config: TransformerConfig, spec: TransformerBlockSubmodules, pos_conv_kernel: int,
                 pos_conv_groups: int, dropout: float, pg_collection):
        super().__init__(config=config)
        tp_group = pg_collection.tp
        self.pos_conv = ConvPositionEncoder(config.hidden_size, pos_conv_kernel, pos_conv_groups)
        self.dropout = nn.Dropout(dropout)
        self.block = TransformerBlock(config, spec, post_layer_norm=True, pg_collection=pg_collection)

        def gather(x):  # [s/tp, b, h] -> [s, b, h]; backward: this rank's slice of the (replicated) grad
            return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=tp_group)

        def split(x):  # [s, b, h] -> [s/tp, b, h]; backward: all-gather of the slices' grads
            return scatter_to_sequence_parallel_region(x, group=tp_group)

        if config.sequence_parallel:
            self._to_block, self._from_block = _identity, _identity
            self._pos_in, self._pos_out = gather, split
            # the post-positional dropout acts on a local slice: TP-rank-specific randomness
            self._dropout_rng = lambda: tensor_parallel.get_cuda_rng_tracker().fork()
        else:
            self._to_block, self._from_block = gather, split
            self._pos_in, self._pos_out = _identity, _identity
            # replicated activations: the default generator, identical on every TP rank
            self._dropout_rng = nullcontext

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_layer: int | None = None, all_layers: bool = False, skip_layers: Sequence[int] = ()):
        """`attention_mask` [b, 1, 1, s] True at padded frames. `output_layer` L returns the output of
        transformer layer L (1-based) before any final norm, like transformers' hidden_states[L]; `all_layers`
        returns [hidden_states[0], ..., hidden_states[L], final output] (a SUPERB-style weighted sum).
        `skip_layers`: 0-based layers LayerDrop skips in this forward when training (layerdrop.py); a skipped
        layer's hidden state is its input, as transformers' (the same on every TP rank: the micro-batch's)."""
        self._set_skips(skip_layers)
        x = self._to_block(x)
        # pos conv over [b, s, h]; [s, b, h] <-> [b, s, h] at each side
        pos = self.pos_conv(self._pos_in(x).transpose(0, 1)).transpose(0, 1)
        x = x + self._pos_out(pos)
        with self._dropout_rng():
            x = self.dropout(x)
        if output_layer is None and not all_layers:
            return self._from_block(self.block(x, attention_mask))
        num = len(self.block.layers) if all_layers else output_layer
        if not 0 <= num <= len(self.block.layers):
            raise ValueError(f"layer {num} out of range: the model has {len(self.block.layers)} layers")
        outputs = [x]
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        with rng:
            for layer in self.block.layers[:num]:
                x, _ = layer(hidden_states=x, attention_mask=attention_mask)
                outputs.append(x)
            if not all_layers:
                return self._from_block(x)
            outputs.append(self.block.final_layernorm(x))
        return [self._from_block(h) for h in outputs]

    def _set_skips(self, skip_layers: Sequence[int]) -> None:
        # every layer's flag, every forward (LayerDropTransformerLayer says why they outlive it)
        num = len(self.block.layers)
        if any(not 0 <= i < num for i in skip_layers):
            raise ValueError(f"skip_layers={tuple(skip_layers)}: the model has layers 0..{num - 1}")
        for i, layer in enumerate(self.block.layers):
            layer.skip = i in skip_layers
