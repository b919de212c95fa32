"""Shared test inputs: the tiny preset, synthetic micro-batches with real masks and distractors, shards of tonal
audio, and the fine-tuning tests' synthetic corpus.

The synthetic corpus (`synthetic_corpus`): tone "phonemes" p0..p5 (one frequency each), words of 1-3 of them, a
speaker-specific hum and harmonic phase, and a prosody-style arousal proxy (pitch and tempo). Learnable by the tiny
model in a few hundred steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DROPOUTS = ("dropout", "attention_dropout", "feature_proj_dropout", "feature_quantizer_dropout")


def tiny_config(*overrides: str, dropout: float | None = None):
    """The whole tiny Config, with dropouts set to `dropout` when given."""
    from megatron_speech.config import load_config

    extra = [f"model.{k}={dropout}" for k in DROPOUTS] if dropout is not None else []
    return load_config(str(ROOT / "configs/tiny.yaml"), extra + list(overrides))


def synthetic_batch(model_cfg, seed: int, batch_size: int = 3, num_frames: int = 24) -> dict:
    from megatron_speech.common.rng import counter_rng
    from megatron_speech.models.wav2vec2.masker import compute_span_mask, sample_negatives

    rng = counter_rng(seed, 0, 0, 0)
    wave = rng.standard_normal((batch_size, model_cfg.num_samples(num_frames))).astype(np.float32)
    mask = compute_span_mask((batch_size, num_frames), model_cfg.mask_prob, model_cfg.mask_length_frames, rng,
                             min_masks=2)
    neg = sample_negatives(mask, model_cfg.num_negatives, rng)
    return {"waveform": torch.from_numpy(wave), "mask": torch.from_numpy(mask), "negatives": torch.from_numpy(neg)}


def global_batch(model_cfg, step: int, num_micro: int = 2) -> list[dict]:
    """A global batch of `num_micro` micro-batches with different crop lengths, fixed per step."""
    return [synthetic_batch(model_cfg, 1000 * step + i, batch_size=2 + i, num_frames=20 + 4 * i)
            for i in range(num_micro)]


def write_split(prefix: str, split: str, utterances: list[tuple[str, np.ndarray, dict]], per_shard: int = 16) -> None:
    """Shards PREFIX_{split}_NNNNN.{bin,idx} + PREFIX_{split}.manifest.jsonl, as tools/preprocess_audio.py."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rows = []
    for s in range(0, len(utterances), per_shard):
        name = f"{os.path.basename(prefix)}_{split}_{s // per_shard:05d}"
        path = os.path.join(os.path.dirname(prefix), name)
        builder = IndexedDatasetBuilder(path + ".bin", dtype=np.int16)
        for k, (uid, audio, labels) in enumerate(utterances[s:s + per_shard]):
            builder.add_item(torch.from_numpy(audio))
            builder.end_document()
            rows.append({"shard": name, "index": k, "id": uid, "source": f"/in/{uid}.wav", "samples": len(audio),
                         "orig_sample_rate": 16000, "orig_channels": 1, **labels})
        builder.finalize(path + ".idx")
    with open(f"{prefix}_{split}.manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_tone_shards(root, num_train: int, num_valid: int) -> str:
    """Synthetic tonal audio (1.5-4 s of a vibrato tone + noise: learnable structure), train and valid splits of
    shards under `root`; returns the data.prefix."""
    rng = np.random.default_rng(0)

    def utterances(n, tag):
        out = []
        for i in range(n):
            t = np.arange(int(rng.uniform(1.5, 4.0) * 16_000)) / 16_000
            f0 = rng.uniform(100, 300)
            audio = np.sin(2 * np.pi * f0 * t * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)))
            audio = audio * 8000 + rng.standard_normal(len(t)) * 300
            out.append((f"{tag}{i:03d}", audio.astype(np.int16), {"language": "xx"}))
        return out

    prefix = os.path.join(str(root), "tones")
    write_split(prefix, "train", utterances(num_train, "t"))
    write_split(prefix, "valid", utterances(num_valid, "v"))
    return prefix


def output_bytes(path) -> bytes:
    """What a byte-identical rerun must reproduce of an output file: its bytes, or for an utterance index its
    content without the file stamps (mtimes) it records."""
    from megatron_speech.data.index import content_digest

    return content_digest(str(path)).encode() if str(path).endswith(".index") else open(path, "rb").read()


