"""Fine-tuning batches: labeled utterances, whole (never cropped), right-padded to the longest of the batch.

    train = labeled_split(cfg.data.prefix, "train", task.label_key, min_samples, max_samples)
    loader = build_finetune_loader(train, task, cfg, dp_rank, dp_size, tp_size, start_state=None)
    for micro_batches in loader: ...                    # this DP rank's num_micro_batches per step, resumable
    batches = eval_batches(valid, task, cfg, dp_rank, dp_size, tp_size)   # same batches every evaluation

A micro-batch: {"waveform": float32 [B, T] (each utterance normalized on its own samples, then zero-padded),
"padding_mask": bool [B, F] (True = padded frame: its receptive field runs past the utterance, transformers'
rule), "mask": bool [B, F] or None, "channel_mask": bool [B, H] or None, "targets": int64 (CTC: the utterances'
token ids concatenated; classification: [B] class ids), "target_lengths": int64 [B], "target_min_frames": int64
[B] (CTC: tokens + repeated neighbours, the fewest frames an alignment needs), "references": [B] raw label values
(for the metrics), "ids", "num_samples" (real audio samples), "skip_layers" (LayerDrop's skipped layers when training,
models/wav2vec2/layerdrop.py; else empty), "step", "micro_step"}.

F = the frames of the longest utterance rounded up to a multiple of tp, and T = max(longest, stride (F - 1) +
receptive_field) (the model's ConvGeometry):
each TP rank's time-sharded conv encoder gets whole frames (docs/design.md §3), padded frames are masked out of
attention, pooling, the CTC loss and decoding, so padding never changes an utterance's result.

Batches are a padded-sample budget (data.max_tokens >= B * longest), length-bucketed, in the deterministic,
resumable stream of data/sampler.py (assigned to (dp_rank, micro_step) slots; its state is the global batches
consumed). Utterances without the task's label, shorter than data.min_sample_seconds or longer than
data.max_sample_seconds are skipped and counted in the log (cropping would cut labeled speech).
Augmentation: additive noise (data.noise_dir) only; speed perturbation is refused by the config check (and
could not act anyway: an uncropped utterance leaves no audio for a faster speed). Masks for fine-tuning
(finetune.mask_prob) come from counter_rng keyed like pre-training's (common/rng.py), never on padded frames.
The builder emits numpy; the stream (data/stream.py: workers, signals, resume, tensors) is pre-training's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_speech.common.audio import SAMPLE_RATE, ConvGeometry
from megatron_speech.common.rng import (
    CHANNEL_STREAM,
    MASK_STREAM,
    PADDED_BATCH_STREAM,
    UTTERANCE_STREAM,
    counter_rng,
)
from megatron_speech.data.augment import Augmenter
from megatron_speech.data.dataset import AudioShards, manifest_path
from megatron_speech.data.sampler import DynamicBatchSampler, Slot
from megatron_speech.data.stream import EvalLoader, ResumableLoader, build_augmenter
from megatron_speech.models.wav2vec2.layerdrop import layer_skips
from megatron_speech.models.wav2vec2.masker import compute_span_mask
from megatron_speech.tasks.task import Task

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# Labeled audio


class DecodedFiles:
    """Audio files of a JSONL / TSV manifest or a folder (tools/preprocess_audio.py's inputs), decoded exactly as
    preprocessing does (mono, 16 kHz, int16), in memory: the same interface as AudioShards (lengths, read, id,
    labels). Files that fail to decode are listed in `rejects` (id, reason), never silently dropped."""

    def __init__(self, manifest: str, min_samples: int) -> None:
        from megatron_speech.data.audio_io import Kept, decode_file
        from megatron_speech.data.inputs import list_inputs

        _, items = list_inputs(manifest)
        self._audio: list[np.ndarray] = []
        self._ids: list[str] = []
        self._labels: list[dict[str, Any]] = []
        self.rejects: list[tuple[str, str]] = []
        for item in items:
            if item.reject is not None:
                self.rejects.append((item.id, f"{item.reject[0]}: {item.reject[1]}"))
                continue
            decoded = decode_file(item.source, min_samples)
            if not isinstance(decoded, Kept):
                self.rejects.append((item.id, f"{decoded.reason}: {decoded.detail}"))
                continue
            self._audio.append(decoded.samples)
            self._ids.append(item.id)
            self._labels.append(dict(item.labels))
        if not self._audio:
            raise ValueError(f"{manifest}: no file could be decoded ({len(self.rejects)} rejected, e.g. "
                             f"{self.rejects[:2]})")
        self.lengths = np.asarray([len(a) for a in self._audio], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._audio)

    def read(self, i: int, offset: int = 0, count: int | None = None) -> np.ndarray:
        audio = self._audio[i]
        return audio[offset:] if count is None else audio[offset:offset + count]

    def id(self, i: int) -> str:
        return self._ids[i]

    def labels(self, i: int) -> dict[str, Any]:
        return self._labels[i]


def open_manifest(path: str, min_samples: int):
    """A test manifest for `evaluate`: preprocessed shards (`PREFIX_{train,valid}.manifest.jsonl`, rows with
    "shard") as AudioShards, anything else (JSONL of {"path", labels...}, TSV, folder) as DecodedFiles.
    min_samples: the shortest audio kept (min_samples_for: at least one frame)."""
    shards = shard_manifest(path)
    return AudioShards(*shards, min_samples) if shards else DecodedFiles(path, min_samples)


def shard_manifest(path: str) -> tuple[str, str] | None:
    """(PREFIX, split) when `path` is a preprocessed shards' manifest (`PREFIX_{train,valid}.manifest.jsonl` whose
    rows name a "shard"), else None: a manifest of audio files."""
    import json

    for split in ("train", "valid"):
        suffix = f"_{split}.manifest.jsonl"
        if path.endswith(suffix):
            with open(path, encoding="utf-8") as f:
                first = next((line for line in f if line.strip()), "{}")
            if "shard" in json.loads(first):
                return path[: -len(suffix)], split
    return None


@dataclass
class LabeledSplit:
    """Utterances of a source (AudioShards or DecodedFiles) that carry the task's label and fit the length
    limits: `indices` into the source, and their raw label values."""

    source: Any
    indices: np.ndarray
    labels: list[Any]
    name: str

    @property
    def lengths(self) -> np.ndarray:
        """Samples of each selected utterance."""
        return self.source.lengths[self.indices]


def select_labeled(source, label_key: str, max_samples: int | None, name: str) -> LabeledSplit:
    """Keep the utterances with `label_key` and at most max_samples samples; log what is skipped and why."""
    keep, labels, no_label, too_long = [], [], 0, 0
    for i in range(len(source.lengths)):
        if max_samples is not None and source.lengths[i] > max_samples:
            too_long += 1
            continue
        value = source.labels(i).get(label_key)
        if value is None or value == "":
            no_label += 1
            continue
        keep.append(i)
        labels.append(value)
    skipped = getattr(source, "num_skipped", 0)
    if no_label or too_long or skipped:
        logger.info("%s: skipped %d utterances without a %r label, %d longer than data.max_sample_seconds, "
                    "%d shorter than data.min_sample_seconds", name, no_label, label_key, too_long, skipped)
    if not keep:
        raise ValueError(f"{name}: no utterance has a {label_key!r} label within the length limits "
                         f"({no_label} without the label, {too_long} too long): check finetune.label_key and "
                         "data.max_sample_seconds")
    return LabeledSplit(source, np.asarray(keep, dtype=np.int64), labels, name)


def labeled_split(prefixes: Sequence[str], split: str, label_key: str, min_samples: int,
                  max_samples: int) -> LabeledSplit:
    """A preprocessed labeled split. For "valid", a prefix whose valid split is empty (a dev set preprocessed on
    its own with --valid-fraction 0) contributes its train split instead."""
    if split == "valid":
        chosen = []
        for prefix in prefixes:
            path = manifest_path(prefix, "valid")
            empty = not has_rows(path)
            chosen.append("train" if empty and has_rows(manifest_path(prefix, "train")) else "valid")
        if len(set(chosen)) > 1:
            raise ValueError(f"valid prefixes {list(prefixes)} mix valid and train splits ({chosen}): give "
                             "prefixes preprocessed the same way")
        if chosen and chosen[0] == "train":
            logger.info("valid data: %s has no valid split, using its train split", list(prefixes))
            split = "train"
    source = AudioShards(list(prefixes), split, min_samples)
    return select_labeled(source, label_key, max_samples, f"{','.join(prefixes)} ({split})")


def has_rows(path: str) -> bool:
    """Whether a manifest exists and lists at least one utterance."""
    try:
        with open(path, encoding="utf-8") as f:
            return any(line.strip() for line in f)
    except FileNotFoundError:
        return False


def min_samples_for(data_cfg, model_cfg) -> int:
    """Shortest utterance kept: data.min_sample_seconds, and at least one frame of model_cfg (Wav2Vec2Config)."""
    return max(round(data_cfg.min_sample_seconds * SAMPLE_RATE), model_cfg.geometry.receptive_field)


# ------------------------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class BatchSpec:
    """What building a micro-batch needs beyond the audio (picklable, for spawned workers)."""

    task: Task
    geometry: ConvGeometry
    hidden_size: int
    tp_size: int
    seed: int
    normalize_eps: float | None
    mask_prob: float = 0.0
    mask_length: int = 10
    channel_prob: float = 0.0
    channel_length: int = 64
    num_layers: int = 0
    layerdrop: float = 0.0


def batch_spec(task: Task, cfg, tp_size: int) -> BatchSpec:
    ft = cfg.finetune
    eps = cfg.data.normalize_eps if cfg.data.normalize else None
    return BatchSpec(task, cfg.model.geometry, cfg.model.hidden_size, tp_size, cfg.train.seed, eps,
                     ft.mask_prob, ft.mask_length, ft.mask_channel_prob, ft.mask_channel_length, cfg.model.num_layers,
                     cfg.model.layerdrop)


def padded_num_frames(longest_samples: int, geometry: ConvGeometry, tp_size: int) -> int:
    """Frames of a padded batch: those of its longest utterance, rounded up to a multiple of tp."""
    frames = geometry.num_frames(longest_samples)
    return frames + (-frames) % tp_size


def collate_waveforms(waves: Sequence[np.ndarray], pad: bool = False,
                      min_length: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack float32 waveforms into [B, T]. Equal lengths (and T >= min_length): (waveform, None). pad=True: right-pad
    with zeros to max(longest, min_length) and return the padding mask [B, T] (True = padded sample); pre-training
    never pads, so unequal lengths without pad=True are a bug and raise."""
    lengths = [len(w) for w in waves]
    longest = max(lengths)
    if all(n == longest for n in lengths) and longest >= min_length:
        return np.stack(waves).astype(np.float32, copy=False), None
    if not pad:
        raise ValueError(f"waveforms of unequal lengths {lengths} in a batch that must not be padded")
    total = max(longest, min_length)
    out = np.zeros((len(waves), total), dtype=np.float32)
    padding = np.ones((len(waves), total), dtype=bool)
    for b, w in enumerate(waves):
        out[b, :len(w)] = w
        padding[b, :len(w)] = False
    return out, padding


