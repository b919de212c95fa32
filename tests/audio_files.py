"""Test helpers for audio files and the preprocessing tool's outputs: synthetic signals written as WAV/FLAC, the
manifests (JSONL) and shards it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from tests.fixtures import ROOT

TOOL = ROOT / "tools" / "preprocess_audio.py"


def tone(seconds: float, rate: int, channels: int, seed: int, amplitude: float = 0.3) -> np.ndarray:
    """A distinct, band-limited test signal [frames, channels] float32 (a chirp plus faint noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 + 37 * seed
    x = np.stack([np.sin(2 * np.pi * (f0 * (c + 1)) * t + 0.5 * t * t * 200) for c in range(channels)], axis=1)
    x = amplitude * x + 0.01 * rng.standard_normal(x.shape)
    return x.astype(np.float32)


def write_audio(path: Path, x: np.ndarray, rate: int, fmt: str, subtype: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, rate, format=fmt, subtype=subtype)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_shard(folder: Path, name: str):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(folder / name))
RATE = 16_000


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """float32 [n] at 16 kHz: noise bursts of 0.5-4 s under a syllable-rate envelope, separated by 0.15-1 s pauses
    of faint noise (no digital silence: a cut must find the pause by its energy, not by zeros)."""
    rng = np.random.default_rng(seed)
    num_frames = int(seconds * 100)  # the envelope at 10 ms resolution
    env = np.zeros(num_frames, np.float32)
    pos = int(rng.integers(0, 50))
    while pos < num_frames:
        burst = int(rng.integers(50, 400))
        t = np.arange(min(burst, num_frames - pos)) / 100
        env[pos:pos + len(t)] = np.sqrt(np.abs(np.sin(2 * np.pi * rng.uniform(3, 5) * t)))
        pos += burst + int(rng.integers(15, 100))
    noise = rng.standard_normal(num_frames * 160, dtype=np.float32)
    return (noise * (0.002 + 0.2 * np.repeat(env, 160))).clip(-1, 1)


def write_flac(path: Path, seconds: float, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), speechlike(seconds, seed), RATE, format="FLAC", subtype="PCM_16")
    return path