SR = 16_000
FREQS = (300.0, 520.0, 780.0, 1100.0, 1500.0, 2000.0)
LETTERS = "abcdef"
AROUSAL = {"low": (0.8, 1.4), "neutral": (1.0, 1.0), "high": (1.25, 0.7)}  # (pitch factor, duration factor)


def synthetic_utterance(rng: np.random.Generator, speaker: int, arousal: str) -> tuple[np.ndarray, dict]:
    """int16 audio at 16 kHz and its labels: phonemes, text, speaker, arousal_proxy."""
    pitch, tempo = AROUSAL[arousal]
    words = [[int(rng.integers(0, len(FREQS))) for _ in range(int(rng.integers(1, 4)))]
             for _ in range(int(rng.integers(2, 4)))]
    pieces = []
    for w, word in enumerate(words):
        if w:
            pieces.append(np.zeros(int(0.06 * tempo * SR)))
        for k in word:
            n = int(rng.uniform(0.08, 0.11) * tempo * SR)
            t = np.arange(n) / SR
            f = FREQS[k] * pitch
            envelope = np.sin(np.pi * np.arange(n) / n) ** 0.5
            pieces.append(envelope * (np.sin(2 * np.pi * f * t) + 0.4 * np.sin(2 * np.pi * 2 * f * t + speaker)))
    x = np.concatenate([np.zeros(1600), *pieces, np.zeros(1600)])
    x = x + 0.3 * np.sin(2 * np.pi * (70 + 45 * speaker) * np.arange(len(x)) / SR) + 0.02 * rng.standard_normal(len(x))
    audio = (x / np.abs(x).max() * 12000).astype(np.int16)
    labels = {"phonemes": "  ".join(" ".join(f"p{k}" for k in w) for w in words),
              "text": " ".join("".join(LETTERS[k] for k in w) for w in words),
              "speaker": f"spk{speaker}", "arousal_proxy": arousal}
    return audio, labels


def synthetic_utterances(n: int, tag: str, seed: int) -> list[tuple[str, np.ndarray, dict]]:
    rng = np.random.default_rng(seed)
    names = list(AROUSAL)
    return [(f"{tag}{i:03d}", *synthetic_utterance(rng, i % 4, names[(i // 4) % 3])) for i in range(n)]


def synthetic_corpus(root: Path, num_train: int = 48, num_valid: int = 16) -> str:
    """Shards PREFIX_{train,valid} (as tools/preprocess_audio.py writes them); returns PREFIX."""
    prefix = str(root / "syn")
    write_split(prefix, "train", synthetic_utterances(num_train, "t", 0))
    write_split(prefix, "valid", synthetic_utterances(num_valid, "v", 1))
    return prefix


def synthetic_test_files(root: Path, num: int = 12) -> Path:
    """A raw test manifest: 22.05 kHz stereo WAV files + a JSONL of {"path", labels} (decoded like preprocessing)."""
    import soundfile
    import soxr

    audio_dir = root / "test_audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for uid, audio, labels in synthetic_utterances(num, "x", 2):
        up = soxr.resample(audio.astype(np.float32) / 32768.0, SR, 22050)
        soundfile.write(audio_dir / f"{uid}.wav", np.stack([up, up], axis=1), 22050, subtype="PCM_16")
        rows.append({"path": f"test_audio/{uid}.wav", "id": uid, **labels})
    manifest = root / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def padded_pair(cfg):
    """Two normalized utterances (1.1 s and 0.7 s) as one padded batch, and the short one alone."""
    from megatron_speech.data.finetune_data import collate_waveforms, frame_padding_mask

    rng = np.random.default_rng(0)
    long_, short = (rng.standard_normal(n).astype(np.float32) for n in (17_600, 11_200))
    wave, _ = collate_waveforms([long_, short], pad=True)
    frames = cfg.model.num_frames(wave.shape[1])
    wave = torch.from_numpy(wave)
    padding = torch.from_numpy(frame_padding_mask([len(long_), len(short)], frames, cfg.model.geometry))
    alone = torch.from_numpy(short)[None]
    return wave, padding, alone
