"""Span masking (time and channel) and distractor sampling, with fairseq's semantics.

Everything here is drawn on the host from the generator the caller passes, a counter-based one keyed by (seed,
step, micro_step, dp_rank, stream) (common/rng.py): identical on every TP rank of a DP group without communication,
different across DP ranks, and with nothing to save for an exact resume (docs/design.md §3, Randomness). Masks are
decided on the full utterance; TP ranks slice.
"""

from __future__ import annotations

import numpy as np


def compute_span_mask(
    shape: tuple[int, int],
    mask_prob: float,
    mask_length: int,
    rng: np.random.Generator,
    min_masks: int = 0,
    lengths: np.ndarray | None = None,
    require_same_masks: bool = True,
) -> np.ndarray:
    """fairseq's compute_mask_indices (static span lengths, overlap allowed): a bool mask [B, T].

    Each row gets int(mask_prob * len / mask_length + U[0,1)) spans (at least `min_masks`) starting at distinct
    positions; spans are clipped at the row's length, so padded positions (`lengths`) are never masked. With
    `require_same_masks`, every row keeps the same number of masked positions (the batch minimum, chosen at
    random), so the count of masked frames is the same in every utterance.
    """
    batch, total = shape
    mask = np.zeros(shape, dtype=bool)
    if mask_prob <= 0 or total == 0:
        return mask
    chosen = []
    for b in range(batch):
        size = int(lengths[b]) if lengths is not None else total
        num_mask = max(min_masks, int(mask_prob * size / float(mask_length) + rng.random()))
        # fairseq: when the row is short, narrow the range of starts (not the spans) so num_mask distinct
        # starts exist; spans running past the row's end are clipped below.
        min_len = mask_length if size - mask_length > num_mask else size - num_mask - 1
        starts = rng.choice(size - min_len, num_mask, replace=False)
        idx = (starts[:, None] + np.arange(mask_length)[None, :]).reshape(-1)
        chosen.append(np.unique(idx[idx < size]))
    keep = min(len(c) for c in chosen)
    for b, idx in enumerate(chosen):
        if require_same_masks and len(idx) > keep:
            idx = rng.choice(idx, keep, replace=False)
        mask[b, idx] = True
    return mask


def sample_negatives(mask: np.ndarray, num_negatives: int, rng: np.random.Generator) -> np.ndarray:
    """Distractor frame indices [B, T, K] for every masked frame, drawn uniformly from the *other* masked frames
    of the same utterance (fairseq / transformers' scheme). Rows of unmasked frames are 0 and never read.
    An utterance with a single masked frame gets itself as every distractor (the loss masks those out).
    """
    batch, total = mask.shape
    out = np.zeros((batch, total, num_negatives), dtype=np.int64)
    for b in range(batch):
        frames = np.flatnonzero(mask[b])
        m = len(frames)
        if m == 0:
            continue
        if m == 1:
            out[b, frames] = frames[0]
            continue
        # draw from m - 1 candidates, then skip over the positive itself to keep the distribution uniform
        draw = rng.integers(0, m - 1, size=(m, num_negatives))
        draw[draw >= np.arange(m)[:, None]] += 1
        out[b, frames] = frames[draw]
    return out
