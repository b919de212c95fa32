"""The crop rule that ties a micro-batch to the tensor-parallel layout (docs/design.md §3, Groups and batches).

Every utterance of a micro-batch is cropped to exactly T = stride * (F - 1) + receptive_field samples
(ConvGeometry.num_samples), with F the largest multiple of tp for which T fits both the shortest utterance and the
maximum crop: then each TP rank's conv encoder computes F / tp whole frames from its own sample slice, and no
padding is ever needed.
"""

from __future__ import annotations

from megatron_speech.common.audio import ConvGeometry


def crop_num_frames(shortest_samples: int, max_samples: int, tp: int, min_frames: int,
                    geometry: ConvGeometry) -> int:
    """Frames F of a micro-batch whose shortest utterance has `shortest_samples` samples.

    Raises ValueError when fewer than max(min_frames, tp) frames fit: `min_frames` is what masking needs
    (mask_min_masks spans of mask_length frames, plus one unmasked frame).
    """
    frames = max(0, geometry.num_frames(min(shortest_samples, max_samples)))
    frames -= frames % tp
    need = max(min_frames, tp)
    if frames < need:
        need_samples = geometry.num_samples(need + (-need) % tp)
        raise ValueError(
            f"an utterance of {shortest_samples} samples (crop limit {max_samples}) holds {frames} frames at "
            f"tensor_model_parallel_size={tp}; at least {need} frames, a multiple of {tp} "
            f"({need_samples} samples = {geometry.stride} * (F - 1) + {geometry.receptive_field}), are needed: "
            "raise data.min_sample_seconds or filter shorter audio; batches are never padded"
        )
    return frames
