"""Conv feature encoder (layer-norm variant), sharded along time across tensor-parallel ranks.

A micro-batch holds T = stride * (F - 1) + receptive_field samples (F frames, F a multiple of tp); frame i
covers samples [stride * i, stride * i + receptive_field). TP rank r computes frames [r F/tp, (r+1) F/tp) from
its own sample slice (docs/design.md §3): no communication, and bit-for-bit the unsharded result because every block
normalizes over channels only (a group-norm block normalizes over time, which is why it is out of scope).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_speech.common.audio import ConvGeometry

from .layer_spec import fp32_layer_norm


class _GradMultiply(torch.autograd.Function):
    """Scales the gradient only (fairseq's feature_grad_mult: 0.1 stabilizes base-size pre-training)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


CONTIGUOUS_WEIGHT_GRAD_MIN_CHANNELS = 256


class _ConvWeightGradContiguous(torch.autograd.Function):
    """F.conv2d on a channels-last [B, C_in, 1, T] input whose backward takes the weight gradient in the
    contiguous [B, C, 1, T] layout. oneDNN (CPU) computes the channels-last weight gradient of these long 1-D convs
    4.6x slower than the contiguous one (512 channels, 15887 steps, 2 threads: 617 ms against 133 ms), while its
    channels-last forward and input gradient are 2x faster than contiguous: keeping those and copying the two
    tensors for the weight gradient is the fastest mix (docs/performance.md). cuDNN is not known to have this gap
    (unmeasured here): GPUs keep the plain conv (factory.py decides at build time)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.has_bias = stride, bias is not None
        return F.conv2d(x, weight, bias, stride=(1, stride))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        conv_args = ((1, ctx.stride), (0, 0), (1, 1), False, (0, 0), 1)  # stride, padding, dilation, ..., groups
        backward = torch.ops.aten.convolution_backward
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # channels-last, as the forward
            grad_x = backward(grad, x, weight, None, *conv_args, (True, False, False))[0]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # [B, C, 1, T] copies of both tensors
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            _, grad_weight, grad_bias = backward(grad.contiguous(), x.contiguous(), weight.contiguous(), bias_sizes,
                                                 *conv_args, (False, True, ctx.has_bias))
        return grad_x, grad_weight, grad_bias, None


class ConvBlock(nn.Module):
    """Conv1d -> LayerNorm over channels (fp32) -> GELU. Input/output [B, T, C] (time-major, contiguous).

    The conv runs as a 2-D conv over [B, C, 1, T] in channels-last memory, which *is* [B, T, C]: the channel
    LayerNorm and the GELU then read contiguous rows, and no transpose is ever copied (in the [B, C, T] layout
    every block paid two full copies around its LayerNorm plus strided GELU passes; cuDNN's bf16/fp16 kernels
    and oneDNN's prefer channels-last too). Same weights ([C_out, C_in, k], the checkpoint layout), same sums.
    `contiguous_weight_grad`: take the weight gradient in [B, C, T] (_ConvWeightGradContiguous; for oneDNN).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool, eps: float = 1e-5,
                 contiguous_weight_grad: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size=kernel, stride=stride, bias=bias)
        self.layer_norm = nn.LayerNorm(out_dim, eps=eps)
        nn.init.kaiming_normal_(self.conv.weight)
        # Only where oneDNN's channels-last weight gradient is the slow one: many channels (base / XL: 512). The
        # first block (one input channel) and narrow ones (tiny: 32) are faster as they are (the copies cost more).
        self.contiguous_weight_grad = contiguous_weight_grad and in_dim >= CONTIGUOUS_WEIGHT_GRAD_MIN_CHANNELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None].permute(0, 3, 1, 2)  # [B, T, C] -> [B, 1, T, C] -> [B, C, 1, T] (channels-last view)
        weight, stride = self.conv.weight.unsqueeze(2), self.conv.stride[0]
        if self.contiguous_weight_grad:
            x = _ConvWeightGradContiguous.apply(x, weight, self.conv.bias, stride)
        else:
            x = F.conv2d(x, weight, self.conv.bias, stride=(1, stride))
        x = x.permute(0, 2, 3, 1)[:, 0]  # [B, C, 1, T'] (channels-last) -> [B, 1, T', C] -> [B, T', C]
        return F.gelu(fp32_layer_norm(x, self.layer_norm))


class ConvFeatureExtractor(nn.Module):
    """Waveform [B, T] -> features [B, C, F] through `layers` = [(channels, kernel, stride), ...]."""

    def __init__(self, layers: list[tuple[int, int, int]], bias: bool = True, grad_mult: float = 1.0,
                 recompute: bool = False, contiguous_weight_grad: bool = False):
        super().__init__()
        blocks, in_dim = [], 1
        for out_dim, kernel, stride in layers:
            blocks.append(ConvBlock(in_dim, out_dim, kernel, stride, bias,
                                    contiguous_weight_grad=contiguous_weight_grad))
            in_dim = out_dim
        self.blocks = nn.ModuleList(blocks)
        self.grad_mult = grad_mult
        self.recompute = recompute
        self.geometry = ConvGeometry.of_layers(layers)
        self.stride, self.receptive_field = self.geometry.stride, self.geometry.receptive_field

    def num_frames(self, num_samples: int) -> int:
        """Frames produced from num_samples samples (block by block, as transformers computes it)."""
        return self.geometry.num_frames(num_samples)

    def sample_range(self, frame_start: int, frame_end: int) -> tuple[int, int]:
        """Samples [start, end) that produce exactly frames [frame_start, frame_end)."""
        return self.geometry.sample_range(frame_start, frame_end)

    def forward(self, waveform: torch.Tensor, frame_start: int = 0, frame_end: int | None = None) -> torch.Tensor:
        """Features [B, C, F] of frames [frame_start, frame_end) of `waveform` [B, T] (the whole utterance by
        default). The memory is time-major ([B, F, C] transposed): `.transpose(1, 2)` gives it contiguous."""
        if frame_end is None:
            frame_end = self.num_frames(waveform.shape[1])
        s0, s1 = self.sample_range(frame_start, frame_end)
        if s1 > waveform.shape[1]:
            raise ValueError(f"waveform of {waveform.shape[1]} samples cannot hold frames up to {frame_end}: "
                             f"{s1} samples needed")
        x = waveform[:, s0:s1, None]  # [B, T_local, 1]
        if self.recompute and self.training and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(self._blocks, x, use_reentrant=False)
        else:
            x = self._blocks(x)
        if self.grad_mult != 1.0 and self.training:
            x = _GradMultiply.apply(x, self.grad_mult)
        return x.transpose(1, 2)  # [B, F, C] -> [B, C, F] (a view: transposing back is free)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
