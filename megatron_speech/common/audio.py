"""The audio every part of the project agrees on: the sample rate, and the geometry of a stack of valid (unpadded)
1-D convolutions that maps samples to frames (the wav2vec 2.0 feature encoder, Wav2Vec2Config.geometry).

Frame i of a conv stack covers samples [stride i, stride i + receptive_field); F frames need exactly
stride (F - 1) + receptive_field samples. The crop rule (data/crop.py), the samplers' budgets, the padding masks,
the FLOP model and the time-sharded encoder all take one ConvGeometry instead of loose stride / receptive-field
integers, so none of them can silently assume the default 320 / 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

SAMPLE_RATE = 16_000
"""Samples per second of every waveform (preprocessing resamples to it)."""


@dataclass(frozen=True)
class ConvGeometry:
    """Sample <-> frame arithmetic of a conv stack; `blocks`: (kernel, stride) per layer, input first.
    Picklable (DataLoader workers get it with their builder)."""

    blocks: tuple[tuple[int, int], ...]
    stride: int = field(init=False)
    """Samples between consecutive frames (product of the strides; 320 for wav2vec 2.0)."""
    receptive_field: int = field(init=False)
    """Samples seen by one frame (400 for wav2vec 2.0)."""

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ValueError("a conv geometry needs at least one (kernel, stride) block")
        rf, jump = 1, 1
        for kernel, stride in self.blocks:
            rf += (kernel - 1) * jump
            jump *= stride
        object.__setattr__(self, "stride", jump)
        object.__setattr__(self, "receptive_field", rf)

    @classmethod
    def of_layers(cls, layers: Sequence[Sequence[int]]) -> ConvGeometry:
        """From a conv layer spec [(channels, kernel, stride), ...] (Wav2Vec2Config.conv_layers)."""
        return cls(tuple((int(kernel), int(stride)) for _, kernel, stride in layers))

    def num_frames(self, num_samples: int) -> int:
        """Frames the stack produces from num_samples samples, (n - receptive_field) // stride + 1 (layer by layer
        the same, floors included); 0 or less when num_samples < receptive_field."""
        return (num_samples - self.receptive_field) // self.stride + 1

    def num_samples(self, num_frames: int) -> int:
        """Smallest sample count that yields exactly num_frames frames: stride (F - 1) + receptive_field."""
        return self.stride * (num_frames - 1) + self.receptive_field

    def block_lengths(self, num_samples: int) -> list[int]:
        """Output length of every block for an input of num_samples samples."""
        lengths, n = [], num_samples
        for kernel, stride in self.blocks:
            n = (n - kernel) // stride + 1
            lengths.append(n)
        return lengths

    def sample_range(self, frame_start: int, frame_end: int) -> tuple[int, int]:
        """Samples [start, end) that frames [frame_start, frame_end) are computed from."""
        return self.stride * frame_start, self.stride * (frame_end - 1) + self.receptive_field
