"""The attention's mask type follows the call, as Transformer Engine needs: megatron's BERT specs fix
AttnMaskType.padding, and TE's DotProductAttention asserts "Please provide attention_mask for padding!" when that type
comes without a mask (pre-training, validation, `embed`), and ignores a mask passed under `no_mask`.

TE does not run on CPU; the test puts a core attention with TE's checks into the real model (local spec, same
SelfAttention, same wrapper as the TE spec) and runs the pre-training and fine-tuning forwards through it. The TE
kernels themselves are exercised by bench/gpu_check.sh's TE stage."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_speech.compat.megatron_core import attention_mask_type
from megatron_speech.models.wav2vec2 import layer_spec
from megatron_speech.models.wav2vec2.layer_spec import SDPAttention
from tests.fixtures import synthetic_batch, tiny_config


class TEChecks(SDPAttention):
    """SDPAttention with Transformer Engine's checks on the mask type it is called with; records the types."""

    seen: list[AttnMaskType] = []

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
        if attn_mask_type is not None and "padding" in attn_mask_type.name:
            assert attention_mask is not None, "Please provide attention_mask for padding!"
        if attn_mask_type == AttnMaskType.no_mask:
            assert attention_mask is None, "a mask under no_mask would be ignored by TE"
        TEChecks.seen.append(attn_mask_type)
        return super().forward(query, key, value, attention_mask, attn_mask_type, **kwargs)


def test_mask_type_of_a_call():
    assert attention_mask_type(None) == AttnMaskType.no_mask
    assert attention_mask_type(torch.zeros(2, 1, 1, 5, dtype=torch.bool)) == AttnMaskType.padding


@pytest.fixture
def te_like_attention(monkeypatch):
    monkeypatch.setattr(layer_spec, "SDPAttention", TEChecks)  # what local_layer_spec builds its core from
    TEChecks.seen = []
    return TEChecks


def test_pretraining_forward_calls_attention_without_a_mask_type(te_like_attention):
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import single_rank_groups

    cfg = tiny_config(dropout=0.0).model
    model = build_model(cfg, pg_collection=single_rank_groups())
    batch = synthetic_batch(cfg, seed=3)
    out = model(batch["waveform"], mask=batch["mask"], negatives=batch["negatives"])
    out.loss.backward()
    assert te_like_attention.seen == [AttnMaskType.no_mask] * cfg.num_layers


def test_finetuning_forward_calls_attention_with_padding(te_like_attention):
    from megatron_speech.models.wav2vec2.factory import HeadSpec, build_model
    from megatron_speech.parallel.initialize import single_rank_groups
    from tests.fixtures import padded_pair

    cfg = tiny_config(dropout=0.0)
    model = build_model(cfg.model, head=HeadSpec("ctc", 7, False), pg_collection=single_rank_groups())
    wave, padding, alone = padded_pair(cfg)
    model(wave, padding_mask=padding)
    assert te_like_attention.seen == [AttnMaskType.padding] * cfg.model.num_layers
    te_like_attention.seen = []
    model(alone)  # a single utterance, no padding mask: as `embed` calls it
    assert te_like_attention.seen == [AttnMaskType.no_mask] * cfg.model.num_layers
