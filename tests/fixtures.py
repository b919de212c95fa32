"""Shared test inputs: the tiny preset and synthetic micro-batches with real masks and distractors."""

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
