"""Reliability drill 5, hostile configs: property-based tests (hypothesis) over `section.key=value` overrides.

Every override list either loads into a valid Config or raises one ValueError naming a dotted key, before any
process group forms; nothing else escapes (no TypeError / ZeroDivisionError / a traceback from inside torch). And
a model config that validates builds and trains one step at TP=1 (validation is complete, not just strict).
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from megatron_speech.config import Config, all_keys, field_types, load_config, sections
from tests.fixtures import ROOT

TINY = str(ROOT / "configs/tiny.yaml")
KEYS = all_keys()
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
DOTTED = re.compile(r"\b[a-z]+\.[a-z_0-9]+\b")


def _load(overrides: list[str], world_size: int | None = None) -> Config:
    cfg = load_config(TINY, overrides)
    cfg.validate(world_size)
    return cfg


def _assert_clear(error: ValueError) -> None:
    message = str(error)
    assert message.strip(), "empty error message"
    assert DOTTED.search(message) or "override" in message, message  # names the key (or the bad override)
    assert "Traceback" not in message


# ------------------------------------------------------------------------------------------ value strategies


def _yaml_float(x: float) -> str:
    if math.isnan(x):
        return ".nan"
    if math.isinf(x):
        return ".inf" if x > 0 else "-.inf"
    return repr(x)


scalars = st.one_of(
    st.integers(-10, 10).map(str),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(_yaml_float),
    st.floats(-2.0, 2.0).map(_yaml_float),
    st.sampled_from(["true", "false", "null", "", "~", "fp16", "none", "[]", "{}", "'7'", "1e400", "0x10", "1_000"]),
    st.text(alphabet="abcxyz019.-_ []{},:'\"", max_size=12),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
                   st.lists(st.lists(st.integers(-3, 40).map(str), max_size=4), max_size=3)
                   .map(lambda xss: "[" + ", ".join("[" + ", ".join(xs) + "]" for xs in xss) + "]"))


@st.composite
def keys(draw) -> str:
    key = draw(st.sampled_from(KEYS))
    mutation = draw(st.sampled_from(["none"] * 8 + ["typo", "section", "bare"]))
    if mutation == "typo":
        i = draw(st.integers(0, len(key) - 1))
        return key[:i] + key[i + 1:]
    if mutation == "section":
        return draw(st.sampled_from(list(sections()))) + "." + key.split(".")[1]
    if mutation == "bare":
        return key.split(".")[1]
    return key


@functools.cache
def _tiny() -> Config:
    return load_config(TINY, [])


def _near_default(key: str, draw) -> str:
    """A value of the field's own type near the tiny preset's value (most likely to slip past a missing rule)."""
    section, name = key.split(".")
    tp = field_types(sections()[section])[name]
    current = getattr(getattr(_tiny(), section), name)
    if tp is int:
        return str(draw(st.one_of(st.integers(-2, 3), st.integers(-2, max(2 * int(current), 3)))))
    if tp is float:
        return _yaml_float(draw(st.one_of(st.sampled_from([0.0, -0.0, 1e-12, -1.0, float("nan"), float("inf")]),
                                          st.floats(-2 * abs(current) - 1, 2 * abs(current) + 1))))
    return draw(values)


@st.composite
def overrides(draw) -> list[str]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        key = draw(keys())
        value = draw(values) if draw(st.booleans()) or key not in KEYS else _near_default(key, draw)
        out.append(f"{key}={value}")
    return out


# ------------------------------------------------------------------------------------------ properties


@SETTINGS
@given(overrides(), st.one_of(st.none(), st.integers(1, 64)))
def test_any_overrides_load_or_raise_one_clear_value_error(items, world_size):
    try:
        cfg = _load(items, world_size)
    except ValueError as e:
        _assert_clear(e)
        return
    # Whatever loads is a config the driver can act on: finite numbers, and it survives a dict round trip.
    from megatron_speech.config import config_from_dict, config_to_dict

    for section in sections():
        for name, value in vars(getattr(cfg, section)).items():
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, float):
                    assert math.isfinite(v), f"{section}.{name}={value} loaded"
    assert config_from_dict(config_to_dict(cfg)) == cfg


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(heads=st.integers(1, 16), per_head=st.integers(1, 8), ffn=st.integers(1, 64), tp=st.integers(1, 16),
       world=st.integers(1, 32))
def test_tp_must_divide_heads_ffn_and_world(heads, per_head, ffn, tp, world):
    items = [f"model.num_attention_heads={heads}", f"model.hidden_size={heads * per_head * 4}",
             f"model.ffn_hidden_size={ffn}", f"parallel.tensor_model_parallel_size={tp}", "model.pos_conv_groups=1"]
    bad = heads % tp or ffn % tp or world % tp
    if bad:
        with pytest.raises(ValueError, match="parallel.tensor_model_parallel_size") as e:
            _load(items, world)
        _assert_clear(e.value)
    else:
        _load(items, world)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.floats(max_value=-1e-300), st.just(float("nan")), st.just(float("-inf")), st.just(float("inf"))))
def test_negative_or_non_finite_lr_is_refused(lr):
    with pytest.raises(ValueError, match=r"optim\.lr") as e:
        _load([f"optim.lr={_yaml_float(lr)}"])
    _assert_clear(e.value)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.integers(-10, 64_000 - 1))
def test_max_tokens_below_one_longest_crop_is_refused(max_tokens):
    with pytest.raises(ValueError, match=r"data\.max_tokens") as e:  # tiny: 4 s = 64000 samples
        _load([f"data.max_tokens={max_tokens}"])
    _assert_clear(e.value)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.from_regex(r"[a-z]{1,8}\.[a-z_]{1,12}", fullmatch=True), values)
def test_unknown_key_is_named(key, value):
    assume(key not in KEYS)
    with pytest.raises(ValueError, match="unknown") as e:
        _load([f"{key}={value}"])
    assert repr(key) in str(e.value) or repr(key.split(".")[0]) in str(e.value)


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(st.sampled_from([k for k in KEYS if field_types(sections()[k.split(".")[0]])[k.split(".")[1]] in (int, bool)]),
       st.sampled_from(["abc", "1.5", "[1, 2]", "{a: 1}", "'x'", "null", ".nan"]))
def test_wrong_type_is_named(key, value):
    tp = field_types(sections()[key.split(".")[0]])[key.split(".")[1]]
    with pytest.raises(ValueError) as e:
        _load([f"{key}={value}"])
    assert f"{key}=" in str(e.value) and f"expected {tp.__name__}" in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------ validated => runs


@st.composite
def model_overrides(draw) -> list[str]:
    heads = draw(st.sampled_from([1, 2, 3, 4]))
    hidden = heads * draw(st.integers(2, 8)) * draw(st.sampled_from([1, 1, 1, 3]))
    conv = [[draw(st.integers(2, 12)), draw(st.integers(1, 10)), draw(st.integers(1, 5))]
            for _ in range(draw(st.integers(1, 4)))]
    groups = draw(st.integers(1, 3))
    items = [
        f"model.num_attention_heads={heads}", f"model.hidden_size={hidden}",
        f"model.ffn_hidden_size={draw(st.integers(1, 40))}", f"model.num_layers={draw(st.integers(1, 2))}",
        f"model.conv_layers={conv}",
        f"model.num_codevector_groups={groups}", f"model.codevector_dim={groups * draw(st.integers(1, 6))}",
        f"model.num_codevectors_per_group={draw(st.integers(1, 6))}",
        f"model.pos_conv_kernel={draw(st.integers(1, 20))}",
        f"model.pos_conv_groups={draw(st.sampled_from([1, heads, hidden, 2, 3]))}",
        f"model.final_dim={draw(st.integers(1, 12))}", f"model.num_negatives={draw(st.integers(1, 12))}",
        f"model.mask_prob={draw(st.sampled_from([0.0, 0.05, 0.3, 0.65, 0.95]))}",
        f"model.mask_length={draw(st.integers(1, 6))}", "model.mask_length_ms=null",
        f"model.mask_min_masks={draw(st.integers(0, 3))}",
        f"model.feature_penalty_weight={draw(st.sampled_from([0.0, 10.0]))}",
        f"data.min_sample_seconds={draw(st.sampled_from([0.01, 0.03, 0.1, 0.5]))}",
        "data.max_sample_seconds=1.0", "data.max_tokens=16000",
    ]
    return items


def _one_training_step(cfg) -> float:
    from megatron_speech.common.rng import counter_rng
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.models.wav2vec2.masker import compute_span_mask, sample_negatives
    from megatron_speech.parallel.initialize import single_rank_groups

    m = cfg.model
    model = build_model(m, pg_collection=single_rank_groups())
    frames = m.num_frames(round(cfg.data.min_sample_seconds * 16_000))  # the shortest crop the loader can form
    rng = counter_rng(0, 0, 0, 0)
    wave = torch.from_numpy(rng.standard_normal((2, m.num_samples(frames))).astype(np.float32))
    mask = compute_span_mask((2, frames), m.mask_prob, m.mask_length_frames, rng, min_masks=m.mask_min_masks)
    negatives = sample_negatives(mask, m.num_negatives, rng)
    out = model(wave, mask=torch.from_numpy(mask), negatives=torch.from_numpy(negatives))
    out.loss.backward()
    return float(out.loss)


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(model_overrides())
def test_a_model_config_that_validates_builds_and_trains(items):
    try:
        cfg = _load(items, world_size=1)
    except ValueError as e:
        _assert_clear(e)
        assume(False)
        return
    assume(cfg.model.num_frames(round(cfg.data.min_sample_seconds * 16_000)) <= 200)  # keep each example fast
    loss = _one_training_step(cfg)
    assert math.isfinite(loss), (items, loss)


# ------------------------------------------------------------------------------------------ the drills' own keys


@pytest.mark.parametrize("override, message", [
    ("train.collective_timeout_seconds=0", r"train\.collective_timeout_seconds=0\.0 must be > 0"),
    ("train.collective_timeout_seconds=.inf", r"train\.collective_timeout_seconds=inf must be a finite number"),
    ("train.on_save_error=retry", r"train\.on_save_error='retry'.*expected one of 'stop', 'continue'"),
    ("optim.lr=.nan", r"optim\.lr=nan must be a finite number"),
    ("data.noise_snr_db=[0, .inf]", r"data\.noise_snr_db=\(0\.0, inf\) must be a finite number"),
])
def test_reliability_keys_and_non_finite_numbers_are_checked(override, message):
    with pytest.raises(ValueError, match=message):
        _load([override])


def test_reliability_defaults():
    t = Config().train
    assert t.collective_timeout_seconds == 600.0 and t.on_save_error == "stop" and t.keep_last >= 2
