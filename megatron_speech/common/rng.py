"""The counter-based generator behind every random choice of the data path, and the one table of its streams.

A generator's whole state is its key (seed, step, micro_step, dp_rank, stream) (docs/design.md §3, Randomness): the same
on every TP rank of a DP group without communication, different across DP ranks, the same in any DataLoader worker, and
nothing to save for an exact resume. Each use owns a stream id below; the values are part of the checkpoint contract (a
resumed run must draw what the uninterrupted one would), so they never change.
"""

from __future__ import annotations

import numpy as np

# --- streams (the key's last word) --------------------------------------------------------------------------
MASK_STREAM = 0
"""A micro-batch's time mask and distractors (pre-training), or its time mask (fine-tuning)."""
CHANNEL_STREAM = 1
"""A micro-batch's channel mask."""
UTTERANCE_STREAM = 2
"""Utterance b of a micro-batch (crop offset, speed, noise) uses UTTERANCE_STREAM + b."""
EPOCH_STREAM = 0x45504F43
""""EPOC": data/sampler.py's per-epoch draws, keyed (seed, epoch, 0, 0) for mixing, (seed, epoch, 1, 0) for the
bucketing ties and batch order."""
PADDED_BATCH_STREAM = 0x46544E42
""""FTNB": fine-tuning's padded batches (data/finetune_data.py), keyed (seed, epoch, 1, 0): ties and batch order."""
LAYERDROP_STREAM = 0x4C445250
""""LDRP": a micro-batch's LayerDrop skips (models/wav2vec2/layerdrop.py), keyed (seed, step, micro_step, 0): every DP
rank skips the same layers. Not UTTERANCE_STREAM + 1: that range belongs to the utterances of a batch."""

# --- keys -----------------------------------------------------------------------------------------------------
EVAL_MICRO_STEP = 0xFFFF
"""micro_step of evaluation batches: their keys (seed, k, 0xFFFF, dp_rank) never collide with training's."""


def counter_rng(seed: int, step: int, micro_step: int, dp_rank: int, stream: int = MASK_STREAM) -> np.random.Generator:
    """A Philox generator whose whole state is its key: (seed, step, micro_step, dp_rank, stream)."""
    key = np.array([seed & 0xFFFFFFFF, step & 0xFFFFFFFF,
                    ((micro_step & 0xFFFF) << 16) | (dp_rank & 0xFFFF), stream & 0xFFFFFFFF], dtype=np.uint32)
    return np.random.Generator(np.random.Philox(key=key.view(np.uint64)))