def frame_padding_mask(num_samples: Sequence[int], num_frames: int, geometry: ConvGeometry) -> np.ndarray:
    """Frame-level padding mask [B, F] (True = padded): frame i is real only if its whole window
    [stride i, stride i + receptive_field) lies within the utterance. Feed `lengths = (~mask).sum(1)` to
    masker.compute_span_mask so padded frames are never masked nor drawn as distractors."""
    real = [max(0, geometry.num_frames(n)) for n in num_samples]
    return np.arange(num_frames)[None, :] >= np.asarray(real)[:, None]


class FinetuneBatchBuilder:
    """Builds one micro-batch from utterance positions of a LabeledSplit (runs in DataLoader workers too)."""

    def __init__(self, split: LabeledSplit, spec: BatchSpec, augmenter: Augmenter, train: bool) -> None:
        self.split, self.spec, self.augmenter, self.train = split, spec, augmenter, train

    def __getitem__(self, slot: Slot) -> dict[str, Any]:
        batch = self.build(slot.indices, (slot.step, slot.micro_step, slot.dp_rank))
        batch["_after"] = slot.after
        return batch

    def build(self, positions: np.ndarray, key: tuple[int, int, int]) -> dict[str, Any]:
        """positions: indices into the split; key: (step, micro_step, dp_rank) of the random streams."""
        spec, split, geometry = self.spec, self.split, self.spec.geometry
        step, micro_step, dp_rank = key
        waves, lengths = [], []
        for b, k in enumerate(positions.tolist()):
            i = int(split.indices[k])
            n = int(split.source.lengths[i])
            rng = counter_rng(spec.seed, step, micro_step, dp_rank, UTTERANCE_STREAM + b)
            # The whole utterance (num_samples = its length: no crop), noise when training, then normalization
            # over its own samples only, before any padding.
            waves.append(self.augmenter(lambda o, c, i=i: split.source.read(i, o, c), n, n, rng))
            lengths.append(n)
        num_frames = padded_num_frames(max(lengths), geometry, spec.tp_size)
        # [B, max(longest, whole frames for every TP rank)], zero-padded
        waveform, _ = collate_waveforms(waves, pad=True, min_length=geometry.num_samples(num_frames))
        padding = frame_padding_mask(lengths, num_frames, geometry)
        real_frames = (~padding).sum(1)

        mask = channel_mask = None
        batch = len(lengths)
        if self.train and spec.mask_prob > 0:
            rng = counter_rng(spec.seed, step, micro_step, dp_rank, MASK_STREAM)
            mask = compute_span_mask((batch, num_frames), spec.mask_prob, spec.mask_length, rng, min_masks=2,
                                     lengths=real_frames, require_same_masks=False)
        if self.train and spec.channel_prob > 0:
            rng = counter_rng(spec.seed, step, micro_step, dp_rank, CHANNEL_STREAM)
            channel_mask = compute_span_mask((batch, spec.hidden_size), spec.channel_prob, spec.channel_length, rng,
                                             min_masks=0)

        task = spec.task
        references = [split.labels[k] for k in positions.tolist()]
        ids = [split.source.id(int(split.indices[k])) for k in positions.tolist()]
        targets = [task.target(v, uid, strict=self.train) for v, uid in zip(references, ids, strict=True)]
        out = {
            "waveform": waveform,
            "padding_mask": padding,
            "mask": mask,
            "channel_mask": channel_mask,
            "references": references,
            "ids": ids,
            "num_samples": int(sum(lengths)),
            "skip_layers": layer_skips(spec.seed, step, micro_step, spec.num_layers, spec.layerdrop) if self.train
            else (),
            "step": step,
            "micro_step": micro_step,
        }
        if task.kind == "ctc":
            out["targets"] = np.concatenate(targets) if targets else np.zeros(0, np.int64)
            out["target_lengths"] = np.asarray([len(t) for t in targets], dtype=np.int64)
            out["target_min_frames"] = np.asarray([len(t) + int((t[1:] == t[:-1]).sum()) for t in targets],
                                                  dtype=np.int64)
        else:
            out["targets"] = np.concatenate(targets)
        return out


