"""Decoding any audio file soundfile reads into 16 kHz mono int16-range float32, or a reason to reject it
(REJECT_REASONS). Used at run time (fine-tuning and evaluation on raw files, embed) and by the shard writer
(megatron_speech/preprocess/), which calls decode_file in its worker processes."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import soxr

from megatron_speech.common.audio import SAMPLE_RATE

RESAMPLE_QUALITY = "HQ"
REJECT_REASONS = {
    "unreadable": "soundfile cannot open it (not audio, an unsupported format or a broken header)",
    "empty": "no audio frames (a 0-byte file, or a header with no data)",
    "truncated": "the header declares more audio than the file holds",
    "decode_error": "opened, but decoding failed part-way",
    "nan_or_inf": "a float file with NaN or infinite samples",
    "too_short": "shorter than min_seconds at 16 kHz",
    "silent": "peak-to-peak <= 2 LSB at 16 bit: digital silence or a constant",
    "duplicate": "the same 16 kHz int16 audio as an utterance kept earlier",
    "duplicate_id": "its id was already used by an earlier input",
    "missing": "a manifest entry whose file does not exist or is not a regular file",
    "crashed": "decoding it killed the worker process twice (a decoder crash, or out of memory)",
}
_BLOCK_FRAMES = 1 << 17  # decode and resample in blocks: memory stays bounded for hour-long files
_FULL_SCALE = 0.999
_MPEG_FRAME = 1152


# --------------------------------------------------------------------------------------------------- decoding


@dataclass(slots=True)
class Kept:
    """A decoded utterance: int16 samples at 16 kHz and what the report needs.

    segments: when the input was cut, (offset, audio_hash) per segment, in order (the samples from each offset to
    the next, or to the end); empty = one utterance, whose hash is audio_hash."""

    samples: np.ndarray
    orig_sample_rate: int
    orig_channels: int
    orig_seconds: float
    warnings: list[str]
    audio_hash: str
    segments: list[tuple[int, str]] = field(default_factory=list)


@dataclass(slots=True)
class Rejected:
    """Why an input is not kept; orig_seconds is the audio decoded before deciding (for the speed report)."""

    reason: str
    detail: str
    orig_seconds: float = 0.0


# libsndfile's log names a chunk whose declared size the file cannot hold: WAV "data", AIFF "SSND", W64 "riff".
_CHUNK_SHORT = re.compile(r"^\s*(data|SSND|riff) : (\d+) \(should be (\d+)\)", re.M)
# RF64 keeps the data size in its ds64 chunk (its frame count field is optional, and often wrong: scipy's files).
_RF64_DATA_SIZE = re.compile(r"^\s*Data size : (\d+)$", re.M)
_BLOCK_ALIGN = re.compile(r"^\s*Block Align\s*: (\d+)$", re.M)
_STREAMED_SIZES = (0xFFFFFFFF, 0x7FFFFFFF)  # written by streaming writers (ffmpeg to a pipe): "size unknown"


def _header_truncation(log: str, num_frames: int) -> str | None:
    """What libsndfile's log says is missing (`num_frames`: the frames it found), or None."""
    for m in _CHUNK_SHORT.finditer(log):
        declared, held = int(m[2]), int(m[3])
        if held < declared and declared not in _STREAMED_SIZES:
            return f"its '{m[1]}' chunk declares {declared} bytes, the file holds {held}"
    size, align = _RF64_DATA_SIZE.search(log), _BLOCK_ALIGN.search(log)
    if size and align:
        declared, held = int(size[1]), num_frames * int(align[1])
        if declared - held >= int(align[1]) and declared < 0xFFFFFFFFFFFFFFFF:
            return f"its ds64 chunk declares {declared} bytes of data, the file holds {held}"
    return None


def _message(e: BaseException) -> str:
    return getattr(e, "error_string", None) or str(e) or type(e).__name__


