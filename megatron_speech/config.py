"""Run configuration: typed dataclasses, YAML presets that only override them, `section.key=value` overrides.

    cfg = load_config("configs/xl.yaml", ["train.max_steps=1000", "data.prefix=/data/en"])
    cfg.validate(world_size=32)          # before any process group forms
    d = config_to_dict(cfg)              # plain JSON/YAML types; stored inside checkpoints
    assert config_from_dict(d) == cfg

Dataclass defaults are the XL recipe (DESIGN §6). A YAML file is a mapping of sections (`model`,
`data`, `optim`, `train`, `parallel`, `logging`, `finetune`) to the keys it changes. Every key is checked against the
dataclass: an unknown section or key, or a value of the wrong type, is a ValueError naming the dotted key
(and close matches).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import textwrap
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from megatron_speech.common.audio import SAMPLE_RATE
from megatron_speech.models.wav2vec2.config import Wav2Vec2Config

Precision = Literal["fp32", "bf16", "fp16"]
Recompute = Literal["none", "full", "selective"]
WandbMode = Literal["offline", "online", "disabled"]
FinetuneTask = Literal["none", "phoneme", "asr", "speaker", "emotion"]
SaveErrorPolicy = Literal["stop", "continue"]


@dataclass
class DataConfig:
    """Pre-training data: shards, batching, cropping and augmentation."""

    prefix: list[str] = field(default_factory=list)
    """Output prefixes of tools/preprocess_audio.py (shards PREFIX_train_NNNNN.{bin,idx}); several to mix; a glob
    pattern (`/data/cv_part*`) stands for every prefix whose manifest it matches (a Slurm array's parts)."""
    weights: list[float] = field(default_factory=list)
    """Relative mixing weight per prefix (one each); empty = in proportion to each prefix's audio."""
    valid_prefix: list[str] = field(default_factory=list)
    """Prefixes whose PREFIX_valid_NNNNN shards are evaluated; empty = the valid shards of data.prefix."""
    max_tokens: int = 1_200_000
    """Budget of a micro-batch, in samples after cropping (1.2M = 75 s: wav2vec 2.0 LARGE's per-GPU batch)."""
    min_sample_seconds: float = 2.0
    """Utterances shorter than this, in seconds, are skipped (and counted) by the dataset."""
    max_sample_seconds: float = 20.0
    """Longest crop, in seconds; a batch is randomly cropped to its shortest utterance, at most this long."""
    normalize: bool = True
    """Per-utterance waveform normalization to zero mean, unit variance (as the layer-norm family expects)."""
    normalize_eps: float = 1e-5
    """Variance epsilon of that normalization: fairseq's 1e-5 (HF's extractor: 1e-7; matters for silence)."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0 = load in the training process)."""
    speed_perturb: list[float] = field(default_factory=lambda: [0.9, 1.0, 1.1])
    """Speed factors, one drawn uniformly per utterance (resampling, pitch changes too); empty = off."""
    noise_dir: str = ""
    """Folder in MUSAN layout (noise/, music/, speech/) of additive noise; empty = off."""
    noise_prob: float = 0.5
    """Probability that an utterance gets additive noise (when noise_dir is set)."""
    noise_snr_db: tuple[float, float] = (0.0, 15.0)
    """(low, high) SNR in dB of the noise/ class, drawn uniformly per noisy utterance (Kaldi's MUSAN: 0-15)."""
    noise_types: list[str] = field(default_factory=lambda: ["noise", "music", "babble"])
    """Additive noise kinds, one drawn uniformly per noisy utterance: noise/, music/, babble (speech/ mixed)."""
    music_snr_db: tuple[float, float] = (5.0, 15.0)
    """(low, high) SNR in dB of the music/ class (Kaldi's MUSAN recipe: 5-15)."""
    babble_snr_db: tuple[float, float] = (13.0, 20.0)
    """(low, high) SNR in dB of each speech file mixed into babble (Kaldi's MUSAN recipe: 13-20)."""
    babble_num_speakers: tuple[int, int] = (3, 7)
    """(min, max) speech/ files summed into one babble noise, drawn uniformly (Kaldi: 3-7)."""
    sampling_alpha: float = 0.5
    """Language temperature (XLSR): p_l ~ (hours_l / total)^alpha; 1 = natural, 0 = uniform; data.weights wins."""


@dataclass
class OptimConfig:
    """Adam, learning-rate schedule (linear warmup, then polynomial decay) and gradient clipping."""

    lr: float = 5e-4
    """Peak learning rate, reached at the end of warmup."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.98
    """Adam beta2 (0.98, not 0.999: fairseq's wav2vec 2.0 value)."""
    adam_eps: float = 1e-6
    """Adam epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to biases and norm parameters."""
    warmup_steps: int = 32_000
    """Linear warmup from 0 to lr, in optimizer steps (8% of the 400k horizon, as wav2vec 2.0)."""
    decay_steps: int = 400_000
    """Step at which the polynomial decay reaches min_lr (counted from step 0, warmup included)."""
    decay_power: float = 1.0
    """Power of the polynomial decay (1.0 = linear)."""
    min_lr: float = 0.0
    """Learning rate at and after decay_steps."""
    clip_grad: float = 10.0
    """Clip the global gradient L2 norm to this value; 0 = no clipping."""


@dataclass
class TrainConfig:
    """Training loop: steps, precision, checkpoints, evaluation, alarms and recompute."""

    max_steps: int = 400_000
    """Optimizer steps to train for."""
    num_micro_batches: int = 4
    """Micro-batches per step on each DP rank (gradient accumulation); 32 ranks x 4 x 1.2M samples = 2.7 h."""
    seed: int = 1
    """Seed of the masks, negatives, data order, dropout and init (all derived, nothing else to set)."""
    precision: Precision = "fp16"
    """Compute precision: "fp32", "bf16" or "fp16" (dynamic loss scaling); norms and losses stay fp32."""
    initial_loss_scale: float = 65536.0
    """fp16 only: dynamic loss scale at step 0."""
    min_loss_scale: float = 1.0
    """fp16 only: floor of the dynamic loss scale."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the loss scale doubles."""
    loss_scale_hysteresis: int = 2
    """fp16 only: overflowing steps tolerated before the loss scale halves."""
    loss_scale_floor_steps: int = 100
    """fp16 only: stop, suggesting bf16, after this many steps in a row at min_loss_scale; 0 = off."""
    save_dir: str = "runs/xl"
    """Checkpoints (<save_dir>/iter_NNNNNNN/, <save_dir>/latest) and metrics go here."""
    save_interval: int = 10_000
    """Save every this many steps (also on signal and at the end); 0 = only at the end and on signal."""
    keep_last: int = 3
    """Checkpoints kept in save_dir (the oldest are deleted after a save completes); 0 = keep all."""
    resume: bool = True
    """Resume from <save_dir>/latest when it exists; False starts at step 0, ignoring existing checkpoints."""
    init_checkpoint: str = ""
    """A checkpoint (ours, or tools/convert_from_hf.py's) whose model weights start a fresh run; ignored when
    save_dir already holds a checkpoint to resume. Empty = random initialization."""
    eval_interval: int = 10_000
    """Evaluate on the valid shards every this many steps; 0 = never (then the eval alarms must be off)."""
    eval_iters: int = 50
    """Micro-batches per DP rank in one evaluation."""
    log_interval: int = 100
    """Write a metrics line (metrics.jsonl, wandb) every this many steps."""
    ema_decay: float = 0.9999
    """Decay per step of an exponential moving average of the weights, saved with checkpoints; 0 = off."""
    early_stop_patience: int = 5
    """Stop after this many evaluations in a row without a lower valid loss; 0 = off."""
    max_bad_steps: int = 20
    """Stop after this many steps in a row with a NaN/inf loss or gradient (each skipped, on every rank); fp16
    overflows do not count (the loss-scale floor policy watches those)."""
    perplexity_floor_fraction: float = 0.05
    """Code-collapse alarm: valid code perplexity below this fraction of G x V (the codebook size)..."""
    perplexity_floor_evals: int = 3
    """...for this many evaluations in a row stops the run; 0 = off."""
    exit_on_signal: bool = True
    """On SIGUSR1/SIGTERM: finish the step (all ranks at the same step), save, exit with the requeue code."""
    collective_timeout_seconds: float = 600.0
    """Seconds a collective (all-reduce, barrier, checkpoint exchange) may wait for a peer before failing: a dead
    or stuck rank then stops the job (exit 4) instead of hanging it. Must exceed the slowest save and evaluation."""
    on_save_error: SaveErrorPolicy = "stop"
    """A checkpoint save fails (disk full, unwritable): "stop" (exit 5) or "continue" training and retry at the
    next save; either way <save_dir>/latest keeps naming the previous complete checkpoint."""
    recompute_transformer: Recompute = "none"
    """Transformer activation recompute: "none", "full" (whole layers) or "selective" (attention core)."""
    recompute_num_layers: int = 1
    """With recompute_transformer="full": layers per recomputed chunk (megatron-core's uniform method)."""
    recompute_conv: bool = False
    """Recompute the conv feature encoder in backward (its activations: ~1/3 of the total at 20 s crops)."""


@dataclass
class ParallelConfig:
    """Parallel layout. Data-parallel size = world size / tensor_model_parallel_size (no pipeline)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel ranks; must divide the attention heads, the FFN width and the world size."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism; ignored (treated as False) when tensor_model_parallel_size is 1."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state and master weights over DP ranks (megatron-core distributed optimizer)."""
    overlap_grad_reduce: bool = True
    """Overlap the DP gradient reduce with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the parameter all-gather with the next forward (needs distributed optimizer + grad overlap). Weights are
    gathered at once before anything reads them (EMA update, evaluation, save): with train.ema_decay > 0 that is
    every step, so the overlap pays only without EMA."""

    @property
    def sequence_parallel_enabled(self) -> bool:
        """What to pass to megatron-core: it refuses sequence_parallel without TP, so TP=1 turns it off.

        Why a no-op rather than an error: a config trained at TP=2 + SP must load unchanged at TP=1.
        """
        return self.sequence_parallel and self.tensor_model_parallel_size > 1


@dataclass
class LoggingConfig:
    """Metrics destinations."""

    wandb: bool = False
    """Also log metrics to Weights & Biases."""
    wandb_project: str = "megatron-speech"
    """W&B project name."""
    wandb_run_name: str = ""
    """W&B run name; empty = the last component of train.save_dir."""
    wandb_mode: WandbMode = "offline"
    """W&B mode: "offline" (sync later with `wandb sync`), "online" or "disabled"."""
    metrics_file: str = "metrics.jsonl"
    """File name, inside train.save_dir, of the JSON-lines metrics (one object per logged step)."""


@dataclass
class FinetuneConfig:
    """Fine-tuning (python -m megatron_speech.finetune): task, labels, head, freezing, masking. Unused by pretrain."""

    task: FinetuneTask = "none"
    """Task: phoneme (CTC over phonemes, PER), asr (CTC over characters, WER/CER), speaker / emotion (mean-pooled
    linear classifier, accuracy; emotion also unweighted accuracy); "none" = not a fine-tuning run."""
    pretrained: str = ""
    """Checkpoint (ours, a fine-tuned one, or tools/convert_from_hf.py's) whose encoder starts fine-tuning; the
    model section and waveform normalization come from it. "" or "none" = an untrained encoder (scratch_config)."""
    pretrained_ema: bool = False
    """Start from the pretrained checkpoint's EMA weights instead of its raw ones."""
    scratch_config: str = "configs/tiny.yaml"
    """Without a pretrained checkpoint: config file whose model section (and data normalization) builds the untrained
    encoder; a relative path is tried from the working directory, then from the repository root."""
    label_key: str = ""
    """Manifest key of each utterance's label; "" = the task's: phonemes, text, speaker, emotion. The demo's emotion
    stand-in is a prosody-style label: label_key=arousal_proxy (never call it emotion data)."""
    labels: list[str] = field(default_factory=list)
    """Output vocabulary: CTC tokens after the blank (index 0; asr writes the word gap as "|"), or class names;
    empty = collected from the training manifest at start. Stored in every checkpoint."""
    freeze_encoder_steps: int = 0
    """Steps at the start during which only the head (and layer weights) train: the whole encoder is frozen and out
    of the optimizer; the optimizer is rebuilt with the encoder at this step."""
    freeze_feature_encoder: bool = True
    """Keep the conv feature encoder frozen for the whole run (fairseq's feature_grad_mult=0 when fine-tuning)."""
    layer_weighting: bool = False
    """Feed the head a learned softmax-weighted sum of the hidden states (SUPERB): the positional-conv output and
    every layer's output (transformers' >= 5 hidden_states[0..L]), instead of the final (LayerNorm'ed) output."""
    final_dropout: float = 0.0
    """Dropout on the head's input during training (transformers' final_dropout)."""
    mask_prob: float = 0.0
    """Probability that a frame starts a masked time span while fine-tuning (fairseq: 0.5-0.75); 0 = off. Padded
    frames are never masked."""
    mask_length: int = 10
    """Masked time span length, in frames (20 ms each)."""
    mask_channel_prob: float = 0.0
    """Probability that a hidden channel starts a masked channel span while fine-tuning; 0 = off."""
    mask_channel_length: int = 64
    """Masked channel span length, in channels (at most model.hidden_size)."""

    @property
    def pretrained_path(self) -> str:
        """The pretrained checkpoint, or "" for an untrained encoder ("none" means "")."""
        return "" if self.pretrained.strip().lower() in ("", "none") else self.pretrained

    @property
    def task_label_key(self) -> str:
        """The manifest key read as the label: label_key, or the task's default."""
        defaults = {"phoneme": "phonemes", "asr": "text", "speaker": "speaker", "emotion": "emotion"}
        return self.label_key or defaults.get(self.task, "")


@dataclass
class Config:
    """A whole run: model and objective, data, optimizer, training loop, parallel layout, logging."""

    model: Wav2Vec2Config = field(default_factory=Wav2Vec2Config)
    """Architecture and pre-training objective."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, batching, augmentation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop, checkpoints, alarms."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics destinations."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fine-tuning task and head (python -m megatron_speech.finetune); unused by pre-training."""

    def validate(self, world_size: int | None = None) -> None:
        """Check cross-field rules; raise one ValueError listing every problem (each names its dotted key).

        world_size: total ranks, when known (before process groups form): TP must divide it.
        """
        problems: list[str] = []
        # Every float finite first: inf passes the lower bounds below (and breaks the arithmetic of the rest),
        # NaN passes any rule phrased as what must not hold.
        for section in _sections():
            for name, value in vars(getattr(self, section)).items():
                if any(isinstance(v, float) and not math.isfinite(v)
                       for v in (value if isinstance(value, (list, tuple)) else [value])):
                    problems.append(f"{section}.{name}={value} must be a finite number")
        if problems:
            raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))
        try:
            self.model.validate()
        except ValueError as e:
            problems.append(str(e))
        except ArithmeticError:  # a zero size it divides by: the size checks below name it
            pass
        m, d, o, t, p, lg = self.model, self.data, self.optim, self.train, self.parallel, self.logging

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        def positive(section: object, prefix: str, *names: str, allow_zero: bool = False) -> None:
            for name in names:
                v = getattr(section, name)
                ok = v >= 0 if allow_zero else v > 0
                need(ok, f"{prefix}.{name}={v} must be {'>= 0' if allow_zero else '> 0'}")

        # --- model sizes the model's own validate() leaves to us
        positive(m, "model", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                 "final_dim", "num_codevector_groups", "num_codevectors_per_group", "codevector_dim",
                 "pos_conv_kernel", "pos_conv_groups", "logit_temperature", "gumbel_min_temperature",
                 "layer_norm_eps")
        positive(m, "model", "mask_min_masks", "diversity_loss_weight", "feature_penalty_weight",
                 "feature_grad_mult", allow_zero=True)
        need(m.gumbel_min_temperature <= m.gumbel_max_temperature,
             f"model.gumbel_min_temperature={m.gumbel_min_temperature} must be <= "
             f"model.gumbel_max_temperature={m.gumbel_max_temperature}")
        need(0.0 < m.gumbel_temperature_decay <= 1.0,
             f"model.gumbel_temperature_decay={m.gumbel_temperature_decay} must be in (0, 1]")
        conv_ok = bool(m.conv_layers) and all(min(layer) > 0 for layer in m.conv_layers)
        need(conv_ok, f"model.conv_layers={m.conv_layers}: needs at least one (channels, kernel, stride) "
                      "block, all positive")

        # --- tensor parallelism: checked before any process group forms (DESIGN §3 Layouts)
        tp = p.tensor_model_parallel_size
        need(tp >= 1, f"parallel.tensor_model_parallel_size={tp} must be >= 1")
        if tp >= 1:
            for name in ("num_attention_heads", "ffn_hidden_size"):
                v = getattr(m, name)
                need(v % tp == 0, f"parallel.tensor_model_parallel_size={tp} must divide model.{name}={v}; "
                                  f"pick a divisor of {v}")
            if world_size is not None:
                need(world_size % tp == 0,
                     f"parallel.tensor_model_parallel_size={tp} must divide the world size {world_size} "
                     "(data-parallel size = world size / TP)")
        need(not p.overlap_param_gather or p.use_distributed_optimizer,
             "parallel.overlap_param_gather=True needs parallel.use_distributed_optimizer=True")
        need(not p.overlap_param_gather or p.overlap_grad_reduce,
             "parallel.overlap_param_gather=True needs parallel.overlap_grad_reduce=True")

        # --- data
        need(not d.weights or len(d.weights) == len(d.prefix),
             f"data.weights has {len(d.weights)} entries but data.prefix has {len(d.prefix)}: give one "
             "weight per prefix, or none (data.weights=[]) to mix in proportion to the audio")
        need(all(w >= 0 for w in d.weights) and (not d.weights or sum(d.weights) > 0),
             f"data.weights={d.weights} must be >= 0 with a positive sum")
        positive(d, "data", "max_tokens", "min_sample_seconds", "max_sample_seconds", "normalize_eps")
        positive(d, "data", "num_workers", allow_zero=True)
        need(d.min_sample_seconds <= d.max_sample_seconds,
             f"data.min_sample_seconds={d.min_sample_seconds} must be <= data.max_sample_seconds="
             f"{d.max_sample_seconds}")
        max_crop_samples = round(d.max_sample_seconds * SAMPLE_RATE)
        # Why: the batcher may then assume any cropped utterance fits a micro-batch on its own.
        need(d.max_tokens >= max_crop_samples,
             f"data.max_tokens={d.max_tokens} samples is less than one longest crop "
             f"(data.max_sample_seconds={d.max_sample_seconds} s = {max_crop_samples} samples): raise "
             "max_tokens or lower max_sample_seconds")
        need(all(f > 0 for f in d.speed_perturb),
             f"data.speed_perturb={d.speed_perturb}: factors must be > 0")
        need(0.0 <= d.noise_prob <= 1.0, f"data.noise_prob={d.noise_prob} must be in [0, 1]")
        for name in ("noise_snr_db", "music_snr_db", "babble_snr_db", "babble_num_speakers"):
            low, high = getattr(d, name)
            need(low <= high, f"data.{name}={list(getattr(d, name))}: low must be <= high")
        need(d.babble_num_speakers[0] >= 1,
             f"data.babble_num_speakers={list(d.babble_num_speakers)}: at least 1 speech file per babble")
        kinds = ("noise", "music", "babble")
        need(all(k in kinds for k in d.noise_types) and (bool(d.noise_types) or not d.noise_dir),
             f"data.noise_types={d.noise_types}: entries must be among {list(kinds)}, at least one when "
             "data.noise_dir is set")
        need(d.sampling_alpha >= 0, f"data.sampling_alpha={d.sampling_alpha} must be >= 0 (1 = natural "
                                    "proportions, 0 = uniform over languages)")

        # --- masking must fit the shortest crop (and every TP rank needs at least one frame)
        if conv_ok and d.min_sample_seconds > 0 and tp >= 1:
            min_frames = m.num_frames(round(d.min_sample_seconds * SAMPLE_RATE))
            need(min_frames >= tp,
                 f"data.min_sample_seconds={d.min_sample_seconds} gives {min_frames} frames, fewer than "
                 f"parallel.tensor_model_parallel_size={tp}: every TP rank needs at least one frame")
            span = m.mask_length_frames
            need(m.mask_min_masks * span < min_frames,
                 f"model.mask_min_masks={m.mask_min_masks} spans of {span} frames "
                 f"(model.mask_length / mask_length_ms) cover the whole shortest crop of {min_frames} frames "
                 f"(data.min_sample_seconds={d.min_sample_seconds}): shorten the spans or raise "
                 "min_sample_seconds")

        # --- optimizer and schedule (megatron's OptimizerParamScheduler asserts these; say it in words first)
        positive(o, "optim", "adam_eps")
        # lr = 0 is legitimate: a frozen run (evaluation, probing, forcing a plateau)
        positive(o, "optim", "lr", "weight_decay", "warmup_steps", "min_lr", "clip_grad", allow_zero=True)
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(o, name)
            need(0.0 <= v < 1.0, f"optim.{name}={v} must be in [0, 1)")
        need(o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be <= optim.lr={o.lr}")
        need(o.decay_power > 0, f"optim.decay_power={o.decay_power} must be > 0")
        need(o.decay_steps > o.warmup_steps,
             f"optim.decay_steps={o.decay_steps} must be > optim.warmup_steps={o.warmup_steps}")

        # --- training loop
        positive(t, "train", "max_steps", "num_micro_batches", "eval_iters", "log_interval", "max_bad_steps",
                 "loss_scale_window", "loss_scale_hysteresis", "initial_loss_scale", "min_loss_scale")
        positive(t, "train", "save_interval", "keep_last", "eval_interval", "early_stop_patience",
                 "perplexity_floor_evals", "loss_scale_floor_steps", "seed", allow_zero=True)
        positive(t, "train", "collective_timeout_seconds")
        need(t.min_loss_scale <= t.initial_loss_scale,
             f"train.min_loss_scale={t.min_loss_scale} must be <= "
             f"train.initial_loss_scale={t.initial_loss_scale}")
        need(0.0 <= t.ema_decay < 1.0, f"train.ema_decay={t.ema_decay} must be in [0, 1) (0 = off)")
        need(0.0 <= t.perplexity_floor_fraction < 1.0,
             f"train.perplexity_floor_fraction={t.perplexity_floor_fraction} must be in [0, 1)")
        if t.eval_interval == 0:
            # Both alarms count evaluations: without evaluations they would silently never fire.
            need(t.early_stop_patience == 0, "train.early_stop_patience > 0 needs evaluations: set "
                                             "train.eval_interval > 0 or train.early_stop_patience=0")
            need(t.perplexity_floor_evals == 0, "train.perplexity_floor_evals > 0 needs evaluations: set "
                                                "train.eval_interval > 0 or train.perplexity_floor_evals=0")
        if t.recompute_transformer == "full":
            need(1 <= t.recompute_num_layers <= m.num_layers,
                 f"train.recompute_num_layers={t.recompute_num_layers} must be in [1, model.num_layers="
                 f"{m.num_layers}] with train.recompute_transformer='full'")

        # --- fine-tuning (only checked for a fine-tuning run)
        ft = self.finetune
        if ft.task != "none":
            positive(ft, "finetune", "freeze_encoder_steps", allow_zero=True)
            positive(ft, "finetune", "mask_length", "mask_channel_length")
            for name in ("mask_prob", "mask_channel_prob", "final_dropout"):
                v = getattr(ft, name)
                need(0.0 <= v < 1.0, f"finetune.{name}={v} must be in [0, 1)")
            need(ft.mask_channel_length <= m.hidden_size,
                 f"finetune.mask_channel_length={ft.mask_channel_length} must be <= model.hidden_size={m.hidden_size}")
            need(len(set(ft.labels)) == len(ft.labels), f"finetune.labels has duplicates: {ft.labels}")
            need(not d.speed_perturb, f"data.speed_perturb={d.speed_perturb}: fine-tuning never crops labeled audio, "
                                      "and speed perturbation would; set data.speed_perturb=[]")
            need(t.perplexity_floor_evals == 0, "train.perplexity_floor_evals must be 0 when fine-tuning (the "
                                                "quantizer is not used)")

        # --- choices (checked by type on load; repeated here for configs built in code)
        for key, value, choices in (("train.precision", t.precision, Precision),
                                    ("train.recompute_transformer", t.recompute_transformer, Recompute),
                                    ("logging.wandb_mode", lg.wandb_mode, WandbMode),
                                    ("train.on_save_error", t.on_save_error, SaveErrorPolicy),
                                    ("finetune.task", self.finetune.task, FinetuneTask)):
            need(value in get_args(choices), f"{key}={value!r} must be one of {list(get_args(choices))}")

        if problems:
            raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------------------------------------------------
# Schema: sections, field types, attribute docstrings


def _sections() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right after each field), from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def all_keys() -> list[str]:
    """Every dotted key, `section.field`, in declaration order."""
    return [f"{s}.{name}" for s, cls in _sections().items() for name in _field_types(cls)]


