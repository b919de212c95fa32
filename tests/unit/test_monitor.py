"""The loop's decisions: fp16 loss-scale floor, NaN/inf streaks, early stopping, codebook-collapse alarm."""

from __future__ import annotations

import json

from megatron_speech.training.monitor import Monitor
from tests.fixtures import tiny_config


def _monitor(tmp_path, *overrides):
    cfg = tiny_config(f"train.save_dir={tmp_path}", *overrides)
    return Monitor(cfg, rank=0, num_codes=32), cfg


def step(finite=True):
    return {"finite": finite}


def test_fp16_scale_at_floor_stops_naming_bf16(tmp_path):
    m, _ = _monitor(tmp_path, "train.precision=fp16", "train.loss_scale_floor_steps=3", "train.min_loss_scale=1")
    assert m.check_step(step(), 1.0) is None
    assert m.check_step(step(), 2.0) is None  # the scale recovered: the count restarts
    assert m.check_step(step(), 1.0) is None
    assert m.check_step(step(), 1.0) is None
    why = m.check_step(step(), 1.0)
    assert why and "bf16" in why and "train.precision=bf16" in why


def test_floor_policy_is_fp16_only(tmp_path):
    m, _ = _monitor(tmp_path, "train.precision=bf16", "train.loss_scale_floor_steps=1")
    assert all(m.check_step(step(), 1.0) is None for _ in range(5))


def test_nan_streak_stops_after_max_bad_steps(tmp_path):
    m, _ = _monitor(tmp_path, "train.max_bad_steps=3")
    assert m.check_step(step(False), 1.0) is None
    assert m.check_step(step(False), 1.0) is None
    assert m.check_step(step(True), 1.0) is None  # a good step resets the streak
    assert m.check_step(step(False), 1.0) is None
    assert m.check_step(step(False), 1.0) is None
    assert "NaN/inf" in m.check_step(step(False), 1.0)


def test_early_stopping_after_exactly_patience_evals(tmp_path):
    m, _ = _monitor(tmp_path, "train.early_stop_patience=2", "train.perplexity_floor_evals=0")
    ppl = {"code_perplexity": 20.0}
    assert m.check_eval(1, {"loss": 3.0, **ppl}) is None
    assert m.check_eval(2, {"loss": 2.0, **ppl}) is None  # improved
    assert m.check_eval(3, {"loss": 2.5, **ppl}) is None  # 1 without improvement
    why = m.check_eval(4, {"loss": 2.0, **ppl})  # equal is not better: 2
    assert why and "early stopping" in why
    # restored state continues the count (a resumed run must not forget it)
    m2, _ = _monitor(tmp_path, "train.early_stop_patience=3")
    m2.load_state_dict(m.state_dict())
    assert "early stopping" in m2.check_eval(5, {"loss": 2.1, **ppl})


def test_collapse_alarm_is_written(tmp_path):
    m, cfg = _monitor(tmp_path, "train.perplexity_floor_fraction=0.5", "train.perplexity_floor_evals=2",
                      "train.early_stop_patience=0")
    m.check_eval(1, {"loss": 1.0, "code_perplexity": 3.0})  # 3 < 0.5 * 32
    assert not (tmp_path / "metrics.jsonl").exists() or "alarm" not in (tmp_path / "metrics.jsonl").read_text()
    m.check_eval(2, {"loss": 0.9, "code_perplexity": 2.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["split"] == "alarm" and "collapse" in rows[-1]["message"]
