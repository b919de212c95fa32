import subprocess
import sys

import pytest
import torch

from megatron_speech.config import load_config
from megatron_speech.models.wav2vec2.factory import count_parameters
from tests.fixtures import ROOT


def test_xl_is_317m_and_agrees_with_transformers():
    cfg = load_config(str(ROOT / "configs/xl.yaml"), []).model
    ours = count_parameters(cfg)
    assert abs(ours - 317e6) <= 0.01 * 317e6, ours
    transformers = pytest.importorskip("transformers")
    from megatron_speech.models.wav2vec2.interop import config_to_hf

    with torch.device("meta"):  # transformers' own model of the same architecture, no weights allocated
        ref = transformers.Wav2Vec2ForPreTraining(config_to_hf(cfg))
    assert ours == sum(p.numel() for p in ref.parameters())


def test_count_params_tool_prints_the_count():
    out = subprocess.run([sys.executable, "tools/count_params.py", "--config", "configs/xl.yaml"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "317." in out and "parameters" in out
