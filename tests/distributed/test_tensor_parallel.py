"""Tensor and sequence parallelism against the single-rank model (docs/design.md §3, "The tests that prove it").

Every case runs 2 spawned gloo ranks with TP=2 and compares with a TP=1 run on the same weights and batch:
the loss (summed over TP ranks) and every gradient (TP-sharded ones gathered; the others must be identical on
both ranks). Cases are rows of a table: layout x sequence parallelism x batch. The "layerdrop" batch skips a layer
as the loader draws it (models/wav2vec2/layerdrop.py): both TP ranks skip it and match TP=1 skipping it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.dist import run_ranks
from tests.fixtures import tiny_config


def _config(dropout: float):
    return tiny_config(dropout=dropout).model


def _skips(num_layers: int) -> tuple[int, ...]:
    """The first draw at layerdrop 0.5 that skips some but not all layers."""
    from megatron_speech.models.wav2vec2.layerdrop import layer_skips

    return next(s for s in (layer_skips(3, step, 0, num_layers, 0.5) for step in range(100))
                if 0 < len(s) < num_layers)


def _batch(cfg, kind: str):
    from megatron_speech.common.rng import counter_rng
    from megatron_speech.models.wav2vec2.masker import compute_span_mask, sample_negatives

    rng = counter_rng(3, 0, 0, 0)
    b, f = 3, 24
    wave = torch.from_numpy(rng.standard_normal((b, cfg.num_samples(f))).astype(np.float32))
    if kind == "one_rank_unmasked":  # every masked frame in the first half: TP rank 1 holds none
        mask = np.zeros((b, f), dtype=bool)
        mask[:, 2:7] = True
    else:
        mask = compute_span_mask((b, f), cfg.mask_prob, cfg.mask_length_frames, rng, min_masks=2)
    neg = sample_negatives(mask, cfg.num_negatives, rng)
    skips = _skips(cfg.num_layers) if kind == "layerdrop" else ()
    return {"waveform": wave, "mask": torch.from_numpy(mask), "negatives": torch.from_numpy(neg),
            "skip_layers": skips}


def _grads_rank(rank: int, world_size: int, sequence_parallel: bool, kind: str, weights: str):
    """Loss stats, per-parameter gathered gradients and the canonical weights used."""
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    from megatron_speech.models.wav2vec2 import interop
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import initialize_parallel
    from megatron_speech.training.parallelize import wrap_for_training
    from megatron_speech.training.step import forward_step

    initialize_parallel(world_size, seed=5)
    cfg = _config(0.0)
    model = build_model(cfg, tp=world_size, sequence_parallel=sequence_parallel)
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
    (True, "layerdrop"),
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
    skipped = tuple(f"encoder.block.layers.{i}." for i in _batch(_config(0.0), kind)["skip_layers"])
    assert skipped or kind != "layerdrop"
    for name, ref in ref_grads.items():
        scale = ref.abs().max()
        if skipped and name.startswith(skipped):  # a skipped layer: zero gradients on every rank
            assert scale == 0 and all(grads[name].abs().max() == 0 for _, grads in ranks), name
            continue
        assert scale > 0, name
        for rank, (_, grads) in enumerate(ranks):
            err = (grads[name] - ref).abs().max()
            assert err <= 1e-5 * scale, f"{name} on TP rank {rank}: max error {err:.3e} vs scale {scale:.3e}"


def _dropout_rank(rank: int, world_size: int, sequence_parallel: bool):
    """Dropout and Gumbel noise on: capture what docs/design.md §3 calls replicated, then take real optimizer steps."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import initialize_parallel
    from megatron_speech.training.parallelize import wrap_for_training
    from megatron_speech.training.step import train_step

    initialize_parallel(world_size, seed=11)
    cfg = _config(0.2)
    model = build_model(cfg, tp=world_size, sequence_parallel=sequence_parallel)
    captured = {}

    def keep(**tensors):  # a forward hook must return None, or it replaces the module's output
        captured.update({k: v.detach().clone() for k, v in tensors.items()})

    if sequence_parallel:  # the positional conv runs on the gathered, replicated sequence
        model.encoder.pos_conv.register_forward_hook(lambda m, i, o: keep(pos_conv_in=i[0], pos_conv_out=o))
    else:  # the whole block runs on the replicated sequence: its input (after dropout) and output
        model.encoder.block.register_forward_hook(lambda m, i, o: keep(block_in=i[0], block_out=o))
    ddp = wrap_for_training(model, use_distributed_optimizer=True, overlap_grad_reduce=True)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=10.0,
                                                 use_distributed_optimizer=True), [ddp])
    results = [train_step(ddp, opt, [_batch(cfg, "random")]) for _ in range(2)]
    return captured, [(r["updated"], float(r["grad_norm"]), r["loss"]) for r in results]


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_dropout_keeps_replicated_activations_identical(sequence_parallel):
    (cap0, steps0), (cap1, steps1) = run_ranks(_dropout_rank, 2, sequence_parallel)
    assert cap0 and cap0.keys() == cap1.keys()
    for name in cap0:
        assert torch.equal(cap0[name], cap1[name]), f"{name} differs across TP ranks"
    for (u0, norm0, _), (u1, norm1, _) in zip(steps0, steps1):
        assert u0 and u1 and np.isfinite(norm0) and norm0 == norm1  # the grad norm is a TP/DP-wide quantity
    assert steps0[0][2] == steps1[0][2]  # the loss is a global quantity too
    assert steps0[0][2] != steps0[1][2]  # the weights moved: the second step's loss changed


def _hf_rank(rank: int, world_size: int, sequence_parallel: bool):
    from megatron_speech.models.wav2vec2 import interop
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import initialize_parallel
    from tests.hf_reference import batch, hf_negatives, random_hf_model

    initialize_parallel(world_size, seed=0)
    hf, cfg = random_hf_model()
    model = build_model(cfg, tp=world_size, sequence_parallel=sequence_parallel).eval()
    interop.load_canonical(model, interop.from_hf(hf.state_dict(), cfg.num_attention_heads))
    wave, mask, negatives = batch(cfg, num_frames=40)
    with torch.no_grad():
        ref = hf(wave, mask_time_indices=mask, sampled_negative_indices=hf_negatives(negatives))
        ref_hidden = hf.wav2vec2(wave, mask_time_indices=mask).last_hidden_state
        out = model(wave, mask, negatives)
        hidden = model.encode(wave, mask)
        f0, f1 = model._frame_range(mask.shape[1])
        sharded = model.feature_extractor(wave, f0, f1)
        whole = model.feature_extractor(wave)[:, :, f0:f1]
    return {
        "hidden_err": float((hidden - ref_hidden).abs().max()),
        "contrastive": float(out.contrastive),
        "ref_contrastive": float(ref.contrastive_loss),
        "conv_bitwise": torch.equal(sharded, whole),
        "roundtrip_equal": all(torch.equal(v, hf.state_dict()[k]) for k, v in
                               interop.to_hf(interop.canonical_state_dict(model), cfg.num_attention_heads).items()),
    }


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_transformers_parity_at_tp2(sequence_parallel):
    ranks = run_ranks(_hf_rank, 2, sequence_parallel)
    for r in ranks:
        assert r["hidden_err"] < 1e-4
        assert r["conv_bitwise"]  # the time-sharded conv encoder computes exactly the unsharded frames
        assert r["roundtrip_equal"]  # TP shards gather back to transformers' tensors exactly
    # each rank's InfoNCE covers its own masked frames: the sum is transformers' loss
    assert abs(sum(r["contrastive"] for r in ranks) - ranks[0]["ref_contrastive"]) < 1e-4
