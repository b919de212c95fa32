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


def _tiny_encoder_only(kind: str, **kw):
    """A random transformers Wav2Vec2Model or Wav2Vec2ForCTC at tiny size (the XLSR layout)."""
    from tests.hf_reference import hf_tiny_config

    torch.manual_seed(1)
    cls = {"model": transformers.Wav2Vec2Model, "ctc": transformers.Wav2Vec2ForCTC}[kind]
    model = cls(hf_tiny_config(**kw)).eval()
    with torch.no_grad():  # away from HF's init (zero biases, unit norms would hide a mixed-up tensor)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# Wav2Vec2Model saved with mask_time_prob = mask_feature_prob = 0 has no masked_spec_embed; Wav2Vec2ForCTC has
# one (mask_time_prob > 0) and an lm_head.
@pytest.mark.parametrize("kind", ["model", "ctc"])
def test_encoder_only_models_convert_with_warnings_and_embed_like_transformers(kind, tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_speech.checkpoint.model_io import checkpoint_config, resolve, untrained_heads
    from megatron_speech.embed import embed_manifest, load_waveform
    from megatron_speech.training.finetune_config import load_finetune_config

    hf = _tiny_encoder_only(kind, **({"mask_time_prob": 0.0, "mask_feature_prob": 0.0} if kind == "model" else
                                     {"vocab_size": 12}))
    assert any("masked_spec_embed" in k for k in hf.state_dict()) == (kind == "ctc")
    hf.save_pretrained(tmp_path / "hf")
    r = subprocess.run([sys.executable, "tools/convert_from_hf.py", "--hf", str(tmp_path / "hf"), "--output",
                        str(tmp_path / "ckpt"), "--config", "configs/tiny.yaml"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for absent in ("quantizer.codevectors", "quantizer.weight_proj.weight", "project_q.weight", "project_hid.bias"):
        assert absent in r.stderr
    assert ("wav2vec2.masked_spec_embed" in r.stderr) == (kind == "model")
    assert ("lm_head.weight" in r.stderr) == (kind == "ctc")
    common = dist_checkpointing.load_common_state_dict(str(resolve(tmp_path / "ckpt")))
    untrained = common["trainer"]["untrained_weights"]
    assert "quantizer.codevectors" in untrained and ("mask_emb" in untrained) == (kind == "model")
    assert "quantizer.codevectors" in untrained_heads(common["trainer"])  # what pre-training warns about

    # every layer over a manifest, against transformers on the same audio
    rng = np.random.default_rng(0)
    soundfile.write(tmp_path / "a.wav", rng.standard_normal(int(1.3 * 16000)).astype(np.float32) * 0.1, 16000,
                    subtype="PCM_16")
    (tmp_path / "m.jsonl").write_text('{"path": "a.wav"}\n')
    embed_manifest(str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl"), str(tmp_path / "emb"), "all,final")
    cfg = checkpoint_config(tmp_path / "ckpt")
    wave = load_waveform(str(tmp_path / "a.wav"), cfg.data.normalize, cfg.data.normalize_eps)
    with torch.no_grad():
        ref = (hf if kind == "model" else hf.wav2vec2)(wave, output_hidden_states=True)
    layers = [str(i) for i in range(cfg.model.num_layers + 1)]
    expected = dict(zip(layers, ref.hidden_states, strict=True)) | {"final": ref.last_hidden_state}
    for name, value in expected.items():
        np.testing.assert_allclose(np.load(tmp_path / "emb" / name / "a.wav.npy"), value[0].numpy(), atol=1e-4,
                                   rtol=0, err_msg=f"layer {name}")
    # and as fine-tuning's pretrained= (its config comes from the checkpoint)
    ft = load_finetune_config("configs/finetune/phoneme.yaml", [f"pretrained={tmp_path / 'ckpt'}"])
    assert (ft.model.hidden_size, ft.model.num_layers) == (cfg.model.hidden_size, cfg.model.num_layers)
