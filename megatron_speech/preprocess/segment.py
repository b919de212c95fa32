"""Cut long recordings into segments at low-energy points (pure numpy; preprocessing's workers call it).

    offsets = cut_offsets(samples, max_samples=30 * 16000, min_samples=8000)   # [0, c1, c2, ...]
    segments = [samples[a:b] for a, b in zip(offsets, offsets[1:] + [len(samples)])]

The rule (VAD-free, as LibriLight's and fairseq's long-file cutting): walking from the start, the next cut is the
quietest point of the window [pos + max - max / 3, pos + max] (a segment ends within its last third of the maximum
length), where "quietest" is the lowest mean energy of the 125 ms (5 frames of 25 ms) around a frame centre: a
pause between words, not a stop closure inside one. The cut lands on that frame's centre. The window is clipped so
that no segment, the last included, is shorter than `min_samples` (which max >= 2 x min makes always possible).
Every sample is in exactly one segment: cut points only, nothing dropped. Deterministic on any CPU: energies are
exact integer sums, ties go to the latest frame (the longer segment).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from megatron_speech.data.audio_io import Kept, Rejected, _audio_hash

FRAME_SAMPLES = 400
"""Energy frame: 25 ms at 16 kHz (frames are laid from the recording's first sample)."""
SMOOTH_FRAMES = 5
"""A frame's score is the mean energy of this many frames centred on it (125 ms)."""
WINDOW_FRACTION = 1 / 3
"""A segment ends within the last third of the maximum length: long segments, with room to find a pause."""
_CHUNK_FRAMES = 4096  # energies computed in chunks: an hour of audio needs no 460 MB int64 copy


def frame_energy(samples: np.ndarray, frame_samples: int = FRAME_SAMPLES) -> np.ndarray:
    """Sum of squares per frame of int16 `samples` [n] → int64 [ceil(n / frame_samples)] (the last frame may be
    partial; its sum covers the samples it has). Exact integers: the same result on every machine."""
    n = len(samples)
    num_full = n // frame_samples
    out = np.empty(-(-n // frame_samples), dtype=np.int64)
    for a in range(0, num_full, _CHUNK_FRAMES):
        b = min(a + _CHUNK_FRAMES, num_full)
        x = samples[a * frame_samples: b * frame_samples].astype(np.int64).reshape(b - a, frame_samples)
        out[a:b] = np.einsum("ij,ij->i", x, x)
    if num_full < len(out):
        tail = samples[num_full * frame_samples:].astype(np.int64)
        out[-1] = int(tail @ tail)
    return out


def _scores(energy: np.ndarray, samples_per_frame: np.ndarray) -> np.ndarray:
    """Mean energy per sample over SMOOTH_FRAMES frames centred on each frame (fewer at the ends) → float64 [F].
    Integer sums below 2^53 divided once: exactly rounded, so deterministic too."""
    half = SMOOTH_FRAMES // 2
    csum_e = np.concatenate([[0], np.cumsum(energy)])
    csum_n = np.concatenate([[0], np.cumsum(samples_per_frame)])
    idx = np.arange(len(energy))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(energy))
    return (csum_e[hi] - csum_e[lo]) / (csum_n[hi] - csum_n[lo])


def cut_offsets(samples: np.ndarray, max_samples: int, min_samples: int,
                frame_samples: int = FRAME_SAMPLES) -> list[int]:
    """Start offsets (in samples, the first is 0) of the segments of int16 `samples` [n].

    max_samples: the longest segment (0 = never cut: [0]); a recording of at most max_samples is one segment.
    min_samples: the shortest segment (the last one too); max_samples must be >= 2 x max(min_samples, 1).
    Raises ValueError when it is not (the lengths could then be impossible to meet).
    """
    n = len(samples)
    if max_samples <= 0 or n <= max_samples:
        return [0]
    min_len = max(min_samples, 1)
    if max_samples < 2 * min_len:
        raise ValueError(f"segments of at most {max_samples} samples cannot all be at least {min_len} long: the "
                         "maximum segment length must be at least twice the minimum utterance length")
    energy = frame_energy(samples, frame_samples)
    per_frame = np.full(len(energy), frame_samples, dtype=np.int64)
    per_frame[-1] = n - frame_samples * (len(energy) - 1)
    scores = _scores(energy, per_frame)
    slack = int(max_samples * WINDOW_FRACTION)
    half = frame_samples // 2
    offsets, pos = [0], 0
    while n - pos > max_samples:
        # With max >= 2 x min and n - pos > max, the window is never empty: lo <= pos + max - ... <= hi.
        hi = min(pos + max_samples, n - min_len)
        lo = min(max(pos + min_len, pos + max_samples - slack), hi)
        first = -(-(lo - half) // frame_samples)  # frames whose centre j * F + F/2 lies in [lo, hi]
        last = (hi - half) // frame_samples
        if first > last:  # a window narrower than a frame (tiny test lengths): its end
            cut = hi
        else:
            window = scores[first:last + 1]
            j = first + len(window) - 1 - int(np.argmin(window[::-1]))  # the latest of equal minima
            cut = j * frame_samples + half
        assert pos + min_len <= cut <= pos + max_samples and n - cut >= min_len, (pos, cut, n)
        offsets.append(cut)
        pos = cut
    return offsets


def decode_and_segment(process_fn: Callable[[str, int], Kept | Rejected], path: str, min_samples: int,
                       max_segment_samples: int) -> Kept | Rejected:
    """process_fn(path, min_samples) (decode_file), then, when the result is longer than max_segment_samples (> 0),
    its cut points and per-segment hashes in Kept.segments (segment.py's rule). Runs in the workers: an hour of
    audio costs ~0.2 s of energy and hashing there, which the single writing process could not spare."""
    result = process_fn(path, min_samples)
    if isinstance(result, Kept) and 0 < max_segment_samples < len(result.samples):
        offsets = cut_offsets(result.samples, max_segment_samples, min_samples)
        ends = offsets[1:] + [len(result.samples)]
        result.segments = [(a, _audio_hash(result.samples[a:b])) for a, b in zip(offsets, ends, strict=True)]
    return result
