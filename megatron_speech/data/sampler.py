"""Length-bucketed dynamic batches, language-temperature mixing, and their deterministic, resumable assignment to
(dp_rank, micro_step) slots (docs/design.md §3, Groups and batches).

One epoch, built identically on every rank from (seed, epoch):
  1. mixing (XLSR): each group l (a language, or a prefix) gets sampling weight p_l ~ (h_l / H)^alpha over its
     hours h_l (or data.weights), and the epoch holds round(n_l * p_l H / h_l) of its n_l utterances: whole
     passes over the group plus a random subset without replacement. The epoch keeps the corpus' total hours;
     with natural weights (alpha = 1, or a single group) that is every utterance exactly once.
  2. bucketing (fairseq's wav2vec ordering): sort by min(length, max crop), ties in random order, then cut greedy
     batches whose sum of cropped lengths stays within max_tokens (cropped length = the crop rule applied to the
     batch's shortest utterance); shuffle the batch order.
The budget is checked with the crop at tp = 1, the longest the rule gives (a multiple of tp frames is never
longer), so the micro-batch sequence does not depend on the parallel layout: a run resumed at another TP, DP or
micro-batch count continues exactly where it stopped.

The epochs concatenate into one stream of micro-batches; global batch g is stream[g G, (g + 1) G) with
G = dp_size * num_micro_batches (a global batch may straddle two epochs: nothing is dropped), and slot
(dp_rank, micro_step) of it is stream[g G + micro_step * dp_size + dp_rank]. State: the global batches consumed
and the stream position (epoch, micro-batches of it consumed) — nothing random, since everything above is a pure
function of (seed, epoch).
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_speech.common.audio import SAMPLE_RATE, ConvGeometry
from megatron_speech.common.rng import EPOCH_STREAM, counter_rng
from megatron_speech.data.crop import crop_num_frames

logger = logging.getLogger(__name__)


def mixing_weights(hours: Mapping[str, float], alpha: float,
                   weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Sampling probability per group: p_l ~ (h_l / H)^alpha (XLSR; alpha = 1: natural, alpha = 0: uniform), or
    `weights` normalized when given. Groups with no audio get 0."""
    if weights is not None:
        raw = {name: float(weights[name]) for name in hours}
    else:
        total = sum(hours.values())
        raw = {name: (h / total) ** alpha if h > 0 else 0.0 for name, h in hours.items()}
    norm = sum(raw.values())
    if norm <= 0:
        raise ValueError(f"mixing weights {raw} sum to 0: give at least one group with audio a positive weight")
    return {name: w / norm for name, w in raw.items()}


@dataclass(frozen=True)
class Position:
    """Where the stream stands: global batches consumed, and the next micro-batch (epoch, index in epoch)."""

    global_batches: int = 0
    epoch: int = 0
    offset: int = 0


@dataclass(frozen=True)
class Slot:
    """One micro-batch of one DP rank: its counter key (step, micro_step, dp_rank), its utterances, and the
    stream position after its global batch (what the loader reports once the whole global batch is consumed)."""

    step: int
    micro_step: int
    dp_rank: int
    epoch: int
    indices: np.ndarray
    after: Position


class EpochBatches(Sequence):
    """The micro-batches of one epoch, stored compactly: the epoch's utterances in bucketed order, the batch
    bounds over them, and the (shuffled) batch order. batches[k] is an index array (a view); a slice is a list."""

    def __init__(self, items: np.ndarray, bounds: np.ndarray, order: np.ndarray) -> None:
        self.items, self.bounds, self.order = items, bounds, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        b = int(self.order[k])
        return self.items[self.bounds[b]:self.bounds[b + 1]]


def greedy_bounds(crops: np.ndarray, max_tokens: int) -> np.ndarray:
    """Batch bounds [0, ..., len(crops)] of fairseq's greedy cut over non-increasing `crops`: a batch takes the next
    utterance while (count + 1) x its crop (the batch's shortest) stays within max_tokens.

    Vectorized per run of equal crops (a few hundred distinct values, not one Python step per utterance): within a
    run of crop c a batch holds m = max_tokens // c utterances; only the batch open at a run's start, carried over
    from longer crops, is special (it may take m - count more)."""
    n = len(crops)
    if n == 0:
        return np.zeros(1, np.int64)
    starts = np.flatnonzero(np.diff(crops)) + 1
    run_starts = np.concatenate([[0], starts])
    run_ends = np.concatenate([starts, [n]])
    pieces: list[np.ndarray] = [np.zeros(1, np.int64)]
    carry = 0  # utterances in the batch open at the current position
    for s, e, c in zip(run_starts.tolist(), run_ends.tolist(), crops[run_starts].tolist(), strict=True):
        m = max_tokens // c
        pos = s
        if carry:
            take = min(max(m - carry, 0), e - s)
            pos, carry = s + take, carry + take
            if pos < e:  # the open batch is full for this crop: it ends here
                pieces.append(np.array([pos], np.int64))
                carry = 0
        full, rest = divmod(e - pos, m)
        if rest == 0 and full:  # the last full batch stays open: a shorter crop may still fit
            full, rest = full - 1, m
        pieces.append(pos + m * np.arange(1, full + 1, dtype=np.int64))
        carry += rest
    pieces.append(np.array([n], np.int64))
    return np.concatenate(pieces)


