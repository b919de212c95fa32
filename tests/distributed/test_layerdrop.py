"""LayerDrop under megatron-core's DDP at DP=2 with the overlapped gradient reduce and the distributed optimizer (the
defaults): a layer skipped on some micro-batches (the last one included, whose backward hooks launch the reduce) or
on all of them neither asserts nor hangs, every step updates, and the result equals the same run with the reduce
not overlapped. fp32 without recompute, and fp16 (dynamic loss scaling) with full recompute over a chunk of layers.

What "unchanged" means for a skipped layer: its gradient is an exact zero, and on the first step (Adam's moments
still zero, weight decay 0) its weights do not move at all; on later steps Adam's moments move it as they move any
parameter with a zero gradient, as megatron's optimizer does (fairseq skips None gradients instead; megatron's
distributed optimizer updates whole buffers)."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_ranks
from tests.fixtures import global_batch, tiny_config

NUM_LAYERS = 3
# the layers each of a DP rank's two micro-batches skips, step by step (the same on both ranks, as the loader draws)
PLAN = [((1,), (1,)),  # the first step: its hook counts become the expected ones
        ((0,), (2,)),  # the last micro-batch skips another layer than the first
        ((), (0, 1, 2)),  # the last micro-batch skips every layer
        ((), ())]


def _layer_params(model, i: int) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.encoder.block.layers[i].named_parameters()}


def _run(rank: int, precision: str, recompute: str, overlap: bool, weights: dict | None):
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.training.optim import build_optimizer
    from megatron_speech.training.parallelize import wrap_for_training
    from megatron_speech.training.step import train_step

    cfg = tiny_config(f"model.num_layers={NUM_LAYERS}", f"train.precision={precision}", "optim.weight_decay=0",
                      "optim.lr=1e-3", dropout=0.0)
    model = build_model(cfg.model, precision=precision, recompute=recompute,
                        recompute_num_layers=NUM_LAYERS)  # one recomputed chunk holds skipped and run layers
    model.quantizer.gumbel_noise = False
    params = dict(model.named_parameters())
    if weights is not None:
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
    start = {n: p.detach().clone() for n, p in params.items()}
    # small buckets: layers fall into different buckets, so a bucket of only skipped parameters exists
    ddp = wrap_for_training(model, use_distributed_optimizer=True, overlap_grad_reduce=overlap, bucket_size=20_000)
    optimizer = build_optimizer(ddp, cfg.optim, cfg.train, cfg.parallel)
    scale = float(optimizer.get_loss_scale())
    steps = []
    for step, skips in enumerate(PLAN):
        mine = global_batch(cfg.model, step, num_micro=4)[rank::2]  # this DP rank's two micro-batches
        for batch, skip in zip(mine, skips, strict=True):
            batch["skip_layers"] = skip
        before = [_layer_params(model, i) for i in range(NUM_LAYERS)]
        out = train_step(ddp, optimizer, mine)
        moved = [any(not torch.equal(v, after[n]) for n, v in b.items())
                 for b, after in zip(before, [_layer_params(model, i) for i in range(NUM_LAYERS)], strict=True)]
        steps.append({"updated": out["updated"], "loss": out["loss"], "moved": moved,
                      "loss_scale": float(optimizer.get_loss_scale())})
    final = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return start, steps, final, scale


def _rank(rank: int, world: int, precision: str, recompute: str):
    from megatron_speech.parallel.initialize import initialize_parallel

    initialize_parallel(1, seed=7)
    start, overlapped, final, scale = _run(rank, precision, recompute, True, None)
    _, plain, plain_final, _ = _run(rank, precision, recompute, False, start)
    return overlapped, final, plain, plain_final, scale


@pytest.mark.parametrize("precision, recompute", [("fp32", "none"), ("fp16", "full")])
def test_dp2_overlapped_reduce_with_skipped_layers(precision, recompute):
    ranks = run_ranks(_rank, 2, precision, recompute, timeout=180)  # a bucket never reduced would hang or assert
    for steps, final, plain, plain_final, scale in ranks:
        for step, (out, ref) in enumerate(zip(steps, plain, strict=True)):
            assert out["updated"] and out["loss"] == out["loss"], step  # no skipped update, no NaN
            assert out["loss_scale"] == scale, step  # fp16: zero gradients are no overflow
            assert out["loss"] == ref["loss"], step
        # the first step: only the layer skipped by every micro-batch stays put
        assert steps[0]["moved"] == [True, False, True]
        tol = 0 if precision == "fp32" else 1e-6  # the overlapped reduce sums the same buckets in the same order
        for name, value in final.items():
            torch.testing.assert_close(value, plain_final[name], rtol=0, atol=tol, msg=name)
    for name, value in ranks[0][1].items():  # the DP replicas agree
        assert torch.equal(value, ranks[1][1][name]), name
