"""Reliability drill 6, NaN/inf: the real driver (pretrain.main) on 2 spawned ranks, with faults injected into the
model from the test: a NaN in one rank's input (a damaged batch), a NaN in one rank's gradient with a finite loss,
then NaNs on every step; and fp16 overflows until the loss scale sits at its floor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.dist import run_ranks
from tests.fixtures import ROOT

pytestmark = pytest.mark.slow


def _driver_with_faults(rank: int, world: int, argv: list[str], faults: dict) -> tuple[int, dict, list[str]]:
    """Run pretrain.main(argv) with a model whose forward pre-hook injects faults[kind] = [(ranks, first, last)]
    at training steps first..last (step s = its s-th call: one micro-batch per step, no evaluation):
      "nan_input": NaN waveform; "nan_grad": NaN gradient of the first parameter; "inf_grad": inf gradient.
    Returns the exit code, a fingerprint of the weights as each step starts, and the log lines."""
    import torch

    import megatron_speech.pretrain as driver

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("megatron_speech").addHandler(Keep(level=logging.INFO))
    fingerprints: dict[int, float] = {}
    build = driver.build_model

    def build_with_faults(*args, **kwargs):
        model = build(*args, **kwargs)
        state = {"step": 0, "grad_factor": None}

        def pre_hook(module, args, kwargs):
            state["step"] += 1
            step = state["step"]
            with torch.no_grad():  # float64 sum of every weight: changes whenever an update happened
                fingerprints[step] = float(sum(p.double().sum() for p in module.parameters()))
            hit = {kind for kind, spans in faults.items()
                   if any(rank in ranks and first <= step <= last for ranks, first, last in spans)}
            if "nan_input" in hit:
                args = (args[0] * float("nan"), *args[1:])
            state["grad_factor"] = (float("nan") if "nan_grad" in hit else float("inf") if "inf_grad" in hit
                                    else None)
            return args, kwargs

        model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        # runs before megatron's DDP hook adds the gradient to its buffer
        next(model.parameters()).register_hook(
            lambda g: g if state["grad_factor"] is None else g * state["grad_factor"])
        return model

    driver.build_model = build_with_faults
    code = driver.main(argv)
    return code, fingerprints, records


def _argv(save_dir: Path, shards: str, *overrides: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", f"train.save_dir={save_dir}", f"data.prefix={shards}",
            "train.eval_interval=0", "train.log_interval=1", "train.save_interval=4", *overrides]


def _train_rows(save_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def test_nan_loss_and_gradient_are_skipped_counted_then_stop_the_run(tmp_path, shards, monkeypatch):
    monkeypatch.chdir(ROOT)
    faults = {"nan_input": [([1], 3, 3), ([0], 8, 10**9)],  # step 3 on rank 1 only; every step from 8 on rank 0
              "nan_grad": [([0], 5, 5)]}  # a finite loss with a NaN gradient on rank 0 only
    results = run_ranks(_driver_with_faults, 2, _argv(tmp_path, shards, "train.max_steps=40",
                                                       "train.max_bad_steps=3"), faults)
    (code0, weights, log), (code1, weights1, _) = results
    assert code0 == code1 == 3  # EXIT_DIVERGED on both ranks, at the same step
    rows = _train_rows(tmp_path)
    assert max(rows) == 10  # bad steps 8, 9, 10: the third in a row stops
    assert [s for s, r in rows.items() if r["skipped"]] == [3, 5, 8, 9, 10]
    assert rows[3]["nonfinite"] == "loss" and rows[5]["nonfinite"] == "gradient" and rows[4]["nonfinite"] is None
    assert rows[10]["nonfinite_steps"] == 5
    # a skipped step leaves the weights alone (on both ranks); a good step moves them
    assert weights[4] == weights[3] and weights[6] == weights[5] and weights[5] != weights[4]
    # Both ranks hold the same weights from step 2 on. (Not at step 1: each DP rank initializes the model from its
    # own seed, and the distributed optimizer's first all-gather makes them equal; reported separately.)
    assert {s: w for s, w in weights.items() if s >= 2} == {s: w for s, w in weights1.items() if s >= 2}
    assert all(r["loss"] == r["loss"] for s, r in rows.items() if s in (4, 6, 7))  # finite again after a skip
    assert any("step 5 skipped: NaN/inf gradient (1 in a row, 2 in this run so far)" in line for line in log)
    stop = next(line for line in log if line.startswith("stopping at step 10"))
    assert "3 steps in a row with a NaN/inf loss, the last at step 10" in stop and "Likely cause" in stop, stop
    assert "(exit 3)" in stop
    assert (tmp_path / "latest").read_text().strip() == "8"  # step 8's weights were still those of step 7
    print("\nFIGURE nan: injected NaN at steps 3 (loss), 5 (gradient), 8+ (loss): 5 steps skipped on both ranks "
          "with the weights untouched; stopped at step 10 (exit 3), detection 0 steps after each fault")


def test_fp16_overflows_until_the_scale_floor_stop_naming_bf16(tmp_path, shards, monkeypatch):
    monkeypatch.chdir(ROOT)
    faults = {"inf_grad": [([0], 2, 10**9)]}  # every step from 2 overflows (rank 0's gradient)
    results = run_ranks(_driver_with_faults, 2, _argv(
        tmp_path, shards, "train.max_steps=40", "train.precision=fp16", "train.initial_loss_scale=4",
        "train.min_loss_scale=1", "train.loss_scale_hysteresis=1", "train.loss_scale_floor_steps=3"), faults)
    (code0, _, log), (code1, _, _) = results
    assert code0 == code1 == 3
    rows = _train_rows(tmp_path)
    assert [rows[s]["loss_scale"] for s in sorted(rows)] == [4, 2, 1, 1, 1]  # halves per overflow, then the floor
    assert all(rows[s]["skipped"] and rows[s]["nonfinite"] is None for s in (2, 3, 4, 5))  # overflow, not NaN
    stop = next(line for line in log if line.startswith("stopping at step 5"))
    assert "loss scale sat at its floor (1) for 3 steps" in stop and "train.precision=bf16" in stop, stop
    print("\nFIGURE fp16-floor: overflow every step from step 2: scale 4 -> 2 -> 1, three steps at the floor, "
          "stopped at step 5 with exit 3 naming bf16")
