"""The conv feature encoder against a plain [B, C, T] reference built from torch's Conv1d / LayerNorm / GELU (the
fairseq formulation), forward and backward, for both weight-gradient paths (native channels-last, and the
contiguous weight gradient the CPU build uses)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_speech.models.wav2vec2.feature_extractor import CONTIGUOUS_WEIGHT_GRAD_MIN_CHANNELS, ConvFeatureExtractor

C = CONTIGUOUS_WEIGHT_GRAD_MIN_CHANNELS  # wide enough for the CPU build's weight-gradient path
LAYERS = [(C, 10, 5), (C, 3, 2), (C, 3, 2), (C, 2, 2)]


def reference(extractor: ConvFeatureExtractor, wave: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, C, F] in the [B, C, T] layout, with the extractor's own parameters."""
    x = wave[:, None]
    for block in extractor.blocks:
        x = F.conv1d(x, block.conv.weight, block.conv.bias, stride=block.conv.stride)
        x = F.layer_norm(x.transpose(1, 2), (x.shape[1],), block.layer_norm.weight, block.layer_norm.bias,
                         block.layer_norm.eps).transpose(1, 2)
        x = F.gelu(x)
    return x


@pytest.mark.parametrize("contiguous_weight_grad", [False, True])
def test_features_and_gradients_match_the_conv1d_reference(contiguous_weight_grad):
    torch.manual_seed(0)
    extractor = ConvFeatureExtractor(LAYERS, contiguous_weight_grad=contiguous_weight_grad)
    for block in extractor.blocks[1:]:
        assert block.contiguous_weight_grad == contiguous_weight_grad  # the first block keeps the native path
    wave = torch.randn(3, 4000)
    probe = torch.randn(3, C, extractor.num_frames(4000))

    grads = []
    for fn in (extractor, lambda w: reference(extractor, w)):
        extractor.zero_grad()
        out = fn(wave)
        (out * probe).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in extractor.named_parameters()}))
    (ours, our_grads), (ref, ref_grads) = grads
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        scale = g.abs().max().clamp(min=1e-12)
        assert (our_grads[name] - g).abs().max() <= 1e-5 * scale, name


def test_input_gradient_of_a_middle_block_matches_the_native_path():
    # the first block's waveform needs no gradient; a middle block's input does (the channels-last grad_input)
    torch.manual_seed(1)
    block = ConvFeatureExtractor(LAYERS, contiguous_weight_grad=True).blocks[1]
    x = torch.randn(2, 50, C, requires_grad=True)  # [B, T, C] as the blocks take it
    probe = torch.randn(2, 24, C)
    results = []
    for contiguous in (True, False):
        block.contiguous_weight_grad = contiguous
        x.grad = None
        block.zero_grad()
        (block(x) * probe).sum().backward()
        results.append((x.grad.clone(), block.conv.weight.grad.clone(), block.conv.bias.grad.clone()))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
