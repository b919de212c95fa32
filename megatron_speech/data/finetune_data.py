"""Fine-tuning batches: labeled utterances, whole (never cropped), right-padded to the longest of the batch.

    train = labeled_split(cfg.data.prefix, "train", task.label_key, min_samples, max_samples)
    loader = build_finetune_loader(train, task, cfg, dp_rank, dp_size, tp_size, start_state=None)
    for micro_batches in loader: ...                    # this DP rank's num_micro_batches per step, resumable
    batches = eval_batches(valid, task, cfg, dp_rank, dp_size, tp_size)   # same batches every evaluation

A micro-batch: {"waveform": float32 [B, T] (each utterance normalized on its own samples, then zero-padded),
"padding_mask": bool [B, F] (True = padded frame: its 400-sample window runs past the utterance, transformers'
rule), "mask": bool [B, F] or None, "channel_mask": bool [B, H] or None, "targets": int64 (CTC: the utterances'
token ids concatenated; classification: [B] class ids), "target_lengths": int64 [B], "target_min_frames": int64
[B] (CTC: tokens + repeated neighbours, the fewest frames an alignment needs), "references": [B] raw label values
(for the metrics), "ids", "num_samples" (real audio samples), "step", "micro_step"}.

F = the frames of the longest utterance rounded up to a multiple of tp, and T = max(longest, 320 (F - 1) + 400):
each TP rank's time-sharded conv encoder gets whole frames (DESIGN §3), padded frames are masked out of
attention, pooling, the CTC loss and decoding, so padding never changes an utterance's result.

Batches are a padded-sample budget (data.max_tokens >= B * longest), length-bucketed, in the deterministic,
resumable stream of data/sampler.py (assigned to (dp_rank, micro_step) slots; its state is the global batches
consumed). Utterances without the task's label, shorter than data.min_sample_seconds or longer than
data.max_sample_seconds are skipped and counted in the log (cropping would cut labeled speech).
Augmentation: additive noise (data.noise_dir) only; speed perturbation is refused by the config check. Masks for
fine-tuning (finetune.mask_prob) come from masker.counter_rng keyed like pre-training's, never on padded frames.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from megatron_speech.data.augment import Augmenter
from megatron_speech.data.dataset import AudioShards, manifest_path
from megatron_speech.data.loader import collate_waveforms, frame_padding_mask, start_workers
from megatron_speech.data.noise import open_noise
from megatron_speech.data.sampler import DynamicBatchSampler, Position, Slot
from megatron_speech.models.wav2vec2.config import SAMPLE_RATE, Wav2Vec2Config
from megatron_speech.models.wav2vec2.masker import compute_span_mask, counter_rng
from megatron_speech.tasks.task import Task
from megatron_speech.training.signals import ignore_stop_signals

logger = logging.getLogger(__name__)

MASK_STREAM, CHANNEL_STREAM, UTTERANCE_STREAM = 0, 1, 2  # counter_rng streams (utterance b: 2 + b)
_BATCH_STREAM = 0x46544E42  # "FTNB": the sampler's per-epoch shuffles
EVAL_MICRO_STEP = 0xFFFF


# ------------------------------------------------------------------------------------------------------------
# Labeled audio


class DecodedFiles:
    """Audio files of a JSONL / TSV manifest or a folder (tools/preprocess_audio.py's inputs), decoded exactly as
    preprocessing does (mono, 16 kHz, int16), in memory: the same interface as AudioShards (lengths, read, id,
    labels). Files that fail to decode are listed in `rejects` (id, reason), never silently dropped."""

    def __init__(self, manifest: str, min_samples: int = 400) -> None:
        from megatron_speech.data.preprocess import Kept, decode_file, list_inputs

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


def open_manifest(path: str, min_samples: int = 400):
    """A test manifest for `evaluate`: preprocessed shards (`PREFIX_{train,valid}.manifest.jsonl`, rows with
    "shard") as AudioShards, anything else (JSONL of {"path", labels...}, TSV, folder) as DecodedFiles."""
    import json

    for split in ("train", "valid"):
        suffix = f"_{split}.manifest.jsonl"
        if path.endswith(suffix):
            with open(path, encoding="utf-8") as f:
                first = next((line for line in f if line.strip()), "{}")
            if "shard" in json.loads(first):
                return AudioShards(path[: -len(suffix)], split, min_samples)
    return DecodedFiles(path, min_samples)


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


def min_samples_for(data_cfg, model_cfg: Wav2Vec2Config) -> int:
    """Shortest utterance kept: data.min_sample_seconds, and at least one frame."""
    return max(round(data_cfg.min_sample_seconds * SAMPLE_RATE), model_cfg.receptive_field)


# ------------------------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class BatchSpec:
    """What building a micro-batch needs beyond the audio (picklable, for spawned workers)."""

    task: Task
    model_cfg: Wav2Vec2Config
    tp_size: int
    seed: int
    normalize_eps: float | None
    mask_prob: float = 0.0
    mask_length: int = 10
    channel_prob: float = 0.0
    channel_length: int = 64


def batch_spec(task: Task, cfg, tp_size: int) -> BatchSpec:
    ft = cfg.finetune
    return BatchSpec(task, cfg.model, tp_size, cfg.train.seed, cfg.data.normalize_eps if cfg.data.normalize else None,
                     ft.mask_prob, ft.mask_length, ft.mask_channel_prob, ft.mask_channel_length)


def padded_num_frames(longest_samples: int, model_cfg: Wav2Vec2Config, tp_size: int) -> int:
    """Frames of a padded batch: those of its longest utterance, rounded up to a multiple of tp."""
    frames = model_cfg.num_frames(longest_samples)
    return frames + (-frames) % tp_size


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
        spec, split, cfg = self.spec, self.split, self.spec.model_cfg
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
        num_frames = padded_num_frames(max(lengths), cfg, spec.tp_size)
        waveform, _ = collate_waveforms(waves, pad=True)  # [B, longest]
        total = cfg.num_samples(num_frames)
        if waveform.shape[1] < total:  # whole frames for every TP rank
            waveform = torch.nn.functional.pad(waveform, (0, total - waveform.shape[1]))
        padding = frame_padding_mask(lengths, num_frames, cfg.total_stride, cfg.receptive_field)
        real_frames = (~padding).sum(1).numpy()

        mask = channel_mask = None
        batch = len(lengths)
        if self.train and spec.mask_prob > 0:
            rng = counter_rng(spec.seed, step, micro_step, dp_rank, MASK_STREAM)
            mask = compute_span_mask((batch, num_frames), spec.mask_prob, spec.mask_length, rng, min_masks=2,
                                     lengths=real_frames, require_same_masks=False)
        if self.train and spec.channel_prob > 0:
            rng = counter_rng(spec.seed, step, micro_step, dp_rank, CHANNEL_STREAM)
            channel_mask = compute_span_mask((batch, cfg.hidden_size), spec.channel_prob, spec.channel_length, rng,
                                             min_masks=0)

        task = spec.task
        references = [split.labels[k] for k in positions.tolist()]
        ids = [split.source.id(int(split.indices[k])) for k in positions.tolist()]
        targets = [task.target(v, uid, strict=self.train) for v, uid in zip(references, ids, strict=True)]
        out = {
            "waveform": waveform.numpy(),
            "padding_mask": padding.numpy(),
            "mask": mask,
            "channel_mask": channel_mask,
            "references": references,
            "ids": ids,
            "num_samples": int(sum(lengths)),
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


_TENSOR_KEYS = ("waveform", "padding_mask", "mask", "channel_mask", "targets", "target_lengths", "target_min_frames")


def as_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """numpy -> torch in the training process (workers send numpy: see loader.py's _as_tensors)."""
    for key in _TENSOR_KEYS:
        if batch.get(key) is not None:
            batch[key] = torch.from_numpy(batch[key])
    return batch


class PaddedBatchSampler(DynamicBatchSampler):
    """Pre-training's stream of micro-batches (epochs, (dp_rank, micro_step) slots, resumable position), with
    batches budgeted for padding: count x longest <= max_tokens (pre-training's budget is count x the crop of the
    shortest). The budget uses the tp = 1 length, so the batches do not depend on the parallel layout."""

    def __init__(self, lengths: np.ndarray, max_tokens: int, seed: int, dp_rank: int = 0, dp_size: int = 1,
                 num_micro_batches: int = 1, shuffle: bool = True, stride: int = 320,
                 receptive_field: int = 400) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.max()) > max_tokens:
            raise ValueError(f"data.max_tokens={max_tokens} is smaller than the longest utterance "
                             f"({int(lengths.max())} samples): raise it or lower data.max_sample_seconds")
        super().__init__(lengths, max_tokens, int(lengths.max()), seed, dp_rank, dp_size, num_micro_batches,
                         shuffle=shuffle, stride=stride, receptive_field=receptive_field)
        self._padded: dict[int, list[np.ndarray]] = {}

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        cached = self._padded.get(epoch)
        if cached is not None:
            return cached
        items = self.epoch_items(epoch)
        rng = counter_rng(self.seed, epoch, 1, 0, stream=_BATCH_STREAM)
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


class _SlotStream(torch.utils.data.Sampler):
    def __init__(self, sampler: PaddedBatchSampler, start: Position) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[Slot]:
        return self.sampler.slots(self.start)


def _identity(x: Any) -> Any:
    return x


def _data_loader(dataset, sampler, num_workers: int, prefetch: int) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:  # spawn, never fork: the parent holds process groups and threads
        # workers ignore Slurm's USR1/TERM (and are spawned with them blocked, start_workers): loader.py says why
        kwargs = {"multiprocessing_context": "spawn", "prefetch_factor": max(2, math.ceil(prefetch / num_workers)),
                  "worker_init_fn": ignore_stop_signals}
    # Its own generator: creating a DataLoader iterator draws a base seed, and from the default generator that
    # draw would shift dropout after a resume (the iterator is created after the RNG state is restored). Batches
    # are pure functions of their slot: the seed is never used.
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers, collate_fn=_identity,
                      generator=torch.Generator().manual_seed(0), **kwargs)


