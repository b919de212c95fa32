"""The crop rule that ties a micro-batch to the tensor-parallel layout (DESIGN §3, Groups and batches).

Every utterance of a micro-batch is cropped to exactly T = stride * (F - 1) + receptive_field samples, with F the
largest multiple of tp for which T fits both the shortest utterance and the maximum crop: then each TP rank's
conv encoder computes F / tp whole frames from its own sample slice, and no padding is ever needed.
"""

from __future__ import annotations


def crop_num_frames(shortest_samples: int, max_samples: int, tp: int, min_frames: int,
                    stride: int = 320, receptive_field: int = 400) -> int:
    """Frames F of a micro-batch whose shortest utterance has `shortest_samples` samples.

    Raises ValueError when fewer than max(min_frames, tp) frames fit: `min_frames` is what masking needs
    (mask_min_masks spans of mask_length frames, plus one unmasked frame).
    """
    limit = min(shortest_samples, max_samples)
    frames = (limit - receptive_field) // stride + 1 if limit >= receptive_field else 0
    frames -= frames % tp
    need = max(min_frames, tp)
    if frames < need:
        need_samples = stride * (need + (-need) % tp - 1) + receptive_field
        raise ValueError(
            f"an utterance of {shortest_samples} samples (crop limit {max_samples}) holds {frames} frames at "
            f"tensor_model_parallel_size={tp}; at least {need} frames, a multiple of {tp} "
            f"({need_samples} samples = {stride} * (F - 1) + {receptive_field}), are needed: raise "
            "data.min_sample_seconds or filter shorter audio; batches are never padded"
        )
    return frames


def crop_num_samples(num_frames: int, stride: int = 320, receptive_field: int = 400) -> int:
    """Samples of a crop of num_frames frames: frame i covers samples [stride i, stride i + receptive_field)."""
    return stride * (num_frames - 1) + receptive_field
