"""The FLOP, parameter and memory models the dry-run prints, checked against the real modules: FLOPs against
torch's FlopCounterMode, parameters against the built model (TP=1 and TP=2), activation memory against the
tensors autograd actually saves."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_speech.config import load_config
from megatron_speech.models.wav2vec2.flops import expected_masked_frames, flops_per_audio_second, forward_flops
from megatron_speech.models.wav2vec2.memory import activation_bytes, parameter_counts
from tests.dist import run_ranks
from tests.fixtures import ROOT, synthetic_batch

DROPOUTS = ("dropout", "feature_proj_dropout", "feature_quantizer_dropout")


def model_config(name: str, *overrides: str):
    return load_config(str(ROOT / f"configs/{name}.yaml"), list(overrides)).model


def build(m, precision: str = "fp32"):
    from megatron.core.transformer.module import Float16Module

    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import single_rank_groups

    model = build_model(m, precision=precision, pg_collection=single_rank_groups())
    model.quantizer.gumbel_noise = False
    return Float16Module(model.config, model) if precision != "fp32" else model


def test_xl_matches_the_design_numbers():
    """docs/design.md §10: XL at 15 s crops, forward = conv 4.91 + transformer 30.1 + attention 3.7 + ~1.0 GFLOP per
    audio-second; training ~119."""
    per_s = flops_per_audio_second(model_config("xl"), 15.0)
    assert per_s.conv / 1e9 == pytest.approx(4.91, abs=0.01)
    assert per_s.transformer / 1e9 == pytest.approx(30.1, abs=0.1)
    assert per_s.attention / 1e9 == pytest.approx(3.7, abs=0.05)
    assert per_s.other / 1e9 == pytest.approx(1.0, abs=0.1)
    assert per_s.training / 1e9 == pytest.approx(119, abs=1)
    assert per_s.training == pytest.approx(3 * per_s.total - per_s.conv_first_layer)


def test_expected_masked_frames_matches_the_sampler():
    import numpy as np

    from megatron_speech.common.rng import counter_rng
    from megatron_speech.models.wav2vec2.masker import compute_span_mask

    for overrides in ([], ["model.mask_length=10", "model.mask_prob=0.65"]):
        m = model_config("xl", *overrides)
        mask = compute_span_mask((400, 749), m.mask_prob, m.mask_length_frames, counter_rng(0, 0, 0, 0),
                                 min_masks=m.mask_min_masks, require_same_masks=False)
        assert expected_masked_frames(m, 749) == pytest.approx(float(np.mean(mask.sum(1))), rel=0.03)


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_flops_equal_flop_counter_on_the_real_modules(name):
    m = model_config(name, *(f"model.{k}=0" for k in DROPOUTS), "model.attention_dropout=0")
    model = build(m)
    batch = synthetic_batch(m, 0, batch_size=2, num_frames=50)
    expected = forward_flops(m, 2, 50, num_masked=int(batch["mask"].sum()))
    # The math backend runs attention as two bmm's that the counter sees (the CPU flash kernel has no formula).
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            out = model(**batch)
        with FlopCounterMode(display=False) as backward:
            out.loss.backward()
    assert forward.get_total_flops() == expected.total
    # torch's formula for a grouped conv's weight gradient ignores the groups (it counts the ungrouped conv):
    # the positional conv's weight gradient is counted `groups` times over.
    overcount = (m.pos_conv_groups - 1) * expected.positional_conv
    assert backward.get_total_flops() - overcount == expected.training - expected.total


@pytest.mark.parametrize("name", ["tiny", "xl"])
def test_parameter_count_equals_the_built_model(name):
    from megatron_speech.models.wav2vec2.factory import count_parameters

    m = model_config(name)
    assert sum(parameter_counts(m, 1).values()) == count_parameters(m)


def _count_at_tp2(rank, world_size):
    from megatron_speech.models.wav2vec2 import factory
    from megatron_speech.parallel.initialize import destroy_parallel, initialize_parallel

    m = model_config("tiny")
    initialize_parallel(2)
    model = factory.build_model(m, tp=2)
    n = sum(p.numel() for p in model.parameters())
    destroy_parallel()
    return n


def test_parameter_count_per_rank_at_tp2():
    counts = run_ranks(_count_at_tp2, 2)
    assert counts == [sum(parameter_counts(model_config("tiny"), 2).values())] * 2


@pytest.mark.parametrize("name,precision,dropout", [("tiny", "fp32", 0.0), ("tiny", "bf16", 0.1),
                                                    ("base", "fp32", 0.1), ("base", "bf16", 0.0)])
def test_activation_estimate_matches_saved_tensors(name, precision, dropout):
    # Attention dropout off: on CPU it falls back to a kernel that keeps the [s, s] probabilities, which the
    # fused GPU kernels the estimate describes do not.
    m = model_config(name, *(f"model.{k}={dropout}" for k in DROPOUTS), "model.attention_dropout=0")
    model = build(m, precision)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = synthetic_batch(m, 0, batch_size=3, num_frames=60)
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # weights are not activations
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch["waveform"], batch["mask"], batch["negatives"])
    # CPU dropout keeps its mask in the activation dtype (GPU: 1-byte bool)
    mask_bytes = 4 if precision == "fp32" else 2
    estimate = activation_bytes(m, 3, 60, precision=precision, num_masked=int(batch["mask"].sum()),
                                dropout_mask_bytes=mask_bytes)
    assert sum(estimate.values()) == pytest.approx(sum(saved.values()), rel=0.1)
