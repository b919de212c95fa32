"""Fine-tuning heads on the wav2vec 2.0 encoder: a linear CTC head, a mean-pooled linear classifier, and an
optional SUPERB-style learned weighted sum of the hidden states; the wrapper that puts one on the encoder.

Tensor layouts: the encoder gives context vectors [B, F, H] of the whole utterance, gathered over TP and identical
on every TP rank; heads map them to CTC logits [B, F, V] (V = vocabulary + blank at index 0) or class logits
[B, C]. The heads (and the layer weights) therefore run *replicated* on every TP rank. Each rank reports 1/tp of
the loss (training/finetune_step.py), so the gradients reaching the encoder through the gather's reduce-scatter
add up to exactly one copy, and the head's own gradients are 1/tp partial sums: they are listed in
`local_params()` and summed over TP in the same place as the time-sliced front-end's (docs/design.md §3, "who holds
what").

Layouts transformers can express (tools/convert_to_hf.py): CTCHead = Wav2Vec2ForCTC's `lm_head`;
MeanPoolClassifier = Wav2Vec2ForSequenceClassification with an identity `projector` (classifier_proj_size =
hidden size) and our linear as its `classifier`, with or without `use_weighted_layer_sum` (our layer weights are
its `layer_weights`: the same softmax over the same L + 1 hidden states, transformers' (>= 5) `hidden_states`:
the positional-conv output and each layer's output, the last one before the final LayerNorm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default
from torch import nn

from .model import Wav2Vec2ForPretraining

# Sub-modules of the pre-training model that fine-tuning never uses: frozen, out of the optimizer, not exported.
PRETRAINING_ONLY = ("quantizer", "project_q", "project_hid")


class LayerWeightedSum(nn.Module):
    """sum_i softmax(w)_i h_i over `num_states` hidden states [B, F, H] (SUPERB; transformers' layer_weights).
    Starts uniform."""

    def __init__(self, num_states: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_states))

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        if len(states) != self.weight.numel():
            raise ValueError(f"{len(states)} hidden states for {self.weight.numel()} layer weights")
        norm = torch.softmax(self.weight.float(), dim=0)
        # Same expression as transformers: stack [B, L+1, F, H], weight, sum over the layer axis.
        stacked = torch.stack(states, dim=1)
        return (stacked * norm.to(stacked.dtype).view(-1, 1, 1)).sum(dim=1)


class _LinearHead(nn.Module):
    """Dropout + a linear layer initialized N(0, init_std) with zero bias; subclasses say what it reads."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float, init_std: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, num_outputs)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)


class CTCHead(_LinearHead):
    """Dropout + linear: [B, F, H] -> CTC logits [B, F, V]; index 0 is the blank."""

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.proj(self.dropout(x))  # padded frames get logits too; the loss and decoding skip them


class MeanPoolClassifier(_LinearHead):
    """Mean over the real frames, dropout, linear: [B, F, H] -> class logits [B, C]."""

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        if padding_mask is None:
            pooled = x.mean(dim=1)
        else:
            # transformers' order of operations (zero the padded frames, sum, divide by the real count): the
            # export then reproduces our numbers, not just approximately.
            real = (~padding_mask).sum(dim=1, keepdim=True).to(x.dtype)  # [B, 1]
            pooled = x.masked_fill(padding_mask[..., None], 0.0).sum(dim=1) / real
        return self.proj(self.dropout(pooled))


class Wav2Vec2ForFinetuning(MegatronModule):
    """The pre-training model's encoder (its quantizer and projections unused) + an optional layer weighting + a
    head. Built by `factory.build_model` (with a HeadSpec).

    Checkpoint keys: the encoder keeps exactly the pre-training model's keys and the head's are added under
    `head.` / `layer_sum.`, so a fine-tuned checkpoint also loads wherever a pre-training one does (`embed`,
    `convert_to_hf --model-class base`, `finetune pretrained=`), and a pre-training checkpoint starts this model.
    """

    model_type = ModelType.encoder_or_decoder  # read by megatron's schedules

    def __init__(self, config: TransformerConfig, wav2vec2: Wav2Vec2ForPretraining, head: nn.Module,
                 layer_sum: LayerWeightedSum | None = None):
        super().__init__(config=config)
        self.wav2vec2 = wav2vec2
        self.layer_sum = layer_sum
        self.head = head
        self.tp_group = wav2vec2.tp_group

    def set_input_tensor(self, input_tensor) -> None:  # one pipeline stage
        pass

    # ---- parameter sets ------------------------------------------------------------------------------------

    def head_params(self) -> list[nn.Parameter]:
        """The head and the layer weights: trained from the first step."""
        modules = [self.head] + ([self.layer_sum] if self.layer_sum is not None else [])
        return [p for m in modules for p in m.parameters()]

    def encoder_params(self, include_feature_encoder: bool = True) -> list[nn.Parameter]:
        """The encoder as fine-tuning uses it: never the quantizer / projections of pre-training, nor, under a
        layer weighting (which reads the last layer before it), the final LayerNorm."""
        unused = [getattr(self.wav2vec2, name) for name in PRETRAINING_ONLY]
        if self.layer_sum is not None:
            unused.append(self.wav2vec2.encoder.block.final_layernorm)
        if not include_feature_encoder:
            unused.append(self.wav2vec2.feature_extractor)
        skip = {id(p) for m in unused for p in m.parameters()}
        return [p for p in self.wav2vec2.parameters() if id(p) not in skip]

    def set_trainable(self, encoder: bool, feature_encoder: bool, mask_emb: bool) -> list[nn.Parameter]:
        """Set requires_grad on every parameter; returns the trainable ones. A frozen parameter is then out of
        megatron's DDP buffers and optimizer (both skip requires_grad=False), so weight decay cannot move it;
        Every trainable parameter must receive a gradient every step (megatron's overlapped reduce waits for
        each), hence `mask_emb` frozen when nothing is masked and the unused final LayerNorm under a layer
        weighting."""
        for p in self.parameters():
            p.requires_grad_(False)
        trainable = self.head_params()
        if encoder:
            trainable += [p for p in self.encoder_params(feature_encoder)
                          if p is not self.wav2vec2.mask_emb or mask_emb]
        for p in trainable:
            p.requires_grad_(True)
        return trainable

    def local_params(self) -> list[nn.Parameter]:
        """Parameters whose gradient on a TP rank is a partial sum (summed over TP once, parallelize.py): the
        time-sliced front-end, and the head / layer weights (replicated computation, 1/tp of the loss each)."""
        return self.wav2vec2.local_params() + self.head_params()

    # ---- forward -------------------------------------------------------------------------------------------

    def forward(self, waveform: torch.Tensor, padding_mask: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, channel_mask: torch.Tensor | None = None,
                skip_layers: Sequence[int] = ()) -> torch.Tensor:
        """waveform [B, T] (normalized, right-padded with zeros; frames a multiple of tp), padding_mask [B, F]
        True at padded frames, mask [B, F] time mask, channel_mask [B, H], skip_layers (LayerDrop's, when
        training): identical on every TP rank. Returns CTC logits [B, F, V] or class logits [B, C] (replicated on
        the TP group)."""
        if self.layer_sum is None:
            x = self.wav2vec2.encode(waveform, mask=mask, padding_mask=padding_mask, channel_mask=channel_mask,
                                     skip_layers=skip_layers)
        else:
            # a skipped layer's state is its input, as in transformers' hidden_states under layerdrop
            states = self.wav2vec2.encode(waveform, mask=mask, padding_mask=padding_mask,
                                          channel_mask=channel_mask, all_layers=True, skip_layers=skip_layers)
            # encode gives [h_0, ..., h_L, LN(h_L)]; the weighted states are transformers' (>= 5) hidden_states:
            # h_0 (after the positional conv) and every layer's output, h_L before the final LayerNorm.
            x = self.layer_sum(states[:-1])
        return self.head(x, padding_mask)

    # ---- checkpoint keys (see the class docstring) ---------------------------------------------------------

    _OWN = ("head.", "layer_sum.")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        sd = self.wav2vec2.sharded_state_dict(prefix, sharded_offsets, metadata)
        for name in ("head", "layer_sum"):
            module = getattr(self, name)
            if module is not None:
                sd.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                     tp_group=self.tp_group))
        return sd

    def load_state_dict(self, state_dict, strict: bool = True):
        renamed = {(k if k.startswith(self._OWN) else f"wav2vec2.{k}"): v for k, v in state_dict.items()}
        return super().load_state_dict(renamed, strict=strict)


def build_finetuning_model(
    wav2vec2: Wav2Vec2ForPretraining,
    kind: str,
    num_outputs: int,
    layer_weighting: bool = False,
    final_dropout: float = 0.0,
    init_std: float = 0.02,
) -> Wav2Vec2ForFinetuning:
    """Put a head on a built pre-training model (factory.build_model builds it; load its weights before or
    after). kind: "ctc" (num_outputs = vocabulary + blank) or "classification" (num_outputs = classes)."""
    hidden = wav2vec2.config.hidden_size
    if kind == "ctc":
        head = CTCHead(hidden, num_outputs, final_dropout, init_std)
    elif kind == "classification":
        head = MeanPoolClassifier(hidden, num_outputs, final_dropout, init_std)
    else:
        raise ValueError(f"head kind {kind!r}: expected 'ctc' or 'classification'")
    num_states = wav2vec2.config.num_layers + 1
    layer_sum = LayerWeightedSum(num_states) if layer_weighting else None
    device = next(wav2vec2.parameters()).device  # the head joins the encoder where it was built
    return Wav2Vec2ForFinetuning(wav2vec2.config, wav2vec2, head, layer_sum).to(device)

