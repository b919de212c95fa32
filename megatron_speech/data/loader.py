"""Pre-training and evaluation batches: shards -> dynamic batches -> workers (crop, augment, masks) -> [B, T] float32.

    loader = build_pretrain_loader(cfg.data, cfg.model, dp_rank, dp_size, cfg.train.num_micro_batches,
                                   tp_size, cfg.train.seed, start_state=saved_or_None)
    metrics.update(loader.mixing_stats())            # hours and sampling weight per language
    for step, micro_batches in zip(range(start, max_steps), loader):   # len(micro_batches) == num_micro_batches
        train_step(model, optimizer, micro_batches)
        checkpoint["data"] = loader.state_dict()     # global batches consumed: resume yields exactly the rest

A micro-batch: {"waveform": float32 [B, T], "mask": bool [B, F], "negatives": int64 [B, F, K],
"channel_mask": bool [B, H] or None, "num_samples": B * T, "ids": [B utterance ids], "step", "micro_step"} with
T = stride (F - 1) + receptive_field exactly and F a multiple of tp (data/crop.py): no padding in pre-training.
Every TP rank of a DP group builds the same loader (same dp_rank) and gets bit-identical micro-batches.

Determinism: a micro-batch is a pure function of its slot (sampler.py) and the seed. Crop offsets and augmentation
of utterance b use masker.counter_rng(seed, step, micro_step, dp_rank, stream=2 + b), the time mask and
negatives stream 0, the channel mask stream 1. Workers hold no state, so any number of them (0 = in process)
yields the same batches, and a resume from state_dict() yields bit-identically the batches an uninterrupted run
would have. Workers are spawned, never forked (the parent may hold CUDA or process groups).

Signals: Slurm sends SIGUSR1 (the time-limit warning) and SIGTERM (preemption) to every process of the step, workers
included. Workers start with both blocked and then ignore them (training/signals.py), so the training process
can finish its step and save while they keep serving batches; it ends them itself when it releases the iterator.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from megatron_speech.data.augment import SPEED_MARGIN, Augmenter
from megatron_speech.data.crop import crop_num_frames, crop_num_samples
from megatron_speech.data.dataset import Corpus, corpus_names
from megatron_speech.data.noise import check_noise_source, open_noise
from megatron_speech.data.sampler import DynamicBatchSampler, Position, Slot
from megatron_speech.models.wav2vec2.config import SAMPLE_RATE, Wav2Vec2Config
from megatron_speech.models.wav2vec2.masker import compute_span_mask, counter_rng, sample_negatives
from megatron_speech.training.signals import ignore_stop_signals, stop_signals_blocked

logger = logging.getLogger(__name__)

MASK_STREAM, CHANNEL_STREAM, UTTERANCE_STREAM = 0, 1, 2  # counter_rng streams; utterance b uses 2 + b
EVAL_MICRO_STEP = 0xFFFF  # evaluation keys (seed, k, 0xFFFF, dp_rank) never collide with training's


@dataclass(frozen=True)
class MaskingSpec:
    """What the masks and distractors need, in frames / channels (from the model config)."""

    mask_prob: float
    mask_length: int
    min_masks: int
    num_negatives: int
    channel_prob: float = 0.0
    channel_length: int = 10
    hidden_size: int = 0
    stride: int = 320
    receptive_field: int = 400

    @property
    def min_frames(self) -> int:
        """Frames a crop needs: min_masks spans plus one unmasked frame (data/crop.py)."""
        return self.min_masks * self.mask_length + 1


def masking_spec(model_cfg: Wav2Vec2Config) -> MaskingSpec:
    """The MaskingSpec of a model config."""
    return MaskingSpec(model_cfg.mask_prob, model_cfg.mask_length_frames, model_cfg.mask_min_masks,
                       model_cfg.num_negatives, model_cfg.mask_channel_prob, model_cfg.mask_channel_length,
                       model_cfg.hidden_size, model_cfg.total_stride, model_cfg.receptive_field)


def collate_waveforms(waves: Sequence[np.ndarray], pad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack float32 waveforms into [B, T]. Equal lengths: (waveform, None). pad=True (fine-tuning): right-pad
    with zeros to the longest and return the padding mask [B, T] (True = padded sample); pre-training never
    pads, so unequal lengths without pad=True are a bug and raise."""
    lengths = [len(w) for w in waves]
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return torch.from_numpy(np.stack(waves).astype(np.float32, copy=False)), None
    if not pad:
        raise ValueError(f"waveforms of unequal lengths {lengths} in a batch that must not be padded")
    out = np.zeros((len(waves), longest), dtype=np.float32)
    padding = np.ones((len(waves), longest), dtype=bool)
    for b, w in enumerate(waves):
        out[b, :len(w)] = w
        padding[b, :len(w)] = False
    return torch.from_numpy(out), torch.from_numpy(padding)


