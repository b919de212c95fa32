"""Pre-training and evaluation batches: shards -> dynamic batches -> workers (crop, augment, masks) -> [B, T] float32.

    loader = build_pretrain_loader(cfg.data, cfg.model, dp_rank, dp_size, cfg.train.num_micro_batches,
                                   tp_size, cfg.train.seed, start_state=saved_or_None)
    metrics.update(loader.mixing_stats())            # hours and sampling weight per language
    for step, micro_batches in zip(range(start, max_steps), loader):   # len(micro_batches) == num_micro_batches
        train_step(model, optimizer, micro_batches)
        checkpoint["data"] = loader.state_dict()     # global batches consumed: resume yields exactly the rest

A micro-batch: {"waveform": float32 [B, T], "mask": bool [B, F], "negatives": int64 [B, F, K],
"channel_mask": bool [B, H] or None, "skip_layers": tuple of the 0-based transformer layers LayerDrop skips (empty
without model.layerdrop, and in evaluation), "num_samples": B * T, "ids": [B utterance ids], "step", "micro_step"} with
T = stride (F - 1) + receptive_field exactly and F a multiple of tp (data/crop.py): no padding in pre-training.
Every TP rank of a DP group builds the same loader (same dp_rank) and gets bit-identical micro-batches.

Determinism: a micro-batch is a pure function of its slot (sampler.py) and the seed. Crop offsets and augmentation
of utterance b use counter_rng(seed, step, micro_step, dp_rank, UTTERANCE_STREAM + b), the time mask and
negatives MASK_STREAM, the channel mask CHANNEL_STREAM, LayerDrop's skips LAYERDROP_STREAM with dp_rank 0 (the same
on every DP rank: models/wav2vec2/layerdrop.py says why) (common/rng.py). The builder emits numpy; the stream
(data/stream.py: workers, signals, resume, tensors) is the one fine-tuning uses too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_speech.common.audio import SAMPLE_RATE, ConvGeometry
from megatron_speech.common.rng import CHANNEL_STREAM, MASK_STREAM, UTTERANCE_STREAM, counter_rng
from megatron_speech.data.augment import SPEED_MARGIN, Augmenter
from megatron_speech.data.crop import crop_num_frames
from megatron_speech.data.dataset import Corpus, corpus_names
from megatron_speech.data.noise import check_noise_source
from megatron_speech.data.sampler import DynamicBatchSampler, Slot
from megatron_speech.data.stream import EvalLoader, ResumableLoader, build_augmenter
from megatron_speech.models.wav2vec2.layerdrop import layer_skips
from megatron_speech.models.wav2vec2.masker import compute_span_mask, sample_negatives

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskingSpec:
    """What the crops, masks, distractors and LayerDrop's skips need, in frames / channels (from the model
    config)."""

    geometry: ConvGeometry
    mask_prob: float
    mask_length: int
    min_masks: int
    num_negatives: int
    channel_prob: float = 0.0
    channel_length: int = 10
    hidden_size: int = 0
    num_layers: int = 0
    layerdrop: float = 0.0

    @property
    def min_frames(self) -> int:
        """Frames a crop needs: min_masks spans plus one unmasked frame (data/crop.py)."""
        return self.min_masks * self.mask_length + 1


def masking_spec(model_cfg: Any) -> MaskingSpec:
    """The MaskingSpec of a model config (Wav2Vec2Config)."""
    return MaskingSpec(model_cfg.geometry, model_cfg.mask_prob, model_cfg.mask_length_frames,
                       model_cfg.mask_min_masks, model_cfg.num_negatives, model_cfg.mask_channel_prob,
                       model_cfg.mask_channel_length, model_cfg.hidden_size, model_cfg.num_layers, model_cfg.layerdrop)


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
            floor = m.geometry.num_samples(need + (-need) % self.tp_size)
            shortest = min(shortest, max(floor, math.floor((shortest - SPEED_MARGIN) / fastest)))
        return crop_num_frames(shortest, self.max_samples, self.tp_size, m.min_frames, m.geometry)

    def __getitem__(self, slot: Slot) -> dict[str, Any]:
        m = self.masking
        lengths = self.shards.lengths_of(slot.indices)
        num_frames = self.num_frames(lengths)
        num_samples = m.geometry.num_samples(num_frames)
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
        # numpy, not torch: the stream converts (stream.to_tensors says why)
        return {
            "waveform": waveform,
            "mask": mask,
            "negatives": negatives,
            "channel_mask": channel_mask,
            "skip_layers": layer_skips(self.seed, slot.step, slot.micro_step, m.num_layers, m.layerdrop),
            "num_samples": batch * num_samples,
            "ids": [self.shards.id(i) for i in slot.indices.tolist()],
            "step": slot.step,
            "micro_step": slot.micro_step,
            "_after": slot.after,
        }


# ------------------------------------------------------------------------------------------------------------
# Factories: read the configs, build the pieces


def min_utterance_samples(data_cfg: Any, masking: MaskingSpec, tp_size: int) -> int:
    """Shortest utterance kept: data.min_sample_seconds, raised where needed to the crop rule's minimum at this
    tp (max(min_frames, tp) frames rounded up to a multiple of tp)."""
    need = max(masking.min_frames, tp_size)
    need += (-need) % tp_size
    rule = masking.geometry.num_samples(need)
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


def build_pretrain_loader(data_cfg: Any, model_cfg: Any, dp_rank: int, dp_size: int,
                          num_micro_batches: int, tp_size: int, seed: int,
                          start_state: Mapping[str, Any] | None = None, *, pin_memory: bool = False,
                          augment: bool = True) -> ResumableLoader:
    """The pre-training loader of one rank (every TP rank of a DP group passes the same dp_rank).

    data_cfg: config.DataConfig (prefix, weights, max_tokens, crops, augmentation, num_workers);
    model_cfg: Wav2Vec2Config (masking, negatives, conv geometry); seed: train.seed (data order, crops,
    augmentation, masks); start_state: a previous loader.state_dict() to resume from; augment=False turns off
    speed and noise (normalization stays as configured).
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
                                  geometry=masking.geometry)
    for name in names:
        logger.info("data: %-12s %9.2f h  sampling weight %.4f (natural %.4f)", name, sampler.hours[name],
                    sampler.weights[name], sampler.mixing_stats()[f"data/{name}/natural_weight"])
    augmenter = build_augmenter(data_cfg, train=augment)
    builder = MicroBatchBuilder(corpus, augmenter, masking, tp_size, max_samples, seed)
    extra = {"data/hours": sampler.num_samples / SAMPLE_RATE / 3600, "data/skipped_utterances": float(skipped[0]),
             "data/skipped_hours": skipped[1] / SAMPLE_RATE / 3600}
    loader = ResumableLoader(builder, sampler, data_cfg.num_workers, pin_memory, extra)
    if start_state is not None:
        loader.load_state_dict(start_state)
    return loader


