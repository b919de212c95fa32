"""The model against transformers' Wav2Vec2ForPreTraining with the same weights (something we did not write)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_speech.models.wav2vec2 import interop  # noqa: E402
from megatron_speech.models.wav2vec2.factory import build_model  # noqa: E402
from megatron_speech.parallel.initialize import single_rank_groups  # noqa: E402
from tests.hf_reference import batch, hf_negatives, hf_tiny_config, random_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    hf, cfg = random_hf_model()
    ours = build_model(cfg, pg_collection=single_rank_groups()).eval()
    interop.load_canonical(ours, interop.from_hf(hf.state_dict(), cfg.num_attention_heads))
    return cfg, hf, ours


def test_hidden_states_targets_and_contrastive_loss_match(pair):
    cfg, hf, ours = pair
    wave, mask, negatives = batch(cfg)
    with torch.no_grad():
        ref = hf(wave, mask_time_indices=mask, sampled_negative_indices=hf_negatives(negatives))
        ref_hidden = hf.wav2vec2(wave, mask_time_indices=mask).last_hidden_state
        hidden = ours.encode(wave, mask)
        targets, _ = ours.quantized_targets(wave, mask)
        out = ours(wave, mask, negatives)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(targets, ref.projected_quantized_states[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.contrastive, ref.contrastive_loss, atol=1e-4, rtol=1e-5)
    # eval mode: transformers' perplexity is the hard-code one
    torch.testing.assert_close(out.code_perplexity, ref.codevector_perplexity, atol=1e-4, rtol=1e-5)
    assert int(out.num_masked) == int(mask.sum())


def test_layer_outputs_match_hidden_states(pair):
    cfg, hf, ours = pair
    wave, _, _ = batch(cfg, seed=1)
    with torch.no_grad():
        ref = hf.wav2vec2(wave, output_hidden_states=True).hidden_states
        for layer in (0, 1):
            torch.testing.assert_close(ours.encode(wave, output_layer=layer), ref[layer], atol=1e-4, rtol=1e-4)


def test_training_loss_matches_with_soft_perplexity(pair):
    """In training, transformers' diversity loss uses the soft-probability perplexity, which Gumbel noise does
    not touch: with the noise off and dropouts 0, the full loss (contrastive + diversity) must match."""
    cfg, hf, ours = pair
    wave, mask, negatives = batch(cfg, seed=2)
    hf.train()
    ours.train()
    ours.quantizer.gumbel_noise = False
    try:
        with torch.no_grad():
            ref = hf(wave, mask_time_indices=mask, sampled_negative_indices=hf_negatives(negatives))
            out = ours(wave, mask, negatives)
    finally:
        hf.eval()
        ours.eval()
        ours.quantizer.gumbel_noise = True
    torch.testing.assert_close(out.prob_perplexity, ref.codevector_perplexity, atol=1e-4, rtol=1e-5)
    ref_diversity = ref.diversity_loss / mask.sum()
    torch.testing.assert_close(out.diversity, ref_diversity, atol=1e-5, rtol=1e-5)


def test_mapping_round_trips_every_tensor_exactly(pair):
    cfg, hf, ours = pair
    canonical = interop.canonical_state_dict(ours)
    hf_sd = interop.to_hf(canonical, cfg.num_attention_heads)
    ref = {k: v for k, v in hf.state_dict().items()}
    assert set(hf_sd) == set(ref)
    for k in ref:
        assert torch.equal(hf_sd[k], ref[k]), k
    back = interop.from_hf(hf_sd, cfg.num_attention_heads)
    assert set(back) == set(canonical)
    for k in canonical:
        assert torch.equal(back[k], canonical[k]), k


@pytest.mark.parametrize(
    "kw, words",
    [(dict(feat_extract_norm="group"), "feat_extract_norm"), (dict(do_stable_layer_norm=False), "post-LN")],
)
def test_unsupported_variants_are_refused(kw, words):
    with pytest.raises(ValueError, match=words):
        interop.config_from_hf(hf_tiny_config(**kw))


def test_padded_batch_matches_attention_mask(pair):
    """Fine-tuning batches pad: padded frames are zeroed before the positional conv and never attended to,
    exactly as transformers does with attention_mask."""
    cfg, hf, ours = pair
    rng = np.random.default_rng(3)
    lengths = [cfg.num_samples(40), cfg.num_samples(31) + 123, cfg.num_samples(17) + 5]
    wave = torch.zeros(3, max(lengths))
    sample_mask = torch.zeros(3, max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        wave[b, :n] = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        sample_mask[b, :n] = 1
    num_frames = cfg.num_frames(max(lengths))
    real = torch.tensor([cfg.num_frames(n) for n in lengths])
    padding = torch.arange(num_frames)[None, :] >= real[:, None]
    with torch.no_grad():
        ref = hf.wav2vec2(wave, attention_mask=sample_mask, output_hidden_states=True)
        hidden = ours.encode(wave, padding_mask=padding, all_layers=True)
    assert len(hidden) == len(ref.hidden_states) + 1
    for layer, expected in enumerate(ref.hidden_states):
        for b in range(3):  # only real frames are defined
            torch.testing.assert_close(hidden[layer][b, :real[b]], expected[b, :real[b]], atol=1e-4, rtol=1e-4)
    for b in range(3):
        torch.testing.assert_close(hidden[-1][b, :real[b]], ref.last_hidden_state[b, :real[b]], atol=1e-4,
                                   rtol=1e-4)