def frame_padding_mask(num_samples: Sequence[int], num_frames: int, stride: int = 320,
                       receptive_field: int = 400) -> torch.Tensor:
    """Frame-level padding mask [B, F] (True = padded): frame i is real only if its whole window
    [stride i, stride i + receptive_field) lies within the utterance. Feed `lengths = (~mask).sum(1)` to
    masker.compute_span_mask so padded frames are never masked nor drawn as distractors."""
    real = [max(0, (n - receptive_field) // stride + 1) if n >= receptive_field else 0 for n in num_samples]
    frames = np.arange(num_frames)[None, :]
    return torch.from_numpy(frames >= np.asarray(real)[:, None])


class MicroBatchBuilder:
    """Builds the micro-batch of a slot (runs in the DataLoader workers; a map-style dataset keyed by Slot)."""

    def __init__(self, shards: Corpus, augmenter: Augmenter, masking: MaskingSpec, tp_size: int,
                 max_samples: int, seed: int) -> None:
        self.shards, self.augmenter, self.masking = shards, augmenter, masking
        self.tp_size, self.max_samples, self.seed = tp_size, max_samples, seed

    def num_frames(self, lengths: np.ndarray) -> int:
        """F of a micro-batch: the crop rule on its shortest utterance, shortened by the fastest speed factor so
        that every utterance can play at any factor (else the bucketed, near-equal lengths of a batch would cap
        nearly every speed-up at ~1.0), but never below what the rule needs. lengths: the batch's, in samples."""
        m = self.masking
        shortest = int(lengths.min())
        fastest = self.augmenter.max_speed
        if fastest > 1.0:
            need = max(m.min_frames, self.tp_size)
            floor = crop_num_samples(need + (-need) % self.tp_size, m.stride, m.receptive_field)
            shortest = min(shortest, max(floor, math.floor((shortest - SPEED_MARGIN) / fastest)))
        return crop_num_frames(shortest, self.max_samples, self.tp_size, m.min_frames, m.stride, m.receptive_field)

    def __getitem__(self, slot: Slot) -> dict[str, Any]:
        m = self.masking
        lengths = self.shards.lengths_of(slot.indices)
        num_frames = self.num_frames(lengths)
        num_samples = crop_num_samples(num_frames, m.stride, m.receptive_field)
        waves = []
        for b, (i, length) in enumerate(zip(slot.indices.tolist(), lengths.tolist(), strict=True)):
            rng = counter_rng(self.seed, slot.step, slot.micro_step, slot.dp_rank, UTTERANCE_STREAM + b)
            waves.append(self.augmenter(lambda o, c, i=i: self.shards.read(i, o, c), length, num_samples, rng))
        waveform = np.stack(waves)  # [B, T]: equal lengths by construction (no padding in pre-training)

        batch = len(waves)
        rng = counter_rng(self.seed, slot.step, slot.micro_step, slot.dp_rank, MASK_STREAM)
        mask = compute_span_mask((batch, num_frames), m.mask_prob, m.mask_length, rng, min_masks=m.min_masks,
                                 require_same_masks=True)
        negatives = sample_negatives(mask, m.num_negatives, rng)
        channel_mask = None
        if m.channel_prob > 0:
            rng = counter_rng(self.seed, slot.step, slot.micro_step, slot.dp_rank, CHANNEL_STREAM)
            channel_mask = compute_span_mask((batch, m.hidden_size), m.channel_prob, m.channel_length, rng,
                                             min_masks=0)
        # numpy, not torch: see _as_tensors
        return {
            "waveform": waveform,
            "mask": mask,
            "negatives": negatives,
            "channel_mask": channel_mask,
            "num_samples": batch * num_samples,
            "ids": [self.shards.id(i) for i in slot.indices.tolist()],
            "step": slot.step,
            "micro_step": slot.micro_step,
            "_after": slot.after,
        }


def _identity(batch: Any) -> Any:
    return batch


_TENSOR_KEYS = ("waveform", "mask", "negatives", "channel_mask")


def _as_tensors(batch: dict[str, Any], pin_memory: bool) -> dict[str, Any]:
    """numpy arrays from the builder -> tensors, in the training process. Workers send numpy (pickled through
    the pipe) rather than tensors (shared-memory file descriptors): a worker shut down while its queue thread
    is inside torch's C++ tensor sharing dies with "terminate called without an active exception" (SIGABRT)."""
    for key in _TENSOR_KEYS:
        value = batch[key]
        if value is not None:
            tensor = torch.from_numpy(value)
            batch[key] = tensor.pin_memory() if pin_memory else tensor
    return batch


class _SlotStream(torch.utils.data.Sampler):
    """The DataLoader's sampler: this rank's slots from a fixed start position (endless)."""

    def __init__(self, sampler: DynamicBatchSampler, start: Position) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[Slot]:
        return self.sampler.slots(self.start)


class _EvalStream(torch.utils.data.Sampler):
    """Evaluation slots of one DP rank: item k is batches[(k dp_size + dp_rank) mod len], endless, always from
    k = 0 (every evaluation sees the same batches)."""

    def __init__(self, batches: list[np.ndarray], dp_rank: int, dp_size: int) -> None:
        self.batches, self.dp_rank, self.dp_size = batches, dp_rank, dp_size

    def __iter__(self) -> Iterator[Slot]:
        k = 0
        while True:
            indices = self.batches[(k * self.dp_size + self.dp_rank) % len(self.batches)]
            yield Slot(k, EVAL_MICRO_STEP, self.dp_rank, 0, indices, Position())
            k += 1


def _data_loader(builder: MicroBatchBuilder, stream: torch.utils.data.Sampler, num_workers: int,
                 prefetch: int) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        # spawn: workers share nothing with a parent that may hold CUDA contexts, process groups or threads.
        # ignore_stop_signals: a worker killed by Slurm's USR1/TERM would make torch raise in the training process
        # before it could save (the iterator must also be created under stop_signals_blocked: see start_workers).
        kwargs = {"multiprocessing_context": "spawn", "prefetch_factor": max(2, math.ceil(prefetch / num_workers)),
                  "worker_init_fn": ignore_stop_signals}
    # A private generator: iterating a DataLoader draws its workers' base seed from the generator it is given,
    # by default torch's global one, which dropout on the training side also draws from. A resumed run creates
    # its iterator at another step than the uninterrupted run, so that draw would shift every later dropout
    # mask. Our workers take all randomness from counter_rng, so the base seed is irrelevant to the batches.
    return DataLoader(builder, batch_size=None, sampler=stream, num_workers=num_workers, collate_fn=_identity,
                      generator=torch.Generator(), **kwargs)


def start_workers(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """iter(loader), its workers spawned with SIGUSR1/SIGTERM blocked: a worker takes seconds to import torch and
    reach worker_init_fn, and a signal in that window would kill it (the block is inherited across exec)."""
    with stop_signals_blocked():
        return iter(loader)


class PretrainLoader:
    """Iterator over global steps: each item is this DP rank's list of num_micro_batches micro-batches.

    state_dict() is the position after the last global batch returned (prefetched batches do not count);
    load_state_dict() (or build_pretrain_loader's start_state) makes the next item the one after it.
    """

    def __init__(self, builder: MicroBatchBuilder, sampler: DynamicBatchSampler, num_workers: int = 0,
                 pin_memory: bool = False, extra_stats: Mapping[str, float] | None = None) -> None:
        self.builder, self.sampler = builder, sampler
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.num_micro_batches = sampler.num_micro_batches
        self._extra_stats = dict(extra_stats or {})
        self._it: Iterator[dict[str, Any]] | None = None

    @property
    def step(self) -> int:
        """Global batches consumed = the step (masker key) of the next global batch."""
        return self.sampler.position.global_batches

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        if self._it is None:
            stream = _SlotStream(self.sampler, self.sampler.position)
            self._it = start_workers(_data_loader(self.builder, stream, self.num_workers, 2 * self.num_micro_batches))
        batches = [next(self._it) for _ in range(self.num_micro_batches)]
        for m, batch in enumerate(batches):
            assert (batch["step"], batch["micro_step"]) == (self.step, m), (batch["step"], batch["micro_step"])
            after = batch.pop("_after")
        self.sampler.position = after
        return [_as_tensors(b, self.pin_memory) for b in batches]

    def state_dict(self) -> dict[str, Any]:
        """Sampler position: global batches consumed, epoch, micro-batches of that epoch consumed (plain ints)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the global batch where `state` was taken (restarts the workers if running)."""
        self.close()
        self.sampler.load_state_dict(state)

    def mixing_stats(self) -> dict[str, float]:
        """Flat metrics: `data/<language>/{hours,weight,natural_weight,utterances_per_epoch}`, skipped audio."""
        return {**self.sampler.mixing_stats(), **self._extra_stats}

    def close(self) -> None:
        """Stop the worker processes (they restart on the next item)."""
        self._it = None  # the DataLoader iterator shuts its workers down when released


class EvalLoader:
    """Endless evaluation micro-batches of one DP rank (single dicts, not lists). Each iter() starts over, so
    every evaluation sees the same batches, crops and masks. `num_batches`: this rank's share of one pass."""

    def __init__(self, builder: MicroBatchBuilder, batches: list[np.ndarray], dp_rank: int, dp_size: int,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        self.builder, self.batches, self.dp_rank, self.dp_size = builder, batches, dp_rank, dp_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.num_batches = len(batches[dp_rank::dp_size])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = _data_loader(self.builder, _EvalStream(self.batches, self.dp_rank, self.dp_size),
                              self.num_workers, 2)
        for batch in start_workers(loader):
            batch.pop("_after")
            yield _as_tensors(batch, self.pin_memory)


# ------------------------------------------------------------------------------------------------------------
# Factories: read the configs, build the pieces


def min_utterance_samples(data_cfg: Any, masking: MaskingSpec, tp_size: int) -> int:
    """Shortest utterance kept: data.min_sample_seconds, raised where needed to the crop rule's minimum at this
    tp (max(min_frames, tp) frames rounded up to a multiple of tp)."""
    need = max(masking.min_frames, tp_size)
    need += (-need) % tp_size
    rule = crop_num_samples(need, masking.stride, masking.receptive_field)
    configured = round(data_cfg.min_sample_seconds * SAMPLE_RATE)
    if rule > configured:
        logger.info("data: keeping utterances of at least %d samples (the crop rule at tp=%d needs %d frames), "
                    "more than data.min_sample_seconds=%s", rule, tp_size, need, data_cfg.min_sample_seconds)
    return max(rule, configured)


def _mixing_groups(corpus: Corpus, keep: np.ndarray, data_cfg: Any
                   ) -> tuple[np.ndarray, list[str], list[float] | None]:
    """Group per utterance (int16; -1 = not kept): with data.weights, its prefix (weights are per prefix);
    otherwise its "language" label, falling back to its prefix for utterances without one."""
    if data_cfg.weights:
        names = [os.path.basename(p.rstrip("/")) or p for p in corpus.prefixes]
        if len(set(names)) < len(names):
            names = list(corpus.prefixes)
        if len(data_cfg.weights) != len(corpus.prefixes):
            raise ValueError(f"data.weights has {len(data_cfg.weights)} entries but data.prefix has "
                             f"{len(corpus.prefixes)} (after expanding patterns): give one weight per prefix, or none")
        groups = corpus.prefix_index
        groups[~keep] = -1
        return groups, names, [float(w) for w in data_cfg.weights]
    # Without a language label: the prefix's corpus name (the parts of an array run are one group, so that
    # splitting a corpus into 64 parts does not multiply its weight under temperature sampling).
    names = corpus_names(corpus.prefixes)
    languages = corpus.language_names
    group_names = list(languages) + [n for n in dict.fromkeys(names) if n not in languages]
    code = {n: i for i, n in enumerate(group_names)}
    groups = corpus.languages  # int16 [N], new: at 10^8 utterances every byte per utterance is 100 MB
    if (groups < 0).any():
        prefix_group = np.array([code[n] for n in names], dtype=np.int16)
        for p in range(len(corpus.prefixes)):
            part = groups[corpus.starts[p]:corpus.starts[p + 1]]
            part[part < 0] = prefix_group[p]
    groups[~keep] = -1
    used = np.flatnonzero(np.bincount(groups[groups >= 0].astype(np.int64), minlength=len(group_names)))
    remap = np.full(len(group_names) + 1, -1, dtype=np.int16)  # the last entry maps -1 to -1
    remap[used] = np.arange(len(used))
    return remap[groups], [group_names[i] for i in used], None


def check_noise_dir(data_cfg: Any) -> None:
    """Raise (FileNotFoundError / ValueError naming data.noise_dir and the missing folder) unless data.noise_dir is
    off ("") or a packed noise prefix, or a MUSAN folder with audio for every kind of data.noise_types. Cheap: call
    it before the corpus index, so a placeholder path (configs/xl.yaml) fails in seconds."""
    if data_cfg.noise_dir:
        check_noise_source(data_cfg.noise_dir, data_cfg.noise_types)


def build_augmenter(data_cfg: Any, train: bool = True) -> Augmenter:
    """The Augmenter of data_cfg; train=False keeps only the normalization (evaluation: no augmentation)."""
    eps = data_cfg.normalize_eps if data_cfg.normalize else None
    if not train:
        return Augmenter(normalize_eps=eps)
    noise = open_noise(data_cfg.noise_dir, data_cfg.noise_types) if data_cfg.noise_dir else None
    return Augmenter(data_cfg.speed_perturb, noise, data_cfg.noise_prob, tuple(data_cfg.noise_snr_db),
                     tuple(data_cfg.music_snr_db), tuple(data_cfg.babble_snr_db),
                     tuple(data_cfg.babble_num_speakers), normalize_eps=eps)


def build_pretrain_loader(data_cfg: Any, model_cfg: Wav2Vec2Config, dp_rank: int, dp_size: int,
                          num_micro_batches: int, tp_size: int, seed: int,
                          start_state: Mapping[str, Any] | None = None, *, pin_memory: bool = False,
                          augment: bool = True) -> PretrainLoader:
    """The pre-training loader of one rank (every TP rank of a DP group passes the same dp_rank).

    data_cfg: config.DataConfig (prefix, weights, max_tokens, crops, augmentation, num_workers);
    model_cfg: masking, negatives, conv stride; seed: train.seed (data order, crops, augmentation, masks);
    start_state: a previous loader.state_dict() to resume from; augment=False turns off speed and noise
    (normalization stays as configured).
    """
    if augment:
        check_noise_dir(data_cfg)  # before the manifests: they take minutes to load at scale
    masking = masking_spec(model_cfg)
    max_samples = round(data_cfg.max_sample_seconds * SAMPLE_RATE)
    corpus = Corpus(data_cfg.prefix, "train")
    keep, skipped_per_prefix = corpus.long_enough(min_utterance_samples(data_cfg, masking, tp_size))
    skipped = [sum(x) for x in zip(*skipped_per_prefix.values(), strict=True)]
    groups, names, weights = _mixing_groups(corpus, keep, data_cfg)
    del keep
    sampler = DynamicBatchSampler(corpus.lengths, data_cfg.max_tokens, max_samples, seed, dp_rank, dp_size,
                                  num_micro_batches, groups, names, weights, data_cfg.sampling_alpha,
                                  stride=masking.stride, receptive_field=masking.receptive_field)
    for name in names:
        logger.info("data: %-12s %9.2f h  sampling weight %.4f (natural %.4f)", name, sampler.hours[name],
                    sampler.weights[name], sampler.mixing_stats()[f"data/{name}/natural_weight"])
    augmenter = build_augmenter(data_cfg, train=augment)
    builder = MicroBatchBuilder(corpus, augmenter, masking, tp_size, max_samples, seed)
    extra = {"data/hours": sampler.num_samples / SAMPLE_RATE / 3600, "data/skipped_utterances": float(skipped[0]),
             "data/skipped_hours": skipped[1] / SAMPLE_RATE / 3600}
    loader = PretrainLoader(builder, sampler, data_cfg.num_workers, pin_memory, extra)
    if start_state is not None:
        loader.load_state_dict(start_state)
    return loader


def build_eval_loader(data_cfg: Any, model_cfg: Wav2Vec2Config, dp_rank: int, dp_size: int, tp_size: int,
                      seed: int, *, pin_memory: bool = False) -> EvalLoader:
    """Evaluation loader over the valid split of data.valid_prefix (default: data.prefix): no augmentation,
    natural proportions, and the same batches, crops and masks at every evaluation."""
    masking = masking_spec(model_cfg)
    max_samples = round(data_cfg.max_sample_seconds * SAMPLE_RATE)
    prefixes = data_cfg.valid_prefix or data_cfg.prefix
    corpus = Corpus(prefixes, "valid")
    keep, _ = corpus.long_enough(min_utterance_samples(data_cfg, masking, tp_size))
    sampler = DynamicBatchSampler(corpus.lengths, data_cfg.max_tokens, max_samples, seed,
                                  groups=np.where(keep, 0, -1).astype(np.int16),
                                  stride=masking.stride, receptive_field=masking.receptive_field)
    builder = MicroBatchBuilder(corpus, build_augmenter(data_cfg, train=False), masking, tp_size, max_samples, seed)
    return EvalLoader(builder, sampler.epoch_batches(0), dp_rank, dp_size, data_cfg.num_workers, pin_memory)