class PaddedBatchSampler(DynamicBatchSampler):
    """Pre-training's stream of micro-batches (epochs, (dp_rank, micro_step) slots, resumable position), with
    batches budgeted for padding: count x longest <= max_tokens (pre-training's budget is count x the crop of the
    shortest). The budget uses the tp = 1 length, so the batches do not depend on the parallel layout."""

    def __init__(self, lengths: np.ndarray, max_tokens: int, seed: int, dp_rank: int = 0, dp_size: int = 1,
                 num_micro_batches: int = 1, shuffle: bool = True, *, geometry: ConvGeometry) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.max()) > max_tokens:
            raise ValueError(f"data.max_tokens={max_tokens} is smaller than the longest utterance "
                             f"({int(lengths.max())} samples): raise it or lower data.max_sample_seconds")
        super().__init__(lengths, max_tokens, int(lengths.max()), seed, dp_rank, dp_size, num_micro_batches,
                         shuffle=shuffle, geometry=geometry)
        self._padded: dict[int, list[np.ndarray]] = {}

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        cached = self._padded.get(epoch)
        if cached is not None:
            return cached
        items = self.epoch_items(epoch)
        rng = counter_rng(self.seed, epoch, 1, 0, stream=PADDED_BATCH_STREAM)
        ties = rng.random(len(items)) if self.shuffle else np.arange(len(items))
        items = items[np.lexsort((ties, -self.lengths[items]))]  # longest first: a batch's first sets its pad
        bounds, count, longest = [0], 0, 0
        for i, n in enumerate(self.lengths[items].tolist()):
            if count and (count + 1) * longest > self.max_tokens:
                bounds.append(i)
                count = 0
            if count == 0:
                longest = n
            count += 1
        bounds.append(len(items))
        batches = [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._padded[epoch] = batches
        for old in [e for e in self._padded if e < epoch - 1]:
            del self._padded[old]
        return batches


def build_finetune_loader(split: LabeledSplit, task: Task, cfg, dp_rank: int, dp_size: int, tp_size: int,
                          start_state: dict[str, Any] | None = None) -> ResumableLoader:
    """The training loader of one rank (every TP rank of a DP group passes the same dp_rank)."""
    sampler = PaddedBatchSampler(split.lengths, cfg.data.max_tokens, cfg.train.seed, dp_rank, dp_size,
                                 cfg.train.num_micro_batches, geometry=cfg.model.geometry)
    builder = FinetuneBatchBuilder(split, batch_spec(task, cfg, tp_size), build_augmenter(cfg.data, True), True)
    loader = ResumableLoader(builder, sampler, cfg.data.num_workers)
    if start_state is not None:
        loader.load_state_dict(start_state)
    return loader


def eval_batches(split: LabeledSplit, task: Task, cfg, dp_rank: int = 0, dp_size: int = 1, tp_size: int = 1,
                 max_batches: int | None = None) -> Iterator[dict[str, Any]]:
    """This DP rank's share of one pass over a split, in length order (no augmentation, no masks): the same
    batches at every evaluation. max_batches caps the batches per rank."""
    sampler = PaddedBatchSampler(split.lengths, cfg.data.max_tokens, cfg.train.seed, shuffle=False,
                                 geometry=cfg.model.geometry)
    batches = sampler.epoch_batches(0)
    count = len(batches[dp_rank::dp_size][:max_batches])
    builder = FinetuneBatchBuilder(split, batch_spec(task, cfg, tp_size), build_augmenter(cfg.data, False), False)
    yield from EvalLoader(builder, batches, dp_rank, dp_size, cfg.data.num_workers, count=count)