class DynamicBatchSampler:
    """Micro-batches of this DP rank, num_micro_batches per global step (see the module docstring).

    lengths: samples per utterance [N] (any integer array; a memory-mapped one is not copied); groups: group id
    per utterance [N] (0..len(group_names)-1; -1 = not sampled, e.g. too short); group_weights: explicit sampling
    weight per group (data.weights), None = temperature alpha over hours; max_tokens: budget in samples per
    micro-batch; max_samples: longest crop, in samples; shuffle=False keeps ties and batches in length order;
    geometry: the conv encoder's (the crop rule).
    Micro-batches hold indices into `lengths` (int32 below 2^31 utterances: half the memory per epoch).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        max_tokens: int,
        max_samples: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_micro_batches: int = 1,
        groups: np.ndarray | None = None,
        group_names: Sequence[str] = ("all",),
        group_weights: Sequence[float] | None = None,
        alpha: float = 1.0,
        shuffle: bool = True,
        *,
        geometry: ConvGeometry,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if num_micro_batches < 1:
            raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")
        self.lengths = np.asarray(lengths)
        if not np.issubdtype(self.lengths.dtype, np.integer):
            self.lengths = self.lengths.astype(np.int64)
        self.max_tokens, self.max_samples, self.seed = int(max_tokens), int(max_samples), int(seed)
        self.dp_rank, self.dp_size, self.num_micro_batches = dp_rank, dp_size, num_micro_batches
        self.shuffle = shuffle
        self.geometry = geometry
        self.group_names = list(group_names)
        self._index_dtype = np.int32 if len(self.lengths) < 2**31 else np.int64

        # Members of each group, ascending, as views into one array (a stable argsort puts the -1s first).
        num_groups = len(self.group_names)
        if groups is None:
            members = np.arange(len(self.lengths), dtype=self._index_dtype)
            counts = np.array([len(members)], np.int64)
        else:
            groups = np.asarray(groups)
            if len(groups) and (int(groups.max()) >= num_groups or int(groups.min()) < -1):
                raise ValueError(f"group ids must be in [-1, {num_groups}) for group_names {self.group_names}")
            order = np.argsort(groups, kind="stable")
            counts = np.bincount(groups[groups >= 0], minlength=num_groups).astype(np.int64)
            members = order[len(groups) - int(counts.sum()):].astype(self._index_dtype)
            del order
        bounds = np.concatenate([[0], np.cumsum(counts)])
        self._members = [members[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        samples = [int(self.lengths[m].sum(dtype=np.int64)) for m in self._members]
        self.num_utterances = len(members)
        self.num_samples = sum(samples)
        if self.num_utterances:
            shortest = min(int(self.lengths[m].min()) for m in self._members if len(m))
            longest = max(int(self.lengths[m].max()) for m in self._members if len(m))
            crop_num_frames(shortest, self.max_samples, 1, 1, geometry)  # raises if too short
            most = geometry.num_samples(crop_num_frames(longest, self.max_samples, 1, 1, geometry))
            if most > self.max_tokens:
                raise ValueError(f"data.max_tokens={self.max_tokens} is smaller than one cropped utterance "
                                 f"({most} samples): raise it or lower data.max_sample_seconds")

        # Mixing: per-group hours, weights and utterances per epoch.
        hours = {name: n / SAMPLE_RATE / 3600 for name, n in zip(self.group_names, samples, strict=True)}
        explicit = None if group_weights is None else dict(zip(self.group_names, group_weights, strict=True))
        self.hours = hours
        self.weights = mixing_weights(hours, alpha, explicit)
        total_hours = sum(hours.values())
        self.per_epoch = {}
        for name, members in zip(self.group_names, self._members, strict=True):
            ratio = self.weights[name] * total_hours / hours[name] if hours[name] > 0 else 0.0
            self.per_epoch[name] = round(len(members) * ratio)
        if sum(self.per_epoch.values()) == 0:
            raise ValueError(f"the sampling weights {self.weights} leave no utterance in an epoch")
        self.position = Position()
        self._epochs: OrderedDict[int, EpochBatches] = OrderedDict()

    def cropped(self, indices: np.ndarray) -> np.ndarray:
        """The crop rule at tp = 1 of each utterance as a batch's shortest, in samples (vectorized)."""
        limited = np.minimum(self.lengths[indices], self.max_samples)  # < 2^31: int32 arithmetic is exact
        stride, field = self.geometry.stride, self.geometry.receptive_field
        return stride * ((limited - field) // stride) + field

    # --- epochs

    def epoch_items(self, epoch: int) -> np.ndarray:
        """Utterance indices of one epoch after mixing (unordered; an upsampled group repeats utterances)."""
        rng = counter_rng(self.seed, epoch, 0, 0, stream=EPOCH_STREAM)
        parts = []
        for name, members in zip(self.group_names, self._members, strict=True):
            want = self.per_epoch[name]
            passes, rest = divmod(want, len(members)) if len(members) else (0, 0)
            parts += [members] * passes
            if rest:
                parts.append(np.sort(rng.choice(members, size=rest, replace=False)))
        return np.concatenate(parts) if parts else np.zeros(0, self._index_dtype)

    def epoch_batches(self, epoch: int) -> EpochBatches:
        """Every micro-batch of one epoch (all DP ranks), in stream order; each an array of utterance indices."""
        cached = self._epochs.get(epoch)
        if cached is not None:
            return cached
        items = self.epoch_items(epoch)
        rng = counter_rng(self.seed, epoch, 1, 0, stream=EPOCH_STREAM)
        ties = rng.random(len(items)) if self.shuffle else np.arange(len(items))
        # Longest first (the crop-limited length descending), ties random.
        key = (self.max_samples - np.minimum(self.lengths[items], self.max_samples)).astype(np.int32)
        items = items[np.lexsort((ties, key))]
        del ties, key
        bounds = greedy_bounds(self.cropped(items), self.max_tokens).astype(self._index_dtype)
        num = len(bounds) - 1
        order = (rng.permutation(num) if self.shuffle else np.arange(num)).astype(self._index_dtype)
        batches = EpochBatches(items, bounds, order)
        self._epochs[epoch] = batches
        while len(self._epochs) > 2:  # the current epoch and the next (a global batch may straddle them)
            self._epochs.popitem(last=False)
        return batches

    # --- the stream

    @property
    def micro_batches_per_global(self) -> int:
        """G = dp_size * num_micro_batches."""
        return self.dp_size * self.num_micro_batches

    def global_batches(self, start: Position | None = None) -> Iterator[tuple[Position, list[tuple[int, np.ndarray]]]]:
        """Endless (position, [(epoch, micro-batch)] * G) from `start` (default: the current position)."""
        pos = self.position if start is None else start
        g, epoch, offset = pos.global_batches, pos.epoch, pos.offset
        size = self.micro_batches_per_global
        while True:
            taken: list[tuple[int, np.ndarray]] = []
            while len(taken) < size:
                batches = self.epoch_batches(epoch)
                if offset >= len(batches):
                    epoch, offset = epoch + 1, 0
                    continue
                n = min(size - len(taken), len(batches) - offset)
                taken += [(epoch, b) for b in batches[offset:offset + n]]
                offset += n
            if offset >= len(self.epoch_batches(epoch)):
                epoch, offset = epoch + 1, 0
            g += 1
            yield Position(g, epoch, offset), taken

    def slots(self, start: Position | None = None) -> Iterator[Slot]:
        """Endless micro-batches of this DP rank, micro_step 0..num_micro_batches-1 of each global step."""
        pos = self.position if start is None else start
        step = pos.global_batches
        for after, taken in self.global_batches(pos):
            for m in range(self.num_micro_batches):
                epoch, indices = taken[m * self.dp_size + self.dp_rank]
                yield Slot(step, m, self.dp_rank, epoch, indices, after)
            step += 1

    # --- state

    def state_dict(self) -> dict[str, Any]:
        """The position (plain ints): global batches consumed, epoch, micro-batches of the epoch consumed; plus
        what the position was measured against, to detect a changed corpus on load."""
        p = self.position
        return {"global_batches": p.global_batches, "epoch": p.epoch, "epoch_offset": p.offset,
                "micro_batches_per_global": self.micro_batches_per_global,
                "num_utterances": self.num_utterances, "num_samples": self.num_samples}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position from state_dict(). Another layout (TP, DP, micro-batches) continues at the same
        micro-batch; another corpus cannot continue exactly: it warns and keeps the epoch and offset."""
        if (state.get("num_utterances"), state.get("num_samples")) != (self.num_utterances, self.num_samples):
            warnings.warn(f"data sampler state was saved over {state.get('num_utterances')} utterances / "
                          f"{state.get('num_samples')} samples, this corpus has {self.num_utterances} / "
                          f"{self.num_samples}: batches after the resume differ from an uninterrupted run",
                          stacklevel=2)
        if state.get("micro_batches_per_global") != self.micro_batches_per_global:
            logger.info("data: resuming at %d micro-batches per global batch (saved at %s) from epoch %d, "
                        "micro-batch %d", self.micro_batches_per_global, state.get("micro_batches_per_global"),
                        state["epoch"], state["epoch_offset"])
        self.position = Position(int(state["global_batches"]), int(state["epoch"]), int(state["epoch_offset"]))

    def mixing_stats(self) -> dict[str, float]:
        """Per group: hours, sampling weight, natural weight (share of hours), utterances per epoch; flat keys
        `data/<group>/<what>` for metrics."""
        total = sum(self.hours.values())
        out: dict[str, float] = {}
        for name in self.group_names:
            out[f"data/{name}/hours"] = self.hours[name]
            out[f"data/{name}/weight"] = self.weights[name]
            out[f"data/{name}/natural_weight"] = self.hours[name] / total if total else 0.0
            out[f"data/{name}/utterances_per_epoch"] = float(self.per_epoch[name])
        return out
