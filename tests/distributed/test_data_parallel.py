"""DP correctness with megatron-core DDP and per-token normalization: DP=2 with micro-batches of different
crop lengths and masked counts gives the gradients (and the Adam step) of one process computing the same
global batch, and so does DP=1 with gradient accumulation."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from tests.dist import run_ranks
from tests.fixtures import tiny_config

LR = 1e-3
# Adam divides by |g| + eps on its first step: a large eps keeps fp32 summation-order noise in tiny gradients
# from being amplified into visible update differences.
EPS = 1e-3


def _micro_batches(cfg):
    from megatron_speech.common.rng import counter_rng
    from megatron_speech.models.wav2vec2.masker import compute_span_mask, sample_negatives

    out = []
    # unequal crops, batch sizes and masked counts: (utterances, frames)
    for i, (b, f) in enumerate([(2, 30), (3, 18)]):
        rng = counter_rng(7, 0, i, 0)
        wave = torch.from_numpy(rng.standard_normal((b, cfg.num_samples(f))).astype(np.float32))
        mask = compute_span_mask((b, f), cfg.mask_prob, cfg.mask_length_frames, rng, min_masks=2)
        neg = sample_negatives(mask, cfg.num_negatives, rng)
        out.append({"waveform": wave, "mask": torch.from_numpy(mask), "negatives": torch.from_numpy(neg)})
    assert out[0]["mask"].sum() != out[1]["mask"].sum()
    return out


def _build(cfg):
    from megatron_speech.models.wav2vec2.factory import build_model

    torch.manual_seed(1234)  # identical initial weights in every process and for the reference
    model = build_model(cfg)
    model.quantizer.gumbel_noise = False
    return model


def _rank(rank: int, world_size: int, use_distributed_optimizer: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    from megatron_speech.parallel.initialize import initialize_parallel
    from megatron_speech.training.parallelize import wrap_for_training
    from megatron_speech.training.step import agree, batch_counts, forward_step

    initialize_parallel(1, seed=1)
    cfg = tiny_config(dropout=0.0).model
    batches = _micro_batches(cfg)

    # Reference: one plain process computing the whole global batch, normalized by its total masked count.
    ref = _build(cfg)
    outs = [ref(b["waveform"], b["mask"], b["negatives"]) for b in batches]
    total = sum(int(o.num_masked) for o in outs)
    (sum(o.loss for o in outs) / total).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR, betas=(0.9, 0.98), eps=EPS)
    ref_opt.step()
    ref_params = {n: p.detach().clone() for n, p in ref.named_parameters()}

    model = wrap_for_training(_build(cfg), use_distributed_optimizer=use_distributed_optimizer,
                              overlap_grad_reduce=True)
    mine = batches if world_size == 1 else [batches[rank]]  # DP=2: one micro-batch each; DP=1: accumulate both
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.98, adam_eps=EPS,
                        clip_grad=0.0, use_distributed_optimizer=use_distributed_optimizer),
        [model],
    )
    model.zero_grad_buffer()
    opt.zero_grad()
    # the step's global masked count, as train_step gets it (one all-reduce of the masks' counts before the step)
    (counted, _, _), _ = agree(batch_counts(mine))
    assert counted == total, (counted, total)
    forward_backward_no_pipelining(forward_step_func=partial(forward_step, normalizer=counted),
                                   data_iterator=iter(mine), model=model, num_microbatches=len(mine), seq_length=0,
                                   micro_batch_size=0)
    grads = {}
    if not use_distributed_optimizer:  # with it, each rank's buffer holds only its reduce-scattered shard
        grads = {n: p.main_grad.clone() for n, p in model.module.named_parameters()}
    updated, _, _ = opt.step()
    params = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return updated, ref_grads, grads, ref_params, params


@pytest.mark.parametrize("world_size, use_distributed_optimizer", [(2, False), (2, True), (1, True)])
def test_dp_matches_single_process_global_batch(world_size, use_distributed_optimizer):
    results = run_ranks(_rank, world_size, use_distributed_optimizer)
    for updated, ref_grads, grads, ref_params, params in results:
        assert updated
        for name, g in grads.items():
            # fp32 summation order differs (buckets, two ranks): compare at 1e-5 of each tensor's scale
            scale = ref_grads[name].abs().max()
            assert (g - ref_grads[name]).abs().max() <= 1e-5 * scale, name
        assert any(g.abs().max() > 0 for g in ref_grads.values())
        for name, p in params.items():
            # one Adam step moves each weight by ~lr: compare at a small fraction of that
            torch.testing.assert_close(p, ref_params[name], rtol=0, atol=LR * 1e-3, msg=name)


def _replica_weights(rank: int, world_size: int):
    from megatron_speech.models.wav2vec2 import interop
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import initialize_parallel
    from megatron_speech.training.parallelize import wrap_for_training

    initialize_parallel(1, seed=1)  # seeds differ per DP rank: each replica initializes different weights
    cfg = tiny_config().model
    model = build_model(cfg)
    before = interop.canonical_state_dict(model)
    wrap_for_training(model)
    return before, interop.canonical_state_dict(model)


def test_replicas_start_from_the_same_weights():
    (before0, after0), (before1, after1) = run_ranks(_replica_weights, 2)
    assert any(not torch.equal(before0[k], before1[k]) for k in before0)  # the seeds really differ
    for k in after0:
        assert torch.equal(after0[k], after1[k]), k
        assert torch.equal(after0[k], before0[k]), k  # DP rank 0's initialization wins