class FinetuneLoader:
    """Iterator over steps: this DP rank's num_micro_batches micro-batches. state_dict() is the position after
    the last step returned; a loader built with it as start_state continues with exactly the next step."""

    def __init__(self, builder: FinetuneBatchBuilder, sampler: PaddedBatchSampler, num_workers: int = 0) -> None:
        self.builder, self.sampler, self.num_workers = builder, sampler, num_workers
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> FinetuneLoader:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        if self._it is None:
            stream = _SlotStream(self.sampler, self.sampler.position)
            loader = _data_loader(self.builder, stream, self.num_workers, 2 * self.sampler.num_micro_batches)
            self._it = start_workers(loader)
        batches = [next(self._it) for _ in range(self.sampler.num_micro_batches)]
        self.sampler.position = batches[-1].pop("_after")
        for b in batches[:-1]:
            b.pop("_after")
        return [as_tensors(b) for b in batches]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._it = None
        self.sampler.load_state_dict(state)


def build_augmenter(data_cfg, train: bool) -> Augmenter:
    """Normalization as configured; additive noise only when training (no speed perturbation: see module doc)."""
    eps = data_cfg.normalize_eps if data_cfg.normalize else None
    if not train or not data_cfg.noise_dir:
        return Augmenter(normalize_eps=eps)
    noise = open_noise(data_cfg.noise_dir, data_cfg.noise_types)
    return Augmenter((), noise, data_cfg.noise_prob, tuple(data_cfg.noise_snr_db), tuple(data_cfg.music_snr_db),
                     tuple(data_cfg.babble_snr_db), tuple(data_cfg.babble_num_speakers), normalize_eps=eps)


