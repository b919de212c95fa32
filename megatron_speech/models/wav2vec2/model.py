"""wav2vec 2.0 for pre-training, on megatron-core, with time-sharded tensor parallelism (docs/design.md §2-§3).

Tensor layouts: waveform [B, T] (replicated on the TP group) -> conv features [B, C, F/tp] (this rank's frames)
-> [B, F/tp, C] -> projection [B, F/tp, H] -> [s/tp, b, h] (megatron) -> encoder -> [b, s/tp, h] for the heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from .encoder import Wav2Vec2Encoder
from .feature_extractor import ConvFeatureExtractor
from .layer_spec import fp32_layer_norm
from .quantizer import GumbelVectorQuantizer, perplexity


@dataclass
class PretrainOutput:
    """One micro-batch's loss pieces on this TP rank. Sums, not means: the step divides them by the global
    masked-frame count before backward (training/step.py, Loss normalization)."""

    loss: torch.Tensor
    """This rank's share of contrastive sum + diversity + feature penalty; summed over TP = the group's loss."""
    num_masked: torch.Tensor
    """Masked frames of the whole TP group (int; identical on every TP rank)."""
    local_count: torch.Tensor
    """Masked frames on this rank (float)."""
    contrastive: torch.Tensor
    """InfoNCE summed over this rank's masked frames (detached)."""
    diversity: torch.Tensor
    """(GV - prob perplexity) / GV of the TP group's masked frames (detached)."""
    prob_perplexity: torch.Tensor
    """Perplexity of the mean soft code distribution (detached)."""
    code_perplexity: torch.Tensor
    """Perplexity of the hard code histogram: codebook usage (detached)."""
    accuracy_sum: torch.Tensor
    """Masked frames whose positive scored highest, this rank (detached)."""


