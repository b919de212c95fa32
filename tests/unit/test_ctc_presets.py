"""configs/finetune/ctc_xl_*.yaml: each loads as a fine-tuning config of the xl encoder, valid for 32 ranks, and
sets what its header says fairseq's recipe file has (the numbers are read from the comment, not repeated here).
Needs model.layerdrop (models/wav2vec2/config.py), which another branch adds: until it is merged, loading fails on
that key."""

from __future__ import annotations

import re

import pytest

from megatron_speech.training.finetune_config import load_finetune_config
from tests.fixtures import ROOT

PRESETS = ["10m", "1h", "10h", "100h"]


def _fact(header: str, pattern: str) -> str:
    found = re.search(pattern, header)
    assert found, f"the header lacks {pattern!r}"
    return found.group(1)


@pytest.mark.parametrize("name", PRESETS)
def test_ctc_preset_sets_what_its_fairseq_recipe_says(name):
    path = ROOT / "configs" / "finetune" / f"ctc_xl_{name}.yaml"
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"examples/wav2vec/config/finetuning/vox_{name}.yaml" in header
    cfg = load_finetune_config(str(path), ["pretrained=none"])
    cfg.validate(32)
    o, t, ft, d = cfg.optim, cfg.train, cfg.finetune, cfg.data
    assert cfg.model.hidden_size == 1024 and cfg.model.num_layers == 24  # the xl encoder (scratch_config)
    assert ft.task == "asr" and t.best_metric == "wer" and t.keep_best
    assert o.lr == float(_fact(header, r"lr \[([0-9.e-]+)\]"))
    assert t.max_steps == int(_fact(header, r"max_update (\d+)"))
    assert o.lr_schedule == "tri_stage" and list(o.phase_ratio) == [0.1, 0.4, 0.5]
    assert o.final_lr_scale == float(_fact(header, r"final_lr_scale ([0-9.]+)")) and o.init_lr_scale == 0.01
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps, o.weight_decay, o.clip_grad) == (0.9, 0.98, 1e-8, 0.0, 0.0)
    assert ft.mask_prob == float(_fact(header, r"mask_prob ([0-9.]+)"))
    assert ft.mask_channel_prob == float(_fact(header, r"mask_channel_prob ([0-9.]+)"))
    assert (ft.mask_length, ft.mask_channel_length) == (10, int(_fact(header, r"mask_channel_length (\d+)")))
    assert ft.freeze_encoder_steps == int(_fact(header, r"freeze_finetune_updates (\d+)"))
    assert ft.freeze_feature_encoder  # feature_grad_mult 0.0
    assert cfg.model.layerdrop == float(_fact(header, r"layerdrop ([0-9.]+)"))
    assert t.validate_after_steps == int(_fact(header, r"validate_after_updates (?:unset \()?(\d+)"))
    # the batch: fairseq's per-GPU max_tokens x update_freq x GPUs, here at the GPU count the header states
    fairseq = int(_fact(header, r"max_tokens (\d+)")) * int(_fact(header, r"update_freq \[(\d+)\]")) * \
        int(_fact(header, r"distributed_world_size (\d+)"))
    gpus = int(_fact(header, r"here for (\d+) GPUs"))
    assert d.max_tokens * t.num_micro_batches * gpus == fairseq
    assert not d.speed_perturb and t.eval_interval > 0
