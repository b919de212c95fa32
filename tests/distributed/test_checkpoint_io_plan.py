"""The dry run's checkpoint I/O figures for XL at 4 x 8 (derived from the model and optimizer sizes): what one save
holds, what each rank writes with megatron's fully parallel save, and the largest tensor (the granularity of the
split) checked against the real model."""

from __future__ import annotations

from megatron_speech.config import load_config
from megatron_speech.dry_run import format_plan, make_plan
from megatron_speech.models.wav2vec2.memory import checkpoint_bytes, largest_tensor
from tests.dist import run_ranks
from tests.fixtures import ROOT

XL_PARAMS = 317_390_592


def test_xl_at_4x8_each_rank_writes_a_32nd():
    cfg = load_config(str(ROOT / "configs/xl.yaml"), ["data.prefix=/nonexistent/x"])
    plan = make_plan(cfg, 32, env={})
    c = plan.checkpoint
    assert plan.params_total == XL_PARAMS and cfg.train.precision == "fp16" and cfg.train.ema_decay > 0
    assert c["save_total"] == XL_PARAMS * (2 + 4 + 12)  # fp16 weights, fp32 EMA, fp32 master + 2 moments
    assert c["per_rank"] == c["save_total"] / 32
    assert c["per_rank"] < c["per_rank_max"] < 1.2 * c["per_rank"]
    assert c["before"] == c["save_total"] and c["gathered_per_rank"] == 12 * XL_PARAMS
    text = format_plan(plan)
    assert "5.32 GiB per save" in text and "each of the 32 ranks writes ~170 MiB" in text
    assert "derived from the parameter count (not measured)" in text


def test_plain_optimizer_split_bound_grows():
    with_do = checkpoint_bytes(1000, 100, "fp32", 4, True, False)
    without = checkpoint_bytes(1000, 100, "fp32", 4, False, False)
    assert with_do["per_rank"] == without["per_rank"] == 1000 * (4 + 12) / 4
    assert without["per_rank_max"] > with_do["per_rank_max"] and without["gathered_per_rank"] == 0


def _largest(rank, world):
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import initialize_parallel

    initialize_parallel(1)
    m = load_config(str(ROOT / "configs/xl.yaml"), []).model
    model = build_model(m, device="meta")
    return max(p.numel() for p in model.parameters()), largest_tensor(m)


def test_largest_tensor_is_the_real_models():
    real, derived = run_ranks(_largest, 1)[0]
    assert real == derived