def build_finetune_loader(split: LabeledSplit, task: Task, cfg, dp_rank: int, dp_size: int, tp_size: int,
                          start_state: dict[str, Any] | None = None) -> FinetuneLoader:
    """The training loader of one rank (every TP rank of a DP group passes the same dp_rank)."""
    m = cfg.model
    sampler = PaddedBatchSampler(split.lengths, cfg.data.max_tokens, cfg.train.seed, dp_rank, dp_size,
                                 cfg.train.num_micro_batches, stride=m.total_stride, receptive_field=m.receptive_field)
    builder = FinetuneBatchBuilder(split, batch_spec(task, cfg, tp_size), build_augmenter(cfg.data, True), True)
    loader = FinetuneLoader(builder, sampler, cfg.data.num_workers)
    if start_state is not None:
        loader.load_state_dict(start_state)
    return loader


def eval_batches(split: LabeledSplit, task: Task, cfg, dp_rank: int = 0, dp_size: int = 1, tp_size: int = 1,
                 max_batches: int | None = None) -> Iterator[dict[str, Any]]:
    """This DP rank's share of one pass over a split, in length order (no augmentation, no masks): the same
    batches at every evaluation. max_batches caps the batches per rank."""
    m = cfg.model
    sampler = PaddedBatchSampler(split.lengths, cfg.data.max_tokens, cfg.train.seed, shuffle=False,
                                 stride=m.total_stride, receptive_field=m.receptive_field)
    mine = sampler.epoch_batches(0)[dp_rank::dp_size][:max_batches]
    builder = FinetuneBatchBuilder(split, batch_spec(task, cfg, tp_size), build_augmenter(cfg.data, False), False)
    slots = [Slot(k, EVAL_MICRO_STEP, dp_rank, 0, indices, Position()) for k, indices in enumerate(mine)]
    for batch in _data_loader(builder, slots, cfg.data.num_workers, 2):
        batch.pop("_after")
        yield as_tensors(batch)
