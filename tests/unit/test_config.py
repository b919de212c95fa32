"""Config loading, overrides, validation, round trip and help (megatron_speech/config/, configs/*.yaml)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from megatron_speech.config import (
    Config,
    all_keys,
    config_from_dict,
    config_to_dict,
    field_docs,
    format_help,
    load_config,
    parse_cli,
)
from tests.fixtures import ROOT

CONFIGS = ROOT / "configs"
PRESETS = ["tiny", "base", "xl"]


def preset(name: str, *overrides: str) -> Config:
    return load_config(str(CONFIGS / f"{name}.yaml"), list(overrides))


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_validates_for_32_ranks(name: str) -> None:
    cfg = preset(name)
    cfg.validate(world_size=32)
    cfg.validate(world_size=1)


def test_presets_only_override_known_keys() -> None:
    keys = set(all_keys())
    for name in PRESETS:
        mapping = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        for section, values in mapping.items():
            for key in values or {}:
                assert f"{section}.{key}" in keys, (name, section, key)


def test_tiny_conv_stack_keeps_the_frame_geometry() -> None:
    m = preset("tiny").model
    assert m.total_stride == 320 and m.receptive_field == 400
    assert [(k, s) for _, k, s in m.conv_layers] == [(k, s) for _, k, s in Config().model.conv_layers]
    # frame i covers samples [320 i, 320 i + 400): F frames need exactly 320 (F - 1) + 400 samples
    for frames in (1, 7, 50):
        assert m.num_frames(m.num_samples(frames)) == frames
        assert m.num_frames(m.num_samples(frames) - 1) == frames - 1
    assert all(isinstance(layer, tuple) for layer in m.conv_layers)
    assert m.conv_dim == 32 and m.hidden_size == 64 and m.num_layers == 2


def test_tiny_is_cpu_sized_and_fp32() -> None:
    cfg = preset("tiny")
    assert cfg.train.precision == "fp32"
    assert cfg.data.max_tokens <= 100_000
    assert cfg.train.save_dir.startswith("runs/")


def test_base_is_pre_ln_layer_norm_family_with_fairseq_base_numerics() -> None:
    m = preset("base").model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size, m.final_dim) == (
        12, 768, 12, 3072, 256)
    assert m.extractor_mode == "layer_norm"
    assert (m.feature_grad_mult, m.gumbel_min_temperature, m.feature_penalty_weight) == (0.1, 0.5, 10.0)
    assert (m.mask_prob, m.mask_length_frames) == (0.65, 10)


def test_xl_recipe() -> None:
    cfg = preset("xl")
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (24, 1024, 16, 4096)
    assert (o.lr, o.adam_beta1, o.adam_beta2, o.adam_eps, o.weight_decay, o.clip_grad) == (
        5e-4, 0.9, 0.98, 1e-6, 0.01, 10.0)
    assert o.decay_steps == 400_000 and o.decay_power == 1.0 and o.min_lr == 0.0 and 0 < o.warmup_steps
    assert t.precision == "fp16" and t.save_interval == 10_000 and t.ema_decay > 0
    assert t.early_stop_patience == 5
    assert d.speed_perturb == [0.9, 1.0, 1.1] and d.noise_dir
    # the seed's masking: 65 ms spans → 3 frames of 20 ms, probability 0.065
    assert m.mask_length_ms == 65.0 and m.mask_length_frames == 3 and m.mask_prob == 0.065


def test_xl_accepts_fairseq_masking_in_frames() -> None:
    # Setting the frames after the file's ms value must win (else the 65 ms would silently stay).
    m = preset("xl", "model.mask_length=10", "model.mask_prob=0.65").model
    assert m.mask_length_ms is None and m.mask_length_frames == 10 and m.mask_prob == 0.65
    assert preset("tiny", "model.mask_length_ms=65").model.mask_length_frames == 3
    assert preset("tiny", "model.mask_length_ms=200").model.mask_length_frames == 10


def test_dataclass_defaults_are_the_xl_model() -> None:
    xl = preset("xl").model
    # 65 ms in the file, 3 frames by default
    assert xl.mask_length_frames == Config().model.mask_length_frames
    assert Config().model == dataclasses.replace(xl, mask_length_ms=None)
    assert Config().optim == preset("xl").optim


# ------------------------------------------------------------------------------------------ overrides


def test_overrides_apply_with_field_types() -> None:
    cfg = preset("tiny",
                 "optim.lr=5e-4",                       # YAML 1.1 reads this as a string: still a float
                 "optim.warmup_steps=1e1",               # integral float text → int
                 "train.max_steps=7",
                 "parallel.overlap_grad_reduce=false",
                 "data.speed_perturb=[0.9, 1.1]",
                 "data.noise_snr_db=[0, 15]",
                 "model.mask_length_ms=null",
                 "model.mask_length=3",
                 "model.conv_layers=[[16, 10, 5], [16, 3, 2]]",
                 "data.prefix=/data/en",                 # a scalar for a list means a one-element list
                 "train.save_dir=runs/007",              # str fields keep the text verbatim
                 "data.noise_dir=")
    assert cfg.optim.lr == 5e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.warmup_steps == 10 and type(cfg.optim.warmup_steps) is int
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int
    assert cfg.parallel.overlap_grad_reduce is False
    assert cfg.data.speed_perturb == [0.9, 1.1]
    assert cfg.data.noise_snr_db == (0.0, 15.0) and all(type(x) is float for x in cfg.data.noise_snr_db)
    assert cfg.model.mask_length_ms is None and cfg.model.mask_length_frames == 3
    assert cfg.model.conv_layers == [(16, 10, 5), (16, 3, 2)]
    assert cfg.data.prefix == ["/data/en"]
    assert cfg.train.save_dir == "runs/007"
    assert cfg.data.noise_dir == ""


def test_later_override_wins_and_int_becomes_float() -> None:
    cfg = preset("tiny", "train.max_steps=5", "train.max_steps=9", "optim.clip_grad=1")
    assert cfg.train.max_steps == 9
    assert cfg.optim.clip_grad == 1.0 and type(cfg.optim.clip_grad) is float


def test_several_prefixes_with_weights() -> None:
    cfg = preset("xl", "data.prefix=[/d/en, /d/fr]", "data.weights=[0.7, 0.3]")
    assert cfg.data.prefix == ["/d/en", "/d/fr"] and cfg.data.weights == [0.7, 0.3]
    with pytest.raises(ValueError, match=r"data\.weights has 1 entries but data\.prefix has 2"):
        preset("xl", "data.prefix=[/d/en, /d/fr]", "data.weights=[1.0]")


@pytest.mark.parametrize("override, close", [
    ("train.max_step=5", "train.max_steps"),
    ("optim.max_steps=5", "train.max_steps"),   # right name, wrong section
    ("max_steps=5", "train.max_steps"),         # no section
    ("trian.seed=3", "train.seed"),             # misspelt section
    ("model.hiden_size=8", "model.hidden_size"),
])
def test_unknown_override_key_names_it_and_suggests(override: str, close: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ValueError, match="unknown") as e:
        preset("tiny", override)
    assert repr(key) in str(e.value) and repr(close) in str(e.value)


def test_unknown_yaml_key_and_section(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        load_config(write_yaml(tmp_path, "optim:\n  weight_decy: 0.1\n"), [])
    assert "'optim.weight_decay'" in str(e.value) and "'optim.weight_decy'" in str(e.value)
    assert "cfg.yaml" in str(e.value)
    with pytest.raises(ValueError, match=r"unknown section 'modle'.*'model'"):
        load_config(write_yaml(tmp_path, "modle:\n  hidden_size: 8\n"), [])


def test_yaml_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="section 'train' must be a mapping"):
        load_config(write_yaml(tmp_path, "train: 5\n"), [])
    with pytest.raises(ValueError, match="expected a mapping of sections"):
        load_config(write_yaml(tmp_path, "- a\n- b\n"), [])
    with pytest.raises(ValueError, match="duplicate key 'max_steps'"):
        load_config(write_yaml(tmp_path, "train:\n  max_steps: 1\n  max_steps: 2\n"), [])
    # An empty file or an empty section is just "no overrides".
    assert load_config(write_yaml(tmp_path, ""), []) == Config()
    assert load_config(write_yaml(tmp_path, "data:\n"), []) == Config()


@pytest.mark.parametrize("override, key, expected", [
    ("train.max_steps=ten", "train.max_steps", "int"),
    ("train.max_steps=2.5", "train.max_steps", "int"),
    ("optim.lr=fast", "optim.lr", "float"),
    ("optim.lr=true", "optim.lr", "float"),
    ("parallel.sequence_parallel=1", "parallel.sequence_parallel", "bool"),
    ("train.precision=fp8", "train.precision", "one of 'fp32', 'bf16', 'fp16'"),
    ("data.noise_snr_db=[1, 2, 3]", "data.noise_snr_db", "tuple[float, float]"),
    ("data.speed_perturb=[0.9, fast]", "data.speed_perturb[1]", "float"),
    ("model.conv_layers=[[32, 10]]", "model.conv_layers[0]", "tuple[int, int, int]"),
    ("model.mask_length_ms=long", "model.mask_length_ms", "float | None"),
    ("model.hidden_size=null", "model.hidden_size", "int"),
])
def test_wrong_type_names_key_value_and_type(override: str, key: str, expected: str) -> None:
    with pytest.raises(ValueError) as e:
        preset("tiny", override)
    msg = str(e.value)
    assert f"{key}=" in msg and f"expected {expected}" in msg, msg


def test_wrong_type_in_yaml(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train\.max_steps='many'.*expected int"):
        load_config(write_yaml(tmp_path, "train:\n  max_steps: many\n"), [])


def test_malformed_override() -> None:
    with pytest.raises(ValueError, match="expected section.key=value"):
        preset("tiny", "train.max_steps")
    with pytest.raises(ValueError, match=r"train\.max_steps.*cannot parse"):
        preset("tiny", "train.max_steps=[1,")


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tensor_model_parallel_size=3"], r"must divide model\.num_attention_heads=4"),
    (["model.ffn_hidden_size=130", "parallel.tensor_model_parallel_size=4"],
     r"must divide model\.ffn_hidden_size=130"),
    (["parallel.tensor_model_parallel_size=0"], r"tensor_model_parallel_size=0 must be >= 1"),
    (["train.precision=fp16", "train.min_loss_scale=1e9"], r"train\.min_loss_scale"),
    (["data.min_sample_seconds=5.0"],
     r"data\.min_sample_seconds=5\.0 must be <= data\.max_sample_seconds=4\.0"),
    (["data.max_tokens=1000"], r"data\.max_tokens=1000"),
    (["optim.warmup_steps=50"], r"optim\.decay_steps=40 must be > optim\.warmup_steps=50"),
    (["optim.min_lr=1.0"], r"optim\.min_lr"),
    (["model.mask_length=30"], r"model\.mask_min_masks=2 spans of 30 frames"),
    (["model.mask_length_ms=600"], r"spans of 30 frames"),
    (["model.mask_prob=1.0"], r"model\.mask_prob=1\.0 must be in \[0, 1\)"),
    (["model.extractor_mode=group_norm"], r"model\.extractor_mode"),
    (["train.eval_interval=0", "train.early_stop_patience=3"],
     r"train\.early_stop_patience > 0 needs evaluations"),
    (["parallel.overlap_param_gather=true", "parallel.use_distributed_optimizer=false"],
     r"overlap_param_gather=True needs parallel\.use_distributed_optimizer"),
    (["train.recompute_transformer=full", "train.recompute_num_layers=3"], r"train\.recompute_num_layers=3"),
    (["model.layerdrop=0.1", "parallel.overlap_param_gather=true"],
     r"model\.layerdrop=0\.1 needs parallel\.overlap_param_gather=false"),
    (["train.recompute_transformer=full", "model.num_layers=3", "train.recompute_num_layers=2"],
     r"train\.recompute_num_layers=2 must divide model\.num_layers=3"),
    (["data.noise_snr_db=[20, 5]"], r"data\.noise_snr_db"),
    (["train.num_micro_batches=0"], r"train\.num_micro_batches=0 must be > 0"),
])
def test_cross_field_rules(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preset("tiny", *overrides)


def test_validation_lists_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as e:
        preset("tiny", "train.max_steps=0", "optim.lr=-1")
    assert "train.max_steps=0" in str(e.value) and "optim.lr=-1.0" in str(e.value)


def test_tp_must_divide_world_size() -> None:
    cfg = preset("xl", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")
    cfg.validate(world_size=32)
    assert cfg.parallel.sequence_parallel_enabled
    with pytest.raises(ValueError, match=r"tensor_model_parallel_size=2 must divide the world size 3"):
        cfg.validate(world_size=3)


def test_xl_tp_choices_against_heads_and_ffn() -> None:
    for tp in (1, 2, 4, 8, 16):
        preset("xl", f"parallel.tensor_model_parallel_size={tp}").validate(world_size=32)
    with pytest.raises(ValueError, match="num_attention_heads=16"):
        preset("xl", "parallel.tensor_model_parallel_size=32")


def test_sequence_parallel_is_a_no_op_without_tp() -> None:
    cfg = preset("tiny", "parallel.sequence_parallel=true")
    assert cfg.parallel.sequence_parallel and not cfg.parallel.sequence_parallel_enabled


def test_tp_needs_a_frame_per_rank_in_the_shortest_crop() -> None:
    # 0.03 s = 480 samples → 1 frame: TP=2 would leave a rank without frames
    with pytest.raises(ValueError, match="every TP rank needs at least one frame"):
        preset("tiny", "data.min_sample_seconds=0.03", "model.mask_min_masks=0",
               "parallel.tensor_model_parallel_size=2")


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name", PRESETS)
def test_dict_round_trip_is_exact_through_json_and_yaml(name: str) -> None:
    cfg = preset(name, "data.prefix=[/a, /b]", "data.weights=[1, 3]", "model.mask_length_ms=45")
    d = config_to_dict(cfg)
    assert config_from_dict(d) == cfg
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    # the types survive too, not just equality (tuples stay tuples, floats stay floats)
    back = config_from_dict(json.loads(json.dumps(d)))
    assert type(back.model.conv_layers[0]) is tuple and type(back.data.noise_snr_db) is tuple
    assert type(back.data.weights[0]) is float


def test_dict_holds_every_key_and_unknown_keys_error() -> None:
    d = config_to_dict(Config())
    assert sorted(f"{s}.{k}" for s, v in d.items() for k in v) == sorted(all_keys())
    d["train"]["max_stepz"] = 3
    with pytest.raises(ValueError, match=r"unknown key 'train\.max_stepz'.*'train\.max_steps'"):
        config_from_dict(d)
    with pytest.raises(ValueError, match=r"unknown section 'extra'"):
        config_from_dict({"extra": {}})


# ------------------------------------------------------------------------------------------ help and CLI


def test_every_field_has_a_docstring() -> None:
    cfg = Config()
    for section in (f.name for f in dataclasses.fields(cfg)):
        cls = type(getattr(cfg, section))
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no attribute docstring"


def test_format_help_lists_every_key_with_type_default_and_doc() -> None:
    cfg = preset("tiny")
    text = format_help(cfg)
    for key in all_keys():
        section, name = key.split(".")
        assert f"  {key}: " in text, key
        doc = field_docs(type(getattr(cfg, section)))[name]
        assert doc in text, key
    assert "train.max_steps: int = 40 (default 400000)" in text
    assert "model.mask_length_ms: float | None = None" in text
    assert "train.precision: one of 'fp32', 'bf16', 'fp16' = 'fp32' (default 'fp16')" in text
    assert "1e-07" in text or "1e-7" in text  # the normalize_eps docstring names HF's epsilon


def test_parse_cli() -> None:
    assert parse_cli(["--config", "configs/xl.yaml", "train.max_steps=5", "data.prefix=[a, b]"]) == (
        "configs/xl.yaml", ["train.max_steps=5", "data.prefix=[a, b]"], False)
    assert parse_cli(["--config=c.yaml", "-h"]) == ("c.yaml", [], True)
    assert parse_cli(["--help"]) == (None, [], True)
    assert parse_cli([]) == (None, [], False)
    with pytest.raises(ValueError, match="'--max-steps'"):
        parse_cli(["--max-steps", "5"])
    with pytest.raises(ValueError, match="'stray'"):
        parse_cli(["stray"])
    with pytest.raises(ValueError, match="--config needs a path"):
        parse_cli(["--config"])
    with pytest.raises(ValueError, match="given twice"):
        parse_cli(["--config", "a.yaml", "--config", "b.yaml"])