def build_eval_loader(data_cfg: Any, model_cfg: Any, dp_rank: int, dp_size: int, tp_size: int,
                      seed: int, *, pin_memory: bool = False) -> EvalLoader:
    """Evaluation loader over the valid split of data.valid_prefix (default: data.prefix): no augmentation,
    natural proportions, and the same batches, crops and masks at every evaluation."""
    masking = dataclasses.replace(masking_spec(model_cfg), layerdrop=0.0)  # evaluation runs every layer
    max_samples = round(data_cfg.max_sample_seconds * SAMPLE_RATE)
    prefixes = data_cfg.valid_prefix or data_cfg.prefix
    corpus = Corpus(prefixes, "valid")
    keep, _ = corpus.long_enough(min_utterance_samples(data_cfg, masking, tp_size))
    sampler = DynamicBatchSampler(corpus.lengths, data_cfg.max_tokens, max_samples, seed,
                                  groups=np.where(keep, 0, -1).astype(np.int16),
                                  geometry=masking.geometry)
    builder = MicroBatchBuilder(corpus, build_augmenter(data_cfg, train=False), masking, tp_size, max_samples, seed)
    return EvalLoader(builder, sampler.epoch_batches(0), dp_rank, dp_size, data_cfg.num_workers, pin_memory)
