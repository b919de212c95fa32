"""Test helpers for parity with transformers' Wav2Vec2ForPreTraining: a tiny random model, a batch, negatives."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from megatron_speech.common.rng import counter_rng
from megatron_speech.models.wav2vec2 import interop
from megatron_speech.models.wav2vec2.masker import compute_span_mask, sample_negatives


def hf_tiny_config(**kw):
    """An XLSR-style (layer-norm extractor, stable layer norm) config at tiny size; dropouts off."""
    base = dict(
        conv_dim=[32] * 7, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, proj_codevector_dim=24, codevector_dim=32,
        num_codevectors_per_group=16, num_codevector_groups=2, num_negatives=7, feat_extract_norm="layer",
        do_stable_layer_norm=True, conv_bias=True, layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, feat_quantizer_dropout=0.0, mask_time_prob=0.5,
        mask_time_length=2, diversity_loss_weight=0.1,
    )
    base.update(kw)
    return transformers.Wav2Vec2Config(**base)


def random_hf_model(seed: int = 0):
    """(transformers model in eval mode, our config): every tensor random, the same for a given seed."""
    torch.manual_seed(seed)
    hf_cfg = hf_tiny_config()
    hf = transformers.Wav2Vec2ForPreTraining(hf_cfg).eval()
    # randomize every tensor (HF zero/one-initializes biases and norms, which would hide mapping mistakes)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf, interop.config_from_hf(hf_cfg)


def batch(cfg, num_frames=40, batch_size=3, seed=0):
    rng = counter_rng(seed, 0, 0, 0)
    wave = torch.from_numpy(rng.standard_normal((batch_size, cfg.num_samples(num_frames))).astype(np.float32))
    mask = compute_span_mask((batch_size, num_frames), cfg.mask_prob, cfg.mask_length_frames, rng, min_masks=2)
    negatives = sample_negatives(mask, cfg.num_negatives, rng)
    return wave, torch.from_numpy(mask), torch.from_numpy(negatives)


def hf_negatives(negatives: torch.Tensor) -> torch.Tensor:
    # ours: frame index within the utterance; transformers: index into the flattened [B * F] targets
    b, f, _ = negatives.shape
    return negatives + (torch.arange(b) * f)[:, None, None]
