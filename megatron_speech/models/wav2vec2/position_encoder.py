"""Convolutional relative positional embedding (wav2vec 2.0): grouped Conv1d with weight norm + GELU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvPositionEncoder(nn.Module):
    """x [B, T, H] -> GELU(weight-normed grouped conv over time) [B, T, H].

    Padding k // 2 on both sides and, for an even kernel, the last output frame dropped: output frame t sees
    input frames [t - k/2, t + k/2). Weight norm over dim 2 (fairseq / transformers): g has shape [1, 1, k].
    The parameters are plain `weight_g` / `weight_v` (not a torch parametrization) so checkpoint keys stay
    stable and the HF key map is a rename.
    """

    def __init__(self, hidden_size: int, kernel: int, groups: int):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        v = torch.empty(hidden_size, hidden_size // groups, kernel)
        nn.init.normal_(v, mean=0.0, std=math.sqrt(4.0 / (kernel * hidden_size)))  # fairseq's init
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch._weight_norm(self.weight_v, self.weight_g, 2)
        y = F.conv1d(x.transpose(1, 2), weight, self.bias, padding=self.kernel // 2, groups=self.groups)  # [B, H, T']
        if self.kernel % 2 == 0:
            y = y[:, :, :-1]
        return F.gelu(y).transpose(1, 2)  # [B, H, T] -> [B, T, H]
