"""parallel.overlap_param_gather reaches megatron's DDP, and the weights the loop reads between an update and the next
forward (the EMA update, evaluation, the EMA evaluation, the checkpoint) are the updated ones: the pre-training driver
on 2 DP ranks gives the same losses, EMA evaluations and saved weights with the overlap as without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import run_ranks

pytestmark = pytest.mark.slow


def _driver(rank: int, world: int, argv: list[str]) -> tuple[int, list[bool]]:
    """pretrain.main(argv); returns its exit code and the overlap_param_gather of every DDP wrapper it built."""
    import megatron_speech.pretrain as driver
    from megatron_speech.training import parallelize

    built: list[bool] = []

    class Recording(parallelize.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(bool(self.ddp_config.overlap_param_gather))

    parallelize.DistributedDataParallel = Recording
    return driver.main(argv), built


def _weights(rank: int, world: int, checkpoint: str) -> dict[str, torch.Tensor]:
    from megatron_speech.checkpoint.model_io import checkpoint_config, load_model_weights
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import single_rank_groups

    cfg = checkpoint_config(checkpoint)
    model = build_model(cfg.model, pg_collection=single_rank_groups())
    load_model_weights(checkpoint, model)
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    load_model_weights(checkpoint, model, use_ema=True)
    out.update({f"ema.{n}": p.detach().clone() for n, p in model.named_parameters()})
    return out


def _rows(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_overlap_param_gather_changes_nothing_but_the_schedule(tmp_path, shards):
    runs = {}
    for overlap in (False, True):
        save = tmp_path / f"overlap_{overlap}"
        argv = ["--config", "configs/tiny.yaml", f"data.prefix={shards}", f"train.save_dir={save}",
                "train.max_steps=5", "train.eval_interval=2", "train.eval_iters=1", "train.save_interval=5",
                "train.log_interval=1", "parallel.overlap_grad_reduce=true",
                f"parallel.overlap_param_gather={str(overlap).lower()}"]
        results = run_ranks(_driver, 2, argv, timeout=300)
        assert [code for code, _ in results] == [0, 0]
        assert all(built == [overlap] for _, built in results), results  # the flag reached megatron's DDP
        runs[overlap] = save
    keep = ("step", "split", "loss", "grad_norm", "accuracy", "code_perplexity")
    plain, overlapped = ([{k: r[k] for k in keep if k in r} for r in _rows(runs[o])] for o in (False, True))
    assert {r["split"] for r in plain} >= {"train", "valid", "valid_ema"}
    assert overlapped == plain
    (w_plain,), (w_overlap,) = (run_ranks(_weights, 1, str(runs[o]), timeout=120) for o in (False, True))
    assert w_plain.keys() == w_overlap.keys()
    for name, value in w_plain.items():
        assert torch.equal(w_overlap[name], value), name
