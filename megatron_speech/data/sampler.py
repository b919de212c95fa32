"""Length-bucketed dynamic batches, language-temperature mixing, and their deterministic, resumable assignment to
(dp_rank, micro_step) slots (DESIGN §3, Groups and batches).

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

from megatron_speech.data.crop import crop_num_frames, crop_num_samples
from megatron_speech.models.wav2vec2.config import SAMPLE_RATE
from megatron_speech.models.wav2vec2.masker import counter_rng

logger = logging.getLogger(__name__)

_EPOCH_STREAM = 0x45504F43  # "EPOC": counter_rng stream of the per-epoch shuffles (masks use 0, 1, 2...)


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


class DynamicBatchSampler:
    """Micro-batches of this DP rank, num_micro_batches per global step (see the module docstring).

    lengths: samples per utterance [N]; groups: group id per utterance [N] (0..len(group_names)-1);
    group_weights: explicit sampling weight per group (data.weights), None = temperature alpha over hours;
    max_tokens: budget in samples per micro-batch; max_samples: longest crop, in samples; shuffle=False keeps
    ties and batches in length order; stride / receptive_field: the conv encoder's, in samples (the crop rule).
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
        stride: int = 320,
        receptive_field: int = 400,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if num_micro_batches < 1:
            raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_tokens, self.max_samples, self.seed = int(max_tokens), int(max_samples), int(seed)
        self.dp_rank, self.dp_size, self.num_micro_batches = dp_rank, dp_size, num_micro_batches
        self.shuffle = shuffle
        self.groups = np.zeros(len(self.lengths), np.int64) if groups is None else np.asarray(groups, np.int64)
        self.group_names = list(group_names)

        # Cropped length of every utterance as a batch's shortest, via the crop rule itself (once per distinct
        # length: the rule is scalar).
        limited = np.minimum(self.lengths, self.max_samples)
        distinct, inverse = np.unique(limited, return_inverse=True)
        table = np.array([crop_num_samples(crop_num_frames(int(n), self.max_samples, 1, 1, stride, receptive_field),
                                           stride, receptive_field) for n in distinct], dtype=np.int64)
        self._sort_key = limited
        self._crop = table[inverse]
        if int(self._crop.max()) > self.max_tokens:
            raise ValueError(f"data.max_tokens={self.max_tokens} is smaller than one cropped utterance "
                             f"({int(self._crop.max())} samples): raise it or lower data.max_sample_seconds")

        # Mixing: per-group members, hours, weights and utterances per epoch.
        self._members = [np.flatnonzero(self.groups == g) for g in range(len(self.group_names))]
        hours = {name: float(self.lengths[m].sum()) / SAMPLE_RATE / 3600
                 for name, m in zip(self.group_names, self._members, strict=True)}
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
        self._epochs: OrderedDict[int, list[np.ndarray]] = OrderedDict()

    # --- epochs

    def epoch_items(self, epoch: int) -> np.ndarray:
        """Utterance indices of one epoch after mixing (unordered; an upsampled group repeats utterances)."""
        rng = counter_rng(self.seed, epoch, 0, 0, stream=_EPOCH_STREAM)
        parts = []
        for name, members in zip(self.group_names, self._members, strict=True):
            want = self.per_epoch[name]
            passes, rest = divmod(want, len(members)) if len(members) else (0, 0)
            parts += [members] * passes
            if rest:
                parts.append(np.sort(rng.choice(members, size=rest, replace=False)))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Every micro-batch of one epoch (all DP ranks), in stream order; each an int64 array of utterances."""
        cached = self._epochs.get(epoch)
        if cached is not None:
            return cached
        items = self.epoch_items(epoch)
        rng = counter_rng(self.seed, epoch, 1, 0, stream=_EPOCH_STREAM)
        ties = rng.random(len(items)) if self.shuffle else np.arange(len(items))
        items = items[np.lexsort((ties, -self._sort_key[items]))]  # longest first, ties random
        bounds, count = [0], 0
        for i, crop in enumerate(self._crop[items].tolist()):
            # Adding a (shorter or equal) utterance re-crops the whole batch to it: (count + 1) * crop.
            if count and (count + 1) * crop > self.max_tokens:
                bounds.append(i)
                count = 0
            count += 1
        bounds.append(len(items))
        batches = [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
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
                "num_utterances": len(self.lengths), "num_samples": int(self.lengths.sum())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position from state_dict(). Another layout (TP, DP, micro-batches) continues at the same
        micro-batch; another corpus cannot continue exactly: it warns and keeps the epoch and offset."""
        if (state.get("num_utterances"), state.get("num_samples")) != (len(self.lengths), int(self.lengths.sum())):
            warnings.warn(f"data sampler state was saved over {state.get('num_utterances')} utterances / "
                          f"{state.get('num_samples')} samples, this corpus has {len(self.lengths)} / "
                          f"{int(self.lengths.sum())}: batches after the resume differ from an uninterrupted run",
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