def type_name(tp: Any) -> str:
    """Readable name of a field type: `list[tuple[int, int, int]]`, `float | None`, `one of 'fp32', ...`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"tuple[{type_name(args[0])}, ...]"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


# ------------------------------------------------------------------------------------------------------------
# Coercion of parsed YAML values to field types


def _type_error(key: str, value: Any, tp: Any, hint: str = "") -> ValueError:
    msg = f"{key}={value!r} ({type(value).__name__}): expected {type_name(tp)}"
    return ValueError(msg + (f"; {hint}" if hint else ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value converted to type tp, or raise ValueError naming key, the value and the expected type."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        raise _type_error(key, value, tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                pass
        raise _type_error(key, value, tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _type_error(key, value, tp)
    if tp is bool:
        # No 0/1 or "yes"-strings beyond YAML's own booleans: `sequence_parallel=1` is more likely a typo.
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, tp, "write true or false")
    if tp is int:
        if isinstance(value, bool):
            raise _type_error(key, value, tp)
        if isinstance(value, int):
            return value
        # YAML 1.1 reads `1e5` as a string and `1.0e+5` as a float: accept both when integral.
        number = _as_float(value)
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)
        raise _type_error(key, value, tp)
    if tp is float:
        if isinstance(value, bool):
            raise _type_error(key, value, tp)
        if isinstance(value, (int, float)):
            return float(value)
        number = _as_float(value)  # `5e-4` is a string to YAML 1.1
        if number is not None:
            return number
        raise _type_error(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, tp, "quote it")
    if origin is list:
        (elem,) = args
        if not isinstance(value, (list, tuple)):
            scalar = isinstance(value, (str, int, float)) and not isinstance(value, bool)
            if scalar and get_origin(elem) is None:
                value = [value]  # `data.prefix=/data/en` means a one-element list
            else:
                raise _type_error(key, value, tp, "write a YAML list, e.g. [a, b]")
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, tp, "write tuples as YAML lists, [a, b], not (a, b)")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _type_error(key, value, tp, f"needs exactly {len(args)} entries")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"{key}: unsupported field type {tp!r}")  # a schema bug, not a user error


def _as_float(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    if isinstance(value, float):
        return value
    return None


# ------------------------------------------------------------------------------------------------------------
# Applying YAML mappings, dicts and overrides


def _unknown_key_error(key: str, source: str, what: str = "key") -> ValueError:
    keys = all_keys()
    candidates = list(_sections()) if "." not in key else keys
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    # Right name, wrong (or missing) section: `optim.max_steps`, `max_steps`.
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in close]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"{source}: unknown {what} {key!r}{hint} (`--help` lists every key)")


def _resolve(key: str, source: str) -> tuple[str, str, Any]:
    """Split `section.name`; return (section, name, field type). Unknown: ValueError with close matches."""
    sections = _sections()
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in sections or parts[1] not in _field_types(sections[parts[0]]):
        raise _unknown_key_error(key, source)
    section, name = parts
    return section, name, _field_types(sections[section])[name]


def _set(cfg: Config, key: str, value: Any, source: str) -> None:
    section, name, tp = _resolve(key, source)
    try:
        coerced = _coerce(value, tp, key)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    setattr(getattr(cfg, section), name, coerced)


def _after_assignments(cfg: Config, keys: set[str]) -> None:
    # mask_length (frames) and mask_length_ms are two units of one quantity, and ms wins inside the model
    # config; make the last source win instead: a source that sets only the frames clears an earlier ms.
    if "model.mask_length" in keys and "model.mask_length_ms" not in keys:
        cfg.model.mask_length_ms = None


def _apply_mapping(cfg: Config, mapping: Any, source: str) -> None:
    """Apply a nested {section: {key: value}} mapping (a YAML file or a stored dict) onto cfg."""
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        raise ValueError(f"{source}: expected a mapping of sections ({', '.join(_sections())}), "  # noqa: TRY004
                         f"got {type(mapping).__name__}")
    assigned: set[str] = set()
    for section, values in mapping.items():
        if not isinstance(section, str) or section not in _sections():
            raise _unknown_key_error(str(section), source, what="section")
        if values is None:  # `data:` with nothing under it
            continue
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping of keys, got {values!r}")  # noqa: TRY004
        for name, value in values.items():
            key = f"{section}.{name}"
            _set(cfg, key, value, source)
            assigned.add(key)
    _after_assignments(cfg, assigned)


def apply_override(cfg: Config, override: str) -> None:
    """Apply one `section.key=value` override; the value is YAML (`[0.9, 1.1]`, `true`, `null`, `5e-4`)."""
    if "=" not in override:
        raise ValueError(f"override {override!r}: expected section.key=value, e.g. train.max_steps=100")
    key, raw = override.split("=", 1)
    key = key.strip()
    source = f"override {override!r}"
    _, _, tp = _resolve(key, source)
    if tp is str and not raw.strip().startswith(("'", '"')):
        value: Any = raw  # a path or name verbatim: `save_dir=runs/007`, `noise_dir=` (empty = off)
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"{source}: cannot parse the value {raw!r} as YAML ({e.__class__.__name__}); "
                             f"expected {type_name(tp)}") from None
    _set(cfg, key, value, source)
    _after_assignments(cfg, {key})


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ValueError(f"{node.start_mark.name}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str | None, overrides: Sequence[str] = (), base: Config | None = None,
                validate: bool = True) -> Config:
    """Dataclass defaults (or a copy of `base`), then the YAML file at path (if any), then each `section.key=value`
    in order.

    Returns a Config that passed validate() without a world size (unless validate=False, for a first look at a
    few keys); call cfg.validate(world_size) once known. Fine-tuning passes the pretrained checkpoint's config as
    `base`, so the file and overrides apply on top of its model section.
    Raises ValueError for unknown keys, wrong types and broken rules, naming the dotted key.
    """
    cfg = copy.deepcopy(base) if base is not None else Config()
    if path is not None:
        with open(path) as f:
            mapping = yaml.load(f, Loader=_StrictLoader)  # a SafeLoader subclass
        _apply_mapping(cfg, mapping, path)
    for override in overrides:
        apply_override(cfg, override)
    if validate:
        cfg.validate()
    return cfg


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Nested {section: {key: value}} of plain JSON/YAML types (tuples become lists); see config_from_dict."""
    return {s: {f.name: _plain(getattr(getattr(cfg, s), f.name)) for f in dataclasses.fields(getattr(cfg, s))}
            for s in _sections()}