class Wav2Vec2ForPretraining(MegatronModule):
    """Built by `factory.build_model`; modules take dimensions, not the config object."""

    model_type = ModelType.encoder_or_decoder  # read by megatron's schedules

    def __init__(
        self,
        config: TransformerConfig,
        feature_extractor: ConvFeatureExtractor,
        encoder: Wav2Vec2Encoder,
        quantizer: GumbelVectorQuantizer,
        conv_dim: int,
        final_dim: int,
        feature_proj_dropout: float,
        feature_quantizer_dropout: float,
        logit_temperature: float,
        diversity_loss_weight: float,
        feature_penalty_weight: float,
        pg_collection,
    ):
        super().__init__(config=config)
        hidden = config.hidden_size
        self.tp_group = pg_collection.tp
        self.feature_extractor = feature_extractor
        self.layer_norm = nn.LayerNorm(conv_dim, eps=config.layernorm_epsilon)
        self.post_extract_proj = nn.Linear(conv_dim, hidden)
        self.dropout_input = nn.Dropout(feature_proj_dropout)
        self.dropout_features = nn.Dropout(feature_quantizer_dropout)
        self.mask_emb = nn.Parameter(torch.empty(hidden).uniform_())
        self.encoder = encoder
        self.quantizer = quantizer
        self.project_q = nn.Linear(quantizer.codevectors.shape[-1] * quantizer.num_groups, final_dim)
        self.project_hid = nn.Linear(hidden, final_dim)
        for linear in (self.post_extract_proj, self.project_q, self.project_hid):
            nn.init.normal_(linear.weight, std=config.init_method_std)
            nn.init.zeros_(linear.bias)
        # TP exchanges are chosen here, once: at TP=1 they are the identity.
        tp = self.tp_group.size()
        self._tp_sum = partial(dist_fn.all_reduce, group=self.tp_group) if tp > 1 else _identity
        self._time_gather = partial(_time_gather, group=self.tp_group) if tp > 1 else _identity
        self.logit_temperature = logit_temperature
        self.diversity_loss_weight = diversity_loss_weight
        self.feature_penalty_weight = feature_penalty_weight

    # megatron's schedules call this on the first pipeline stage; there is one stage.
    def set_input_tensor(self, input_tensor) -> None:
        pass

    def local_params(self) -> list[nn.Parameter]:
        """Parameters applied to this rank's time slice only: their gradients are partial sums over TP."""
        modules = (self.feature_extractor, self.layer_norm, self.post_extract_proj, self.quantizer,
                   self.project_q, self.project_hid)
        return [p for m in modules for p in m.parameters()] + [self.mask_emb]

    def _frame_range(self, num_frames: int) -> tuple[int, int]:
        tp, rank = self.tp_group.size(), self.tp_group.rank()
        if num_frames % tp:
            raise ValueError(f"{num_frames} frames cannot be split over {tp} TP ranks: crop to a multiple of tp")
        per_rank = num_frames // tp
        return rank * per_rank, (rank + 1) * per_rank

    def extract_features(self, waveform: torch.Tensor, num_frames: int):
        """Waveform [B, T] -> (pre-mask normalized features [B, F/tp, C], projected [B, F/tp, H], sum of squares
        of the raw conv features, their element count, this rank's frame range)."""
        f0, f1 = self._frame_range(num_frames)
        feats = self.feature_extractor(waveform, f0, f1).transpose(1, 2)  # [B, C, F/tp] -> [B, F/tp, C]
        penalty_sum = feats.float().pow(2).sum()
        # torch.full fills on the device; torch.tensor(x, device=cuda) would copy from the host and sync the stream
        penalty_count = torch.full((), float(feats.numel()), device=feats.device)
        feats = fp32_layer_norm(feats, self.layer_norm)
        return feats, self.post_extract_proj(feats), penalty_sum, penalty_count, (f0, f1)

    def encode(self, waveform: torch.Tensor, mask: torch.Tensor | None = None,
               padding_mask: torch.Tensor | None = None, channel_mask: torch.Tensor | None = None,
               output_layer: int | None = None, all_layers: bool = False, skip_layers: Sequence[int] = ()):
        """The encoder as fine-tuning and embedding use it: context vectors [B, F, H] of the whole utterance
        (gathered over TP) after the final LayerNorm (transformers' last_hidden_state), or the output of layer
        `output_layer` (its hidden_states[L]); with `all_layers`, the list hidden_states[0..L] followed by the
        final output. `mask` [B, F]: frames replaced by the mask embedding; `padding_mask` [B, F]: True at
        padded frames (zeroed before the positional conv and never attended to, as transformers does);
        `channel_mask` [B, H]: channels zeroed (SpecAugment); `skip_layers`: LayerDrop's, when training."""
        num_frames = self.feature_extractor.num_frames(waveform.shape[1])
        _, x, _, _, (f0, f1) = self.extract_features(waveform, num_frames)
        with tensor_parallel.get_cuda_rng_tracker().fork():  # local slices: TP-rank-specific dropout
            x = self.dropout_input(x)
        if mask is not None:
            x = torch.where(mask[:, f0:f1, None], self.mask_emb.to(x.dtype), x)
        if channel_mask is not None:
            x = x.masked_fill(channel_mask[:, None, :], 0.0)
        attention_mask = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[:, f0:f1, None], 0.0)
            attention_mask = padding_mask[:, None, None, :]  # [b, 1, 1, s]: megatron's padding mask, True = pad
        out = self.encoder(x.transpose(0, 1).contiguous(), attention_mask, output_layer=output_layer,
                           all_layers=all_layers, skip_layers=skip_layers)  # [s/tp, b, h] (a list with all_layers)
        if all_layers:
            return [self._time_gather(h.transpose(0, 1)) for h in out]
        return self._time_gather(out.transpose(0, 1))  # [b, s/tp, h] -> [B, F, H]

    def quantized_targets(self, waveform: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected targets [N, D], codes [N, G]) of this rank's masked frames, in (batch, time) order."""
        feats, _, _, _, (f0, f1) = self.extract_features(waveform, mask.shape[1])
        q = self.quantizer(self.dropout_features(feats)[mask[:, f0:f1]])
        return self.project_q(q.codevectors), q.codes

    def forward(
        self,
        waveform: torch.Tensor,
        mask: torch.Tensor,
        negatives: torch.Tensor,
        channel_mask: torch.Tensor | None = None,
        skip_layers: Sequence[int] = (),
    ) -> PretrainOutput:
        """waveform [B, T] float (T = 320 (F - 1) + 400), mask [B, F] bool (the full utterance's time mask),
        negatives [B, F, K] int64 (distractor frames per masked frame, `masker.sample_negatives`),
        channel_mask [B, H] bool or None, skip_layers: the layers LayerDrop skips when training (layerdrop.py).
        Identical on every TP rank of the group."""
        batch, num_frames = mask.shape
        feats, x, penalty_sum, penalty_count, (f0, f1) = self.extract_features(waveform, num_frames)
        local_mask = mask[:, f0:f1]  # [B, F/tp]
        # The masked positions, found once: a GPU syncs with the host for this (the count sets shapes); indexing
        # with these indices later does not, where every boolean-mask index (and its backward) would sync again.
        masked = local_mask.nonzero(as_tuple=True)  # (batch, local time) of the N_local masked frames, in order
        with tensor_parallel.get_cuda_rng_tracker().fork():  # local slices: TP-rank-specific dropout
            x = self.dropout_input(x)
            unmasked = self.dropout_features(feats)
        x = torch.where(local_mask[..., None], self.mask_emb.to(x.dtype), x)
        if channel_mask is not None:
            x = x.masked_fill(channel_mask[:, None, :], 0.0)

        x = self.encoder(x.transpose(0, 1).contiguous(), skip_layers=skip_layers)  # [B, F/tp, H] -> [s/tp, b, h]
        x = x.transpose(0, 1)  # [s/tp, b, h] -> [b, s/tp, h]

        # Quantize only the masked frames: the only targets the loss reads (negatives are masked frames too).
        with tensor_parallel.get_cuda_rng_tracker().fork():  # Gumbel noise on local frames
            q = self.quantizer(unmasked[masked])
        y = self.project_q(q.codevectors)  # [N_local, D]
        return self._loss(x, y, q, local_mask, masked, mask, negatives, penalty_sum, penalty_count, f0)

    def _loss(self, x, y, q, local_mask, masked, mask, negatives, penalty_sum, penalty_count, f0) -> PretrainOutput:
        batch = mask.shape[0]
        b_idx, t_local = masked
        # Targets go into a dense [B, F/tp, D] tensor so that the TP group can all-gather them along time:
        # distractors are drawn over the whole utterance (gather backward = reduce-scatter: the distractor
        # gradients computed on other ranks flow back to the rank that owns the target).
        dense_y = y.new_zeros(batch, local_mask.shape[1], y.shape[-1]).index_put(masked, y)
        dense_codes = q.codes.new_zeros(batch, local_mask.shape[1], q.codes.shape[-1]).index_put(masked, q.codes)
        full_y = self._time_gather(dense_y)  # [B, F, D]
        full_codes = self._time_gather(dense_codes)  # [B, F, G]

        # Cosine similarities in fp32 between every local prediction and every target of its utterance
        # ([B, F/tp, F]: far smaller than materializing K distractor vectors per frame), then pick.
        pred = F.normalize(self.project_hid(x).float(), dim=-1, eps=1e-8)  # [B, F/tp, D]
        targets = F.normalize(full_y.float(), dim=-1, eps=1e-8)
        sims = torch.bmm(pred, targets.transpose(1, 2))  # [B, F/tp, F]
        t_full = t_local + f0
        neg = negatives[b_idx, t_full]  # [N, K]
        pos_logit = sims[b_idx, t_local, t_full]  # [N]
        neg_logits = sims[b_idx[:, None], t_local[:, None], neg]  # [N, K]
        # A distractor with the positive's code is the positive: excluded (fairseq / transformers compare the
        # projected vectors; comparing codes is the same test without rounding noise from straight-through).
        neg_is_pos = (full_codes[b_idx[:, None], neg] == full_codes[b_idx, t_full][:, None]).all(-1)
        neg_logits = neg_logits.masked_fill(neg_is_pos, float("-inf"))
        logits = torch.cat([pos_logit[:, None], neg_logits], dim=1) / self.logit_temperature  # [N, 1 + K]
        zeros = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        contrastive = F.cross_entropy(logits, zeros, reduction="sum")

        local_count = torch.full((), float(b_idx.numel()), device=logits.device)
        group_count = self._tp_sum(local_count)
        # The autograd all-reduce's backward is an all-reduce too: every rank adds the diversity term weighted
        # by its own masked count, and each rank's quantizer still gets the gradient of the group's whole term.
        prob_sum = self._tp_sum(q.prob_sum)
        num_codes = q.prob_sum.numel()
        prob_ppl = perplexity(prob_sum, group_count)
        diversity = (num_codes - prob_ppl) / num_codes
        loss = contrastive + self.diversity_loss_weight * diversity * local_count
        if self.feature_penalty_weight > 0:
            # fairseq: weight * mean(features^2) * masked count; linear in each rank's sum of squares.
            mean_scale = group_count / self._tp_sum(penalty_count)
            loss = loss + self.feature_penalty_weight * penalty_sum * mean_scale
        with torch.no_grad():
            code_ppl = perplexity(self._tp_sum(q.hard_count), group_count)
            correct = (logits.argmax(-1) == 0) & (logits[:, 0] > float("-inf"))
        return PretrainOutput(
            loss=loss,
            num_masked=group_count.to(torch.int),
            local_count=local_count,
            contrastive=contrastive.detach(),
            diversity=diversity.detach(),
            prob_perplexity=prob_ppl.detach(),
            code_perplexity=code_ppl,
            accuracy_sum=correct.sum().float(),
        )


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _time_gather(x: torch.Tensor, group) -> torch.Tensor:
    """[B, F/tp, ...] -> [B, F, ...] over the TP group, differentiable for float tensors (backward:
    reduce-scatter, the sum of the gradients every rank computed for these frames)."""
    x = x.transpose(0, 1).contiguous()  # [B, F/tp, ...] -> [F/tp, B, ...]: megatron gathers dim 0
    if x.is_floating_point():
        x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
    else:
        parts = [torch.empty_like(x) for _ in range(group.size())]
        torch.distributed.all_gather(parts, x, group=group)
        x = torch.cat(parts, dim=0)
    return x.transpose(0, 1)  # [F, B, ...] -> [B, F, ...]
