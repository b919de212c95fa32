"""Tensor and sequence parallelism against the single-rank model (DESIGN §3, "The tests that prove it").

Every case runs 2 spawned gloo ranks with TP=2 and compares with a TP=1 run on the same weights and batch:
the loss (summed over TP ranks) and every gradient (TP-sharded ones gathered; the others must be identical on
both ranks). Cases are rows of a table: layout x sequence parallelism x batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist import run_ranks

ROOT = Path(__file__).resolve().parents[1]
DROPOUTS = ("dropout", "attention_dropout", "feature_proj_dropout", "feature_quantizer_dropout")


def _config(dropout: float):
    from megatron_speech.config import load_config

    return load_config(str(ROOT / "configs/tiny.yaml"), [f"model.{k}={dropout}" for k in DROPOUTS]).model


def _batch(cfg, kind: str):
    from megatron_speech.models.wav2vec2.masker import compute_span_mask, counter_rng, sample_negatives

    rng = counter_rng(3, 0, 0, 0)
    b, f = 3, 24
    wave = torch.from_numpy(rng.standard_normal((b, cfg.num_samples(f))).astype(np.float32))
    if kind == "one_rank_unmasked":  # every masked frame in the first half: TP rank 1 holds none
        mask = np.zeros((b, f), dtype=bool)
        mask[:, 2:7] = True
    else:
        mask = compute_span_mask((b, f), cfg.mask_prob, cfg.mask_length_frames, rng, min_masks=2)
    neg = sample_negatives(mask, cfg.num_negatives, rng)
    return {"waveform": wave, "mask": torch.from_numpy(mask), "negatives": torch.from_numpy(neg)}


def _grads_rank(rank: int, world_size: int, sequence_parallel: bool, kind: str, weights: str):
    """Loss stats, per-parameter gathered gradients and the canonical weights used."""
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    from megatron_speech.models.wav2vec2 import interop
    from megatron_speech.models.wav2vec2.factory import build_pretraining_model, transformer_config
    from megatron_speech.parallel.initialize import initialize_parallel
    from megatron_speech.training.parallelize import wrap_for_training
    from megatron_speech.training.step import forward_step

    initialize_parallel(world_size, seed=5)
    cfg = _config(0.0)
    model = build_pretraining_model(cfg, transformer_config(cfg, world_size, sequence_parallel))
    model.quantizer.gumbel_noise = False
    if world_size == 1:
        torch.save(interop.canonical_state_dict(model), weights)
    interop.load_canonical(model, torch.load(weights))
    ddp = wrap_for_training(model, use_distributed_optimizer=False)
    ddp.zero_grad_buffer()
    stored = forward_backward_no_pipelining(forward_step_func=forward_step, data_iterator=iter([_batch(cfg, kind)]),
                                            model=ddp, num_microbatches=1, seq_length=0, micro_batch_size=0)
    return stored[0]["stats"], interop.canonical_state_dict(model, grads=True)


CASES = [  # (sequence_parallel, batch kind)
    (False, "random"),
    (True, "random"),
    (False, "one_rank_unmasked"),
    (True, "one_rank_unmasked"),
]


@pytest.mark.parametrize("sequence_parallel, kind", CASES)
def test_tp2_matches_tp1(tmp_path, sequence_parallel, kind):
    weights = str(tmp_path / "weights.pt")
    [(ref_stats, ref_grads)] = run_ranks(_grads_rank, 1, False, kind, weights)
    ranks = run_ranks(_grads_rank, 2, sequence_parallel, kind, weights)
    stats = sum(s for s, _ in ranks)  # each rank reports its own share: the sum is the group's
    # loss sum, contrastive sum and masked count
    torch.testing.assert_close(stats[:3], ref_stats[:3], rtol=1e-5, atol=1e-5)
    if kind == "one_rank_unmasked":
        assert ranks[1][0][2] == 0 and ranks[0][0][2] > 0  # rank 1 really held no masked frame
    for name, ref in ref_grads.items():
        scale = ref.abs().max()
        assert scale > 0, name
        for rank, (_, grads) in enumerate(ranks):
            err = (grads[name] - ref).abs().max()
            assert err <= 1e-5 * scale, f"{name} on TP rank {rank}: max error {err:.3e} vs scale {scale:.3e}"
