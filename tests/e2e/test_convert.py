"""Export / import against transformers: a TP=2-trained checkpoint exports to a directory whose Wav2Vec2Model
gives the hidden states `megatron_speech.embed` gives; HF -> ours -> HF returns every tensor exactly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from tests.dist import run_ranks
from tests.fixtures import ROOT, global_batch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def _train_tp2(rank, world, save_dir):
    from megatron_speech.checkpoint.checkpointing import save_checkpoint
    from megatron_speech.config import config_to_dict
    from megatron_speech.training.step import train_step
    from tests.runs import setup_training

    cfg, model, ddp, opt, sched, ema, _, _ = setup_training(2)  # TP=2, DP=1, EMA on
    for step in (1, 2, 3):
        train_step(ddp, opt, global_batch(cfg.model, step))
        sched.step(1)
        ema.update()
    save_checkpoint(save_dir, 3, ddp, opt, sched, ema, {"config": config_to_dict(cfg)})


def tool(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    run_ranks(_train_tp2, 2, str(root / "run"))
    tool("tools/convert_to_hf.py", "--checkpoint", str(root / "run"), "--output", str(root / "hf"))
    # an awkward input: 22.05 kHz stereo, not a whole number of frames
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((int(1.37 * 22050), 2)).astype(np.float32) * 0.1
    soundfile.write(root / "clip.wav", audio, 22050, subtype="PCM_16")
    return root


@pytest.mark.parametrize("layer", [None, 1])
def test_transformers_on_the_export_matches_embed(exported, layer):
    from megatron_speech.checkpoint.model_io import checkpoint_config
    from megatron_speech.embed import load_waveform

    out = exported / f"emb{layer}.npy"
    args = ["-m", "megatron_speech.embed", "--checkpoint", str(exported / "run"), "--audio",
            str(exported / "clip.wav"), "--output", str(out)] + ([] if layer is None else ["--layer", str(layer)])
    tool(*args)
    ours = np.load(out)
    cfg = checkpoint_config(exported / "run")
    hf = transformers.Wav2Vec2Model.from_pretrained(exported / "hf").eval()
    wave = load_waveform(str(exported / "clip.wav"), cfg.data.normalize, cfg.data.normalize_eps)
    with torch.no_grad():
        ref = hf(wave, output_hidden_states=True)
    expected = ref.last_hidden_state[0] if layer is None else ref.hidden_states[layer][0]
    assert ours.shape == tuple(expected.shape)
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-4, rtol=0)


def test_hf_to_ours_to_hf_round_trips_exactly(exported):
    import json
    import shutil

    from safetensors.torch import load_file

    # an HF model trained with layerdrop (XLS-R's configs say 0.1): the setting survives both tools
    shutil.copytree(exported / "hf", exported / "hf_layerdrop")
    config = json.loads((exported / "hf_layerdrop" / "config.json").read_text())
    (exported / "hf_layerdrop" / "config.json").write_text(json.dumps({**config, "layerdrop": 0.25}))
    tool("tools/convert_from_hf.py", "--hf", str(exported / "hf_layerdrop"), "--output", str(exported / "imported"),
         "--config", "configs/tiny.yaml", "--tp", "2")
    tool("tools/convert_to_hf.py", "--checkpoint", str(exported / "imported"), "--output", str(exported / "hf2"))
    from megatron_speech.checkpoint.model_io import checkpoint_config

    assert checkpoint_config(exported / "imported").model.layerdrop == 0.25
    assert transformers.Wav2Vec2Config.from_pretrained(exported / "hf2").layerdrop == 0.25
    first, second = load_file(exported / "hf" / "model.safetensors"), load_file(exported / "hf2" / "model.safetensors")
    assert first.keys() == second.keys() and len(first) > 20
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_ema_export_differs_from_raw_weights(exported):
    from safetensors.torch import load_file

    tool("tools/convert_to_hf.py", "--checkpoint", str(exported / "run"), "--output", str(exported / "hf_ema"),
         "--ema")
    raw, ema = load_file(exported / "hf" / "model.safetensors"), load_file(exported / "hf_ema" / "model.safetensors")
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_unsupported_hf_model_is_refused(tmp_path):
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, conv_dim=[8] * 7, feat_extract_norm="group",
                                      do_stable_layer_norm=False)
    transformers.Wav2Vec2ForPreTraining(cfg).save_pretrained(tmp_path / "base")
    r = subprocess.run([sys.executable, "tools/convert_from_hf.py", "--hf", str(tmp_path / "base"), "--output",
                        str(tmp_path / "x"), "--config", "configs/tiny.yaml"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "unsupported wav2vec 2.0 variant" in r.stderr