def decode_file(path: str, min_samples: int) -> Kept | Rejected:
    """Decode `path`, mix to mono, resample to 16 kHz, round to int16 and check it (runs in the workers).

    Returns Kept (int16 samples [n] at 16 kHz) or Rejected (a REJECT_REASONS key and a detail for the report).
    `min_samples` (at 16 kHz) makes shorter results "too_short"; a result must have at least one sample.
    """
    try:
        f = sf.SoundFile(path)
    except (RuntimeError, OSError, ValueError, TypeError) as e:
        size = os.path.getsize(path) if os.path.exists(path) else -1
        if size == 0:
            return Rejected("empty", "a 0-byte file")
        return Rejected("unreadable", f"libsndfile {sf.__libsndfile_version__}: {_message(e)} ({size} bytes)")
    with f:
        sr, channels, declared = f.samplerate, f.channels, f.frames
        fmt = f"{f.format}/{f.subtype}"
        is_mp3 = f.format == "MP3"
        short = _header_truncation(f.extra_info, declared)
        if short:
            return Rejected("truncated", f"{fmt}: {short}")
        if declared <= 0:
            return Rejected("empty", f"{fmt}: no audio frames in its {os.path.getsize(path)} bytes")
        resampler = None if sr == SAMPLE_RATE else soxr.ResampleStream(
            sr, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        pieces: list[np.ndarray] = []
        num_read, clipped = 0, False
        try:
            while num_read < declared:
                block = f.read(min(_BLOCK_FRAMES, declared - num_read), dtype="float32", always_2d=True)  # [n, C]
                if len(block) == 0:
                    break
                finite = np.isfinite(block)
                if not finite.all():
                    bad = int(np.argmin(finite.all(axis=1)))
                    return Rejected("nan_or_inf", f"{fmt}: a NaN or infinite sample at frame {num_read + bad}",
                                    (num_read + bad) / sr)
                clipped = clipped or _has_clipping(block)
                mono = _mix_to_mono(block)  # [n]
                num_read += len(block)
                pieces.append(resampler.resample_chunk(mono) if resampler else mono)
            if resampler:
                pieces.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        except (RuntimeError, ValueError, MemoryError, OSError) as e:
            return Rejected("decode_error", f"{fmt}: decoding stopped after {num_read} of {declared} frames: "
                            f"{_message(e)}", num_read / sr)
    seconds = num_read / sr
    missing = declared - num_read
    tolerated = declared // 100 + 2 * _MPEG_FRAME if is_mp3 else 0  # MP3 lengths are estimates
    if missing > tolerated:
        return Rejected("truncated", f"{fmt}: the header declares {declared} frames, {num_read} decode", seconds)
    scaled = np.rint(np.concatenate(pieces) * np.float32(32768.0))
    overshoot = bool(np.any(np.abs(scaled) > 32768.0))
    samples = np.clip(scaled, -32768, 32767).astype(np.int16)  # [n] at 16 kHz
    if len(samples) < max(min_samples, 1):
        return Rejected("too_short", f"{len(samples) / SAMPLE_RATE:.3f} s at 16 kHz (minimum "
                        f"{min_samples / SAMPLE_RATE:g} s)", seconds)
    peak_to_peak = int(samples.max()) - int(samples.min())
    if peak_to_peak <= 2:
        return Rejected("silent", f"{fmt}: peak-to-peak {peak_to_peak} LSB at 16 bit over "
                        f"{len(samples) / SAMPLE_RATE:.2f} s", seconds)
    notes = (["clipped"] if clipped else []) + (["overshoot"] if overshoot else [])
    return Kept(samples, sr, channels, seconds, notes, _audio_hash(samples))


def _audio_hash(samples: np.ndarray) -> str:
    """blake2b-128 hex of int16 [n] samples as little-endian bytes (the manifests' audio_hash)."""
    return hashlib.blake2b(np.ascontiguousarray(samples, dtype="<i2").data, digest_size=16).hexdigest()


def _mix_to_mono(block: np.ndarray) -> np.ndarray:
    """Mean over channels: [n, C] → [n] float32. Summed channel by channel: block.mean(axis=1) up to float32
    rounding (bit-equal up to 5 channels here) at a twentieth of its cost on a short axis."""
    mono = np.array(block[:, 0])
    for c in range(1, block.shape[1]):
        mono += block[:, c]
    if block.shape[1] > 1:
        mono /= np.float32(block.shape[1])
    return mono


def _has_clipping(block: np.ndarray) -> bool:
    """True when a channel holds >= 3 consecutive samples at >= 99.9% of full scale. block: [n, C] float."""
    if len(block) < 3 or float(np.abs(block).max()) < _FULL_SCALE:
        return False
    hot = np.abs(block) >= _FULL_SCALE
    return bool((hot[:-2] & hot[1:-1] & hot[2:]).any())