def config_from_dict(mapping: dict[str, Any], source: str = "stored config") -> Config:
    """Config from a config_to_dict mapping (missing keys keep defaults; unknown keys raise ValueError)."""
    cfg = Config()
    _apply_mapping(cfg, mapping, source)
    return cfg


# ------------------------------------------------------------------------------------------------------------
# Help and command line


def format_help(cfg: Config) -> str:
    """Every dotted key with its type, its value in cfg (and the default when different) and its docstring."""
    lines = ["Configuration keys (override with section.key=value; values are YAML):"]
    defaults = Config()
    for section, cls in _sections().items():
        lines.append("")
        lines.append(f"{section}: {(inspect.getdoc(cls) or '').splitlines()[0]}")
        docs = field_docs(cls)
        for name, tp in _field_types(cls).items():
            value = _plain(getattr(getattr(cfg, section), name))
            default = _plain(getattr(getattr(defaults, section), name))
            shown = f"{value!r}" + (f" (default {default!r})" if value != default else "")
            lines.append(f"  {section}.{name}: {type_name(tp)} = {shown}")
            lines.append(f"      {docs.get(name, '(undocumented)')}")
    return "\n".join(lines)


def parse_cli(argv: Sequence[str]) -> tuple[str | None, list[str], bool]:
    """Split driver arguments into (config path or None, `key=value` overrides, help requested).

    Accepts `--config PATH`, `--config=PATH`, `--help`/`-h` and `key=value`; anything else is a ValueError.
    """
    config_path: str | None = None
    overrides: list[str] = []
    help_requested = False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            help_requested = True
        elif arg == "--config" or arg.startswith("--config="):
            if config_path is not None:
                raise ValueError(f"--config given twice ({config_path!r} and {arg!r}): give one file")
            if arg == "--config":
                if i + 1 >= len(args) or args[i + 1].startswith("-"):
                    raise ValueError("--config needs a path: --config configs/NAME.yaml")
                i += 1
                config_path = args[i]
            else:
                config_path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ValueError(f"unexpected argument {arg!r}: expected --config PATH, --help or "
                             "section.key=value")
        i += 1
    return config_path, overrides, help_requested

