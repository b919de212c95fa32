"""The run configuration's sections (data, optimizer, training loop, parallel layout, logging, fine-tuning) as
typed dataclasses, each checking its own fields; the model section is models/wav2vec2/config.py's dataclass, whose
checks beyond its own validate() are model_problems here. Dataclass defaults are the XL recipe (docs/design.md §6).

Rules that need two sections or the world size are in rules.py; the root dataclass in run.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_speech.common.audio import SAMPLE_RATE
from megatron_speech.config.engine import Problems
from megatron_speech.models.wav2vec2.config import Wav2Vec2Config

Precision = Literal["fp32", "bf16", "fp16"]
Recompute = Literal["none", "full", "selective"]
WandbMode = Literal["offline", "online", "disabled"]
FinetuneTask = Literal["none", "phoneme", "asr", "speaker", "emotion"]
SaveErrorPolicy = Literal["stop", "continue"]
LrSchedule = Literal["linear", "tri_stage"]


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

    def problems(self) -> Problems:
        """This section's broken rules."""
        d, problems = self, Problems()
        need = problems.need
        need(not d.weights or len(d.weights) == len(d.prefix),
             f"data.weights has {len(d.weights)} entries but data.prefix has {len(d.prefix)}: give one "
             "weight per prefix, or none (data.weights=[]) to mix in proportion to the audio")
        need(all(w >= 0 for w in d.weights) and (not d.weights or sum(d.weights) > 0),
             f"data.weights={d.weights} must be >= 0 with a positive sum")
        problems.positive(d, "data", "max_tokens", "min_sample_seconds", "max_sample_seconds", "normalize_eps")
        problems.positive(d, "data", "num_workers", allow_zero=True)
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
        return problems


@dataclass
class OptimConfig:
    """Adam, learning-rate schedule (linear: warmup then linear decay; or fairseq's tri_stage) and gradient
    clipping."""

    lr: float = 5e-4
    """Peak learning rate, reached at the end of warmup."""
    lr_schedule: LrSchedule = "linear"
    """"linear": warmup_steps from 0 to lr, then linear decay to min_lr at decay_steps (megatron-core's). "tri_stage":
    fairseq's (low-resource fine-tuning): phase_ratio of train.max_steps to warm up linearly from init_lr_scale x lr,
    hold lr, decay exponentially to final_lr_scale x lr, then stay there; warmup_steps, decay_steps, min_lr unused."""
    phase_ratio: tuple[float, float, float] = (0.1, 0.4, 0.5)
    """tri_stage only: [warmup, hold, decay] fractions of train.max_steps (>= 0, summing to 1; fairseq's recipes)."""
    init_lr_scale: float = 0.01
    """tri_stage only: the warmup starts at init_lr_scale x lr."""
    final_lr_scale: float = 0.05
    """tri_stage only: the decay ends at final_lr_scale x lr, kept to the end (fairseq's recipes: 0.05)."""
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

    def problems(self) -> Problems:
        """This section's broken rules (megatron's OptimizerParamScheduler asserts these; say it in words first)."""
        o, problems = self, Problems()
        problems.positive(o, "optim", "adam_eps")
        # lr = 0 is legitimate: a frozen run (evaluation, probing, forcing a plateau)
        problems.positive(o, "optim", "lr", "weight_decay", "warmup_steps", "min_lr", "clip_grad", allow_zero=True)
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(o, name)
            problems.need(0.0 <= v < 1.0, f"optim.{name}={v} must be in [0, 1)")
        problems.need(o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be <= optim.lr={o.lr}")
        problems.need(o.decay_power > 0, f"optim.decay_power={o.decay_power} must be > 0")
        problems.need(o.decay_steps > o.warmup_steps,
                      f"optim.decay_steps={o.decay_steps} must be > optim.warmup_steps={o.warmup_steps}")
        ratio = list(o.phase_ratio)
        problems.need(all(r >= 0 for r in ratio) and abs(sum(ratio) - 1.0) < 1e-6,
                      f"optim.phase_ratio={ratio}: the [warmup, hold, decay] fractions of train.max_steps must be "
                      f">= 0 and sum to 1 (they sum to {sum(ratio):g})")
        for name in ("init_lr_scale", "final_lr_scale"):  # final: exp decay needs log(final_lr_scale)
            v = getattr(o, name)
            problems.need(0.0 < v <= 1.0, f"optim.{name}={v} must be in (0, 1] (a fraction of optim.lr)")
        return problems


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
    """Stop after this many evaluations in a row without a better train.best_metric; 0 = off."""
    best_metric: str = ""
    """Validation metric that picks the best checkpoint and that early stopping watches; "" = the run's own: the
    task's (asr wer, phoneme per, speaker / emotion accuracy) when fine-tuning, loss when pre-training. Error
    rates and losses are lower-better, accuracies higher-better (config/rules.py BEST_METRICS)."""
    keep_best: bool = False
    """Keep the checkpoint of the best evaluation apart from the keep_last rotation (saved at that step if it was
    not), named by <save_dir>/best; --checkpoint SAVE_DIR/best loads it."""
    validate_after_steps: int = 0
    """No evaluation before this step (fairseq's validate_after_updates): e.g. while the encoder is frozen."""
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

    def problems(self) -> Problems:
        """This section's broken rules; recompute_num_layers against the model's depth is in rules.py."""
        t, problems = self, Problems()
        need = problems.need
        problems.positive(t, "train", "max_steps", "num_micro_batches", "eval_iters", "log_interval",
                          "max_bad_steps", "loss_scale_window", "loss_scale_hysteresis", "initial_loss_scale",
                          "min_loss_scale")
        problems.positive(t, "train", "save_interval", "keep_last", "eval_interval", "early_stop_patience",
                          "perplexity_floor_evals", "loss_scale_floor_steps", "seed", "validate_after_steps",
                          allow_zero=True)
        problems.positive(t, "train", "collective_timeout_seconds")
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
            need(not t.keep_best, "train.keep_best=true needs evaluations: set train.eval_interval > 0 or "
                                  "train.keep_best=false")
        return problems


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

    def problems(self) -> Problems:
        """This section's broken rules; what TP must divide is in rules.py."""
        p, problems = self, Problems()
        tp = p.tensor_model_parallel_size
        problems.need(tp >= 1, f"parallel.tensor_model_parallel_size={tp} must be >= 1")
        problems.need(not p.overlap_param_gather or p.use_distributed_optimizer,
                      "parallel.overlap_param_gather=True needs parallel.use_distributed_optimizer=True")
        problems.need(not p.overlap_param_gather or p.overlap_grad_reduce,
                      "parallel.overlap_param_gather=True needs parallel.overlap_grad_reduce=True")
        return problems


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

    def problems(self) -> Problems:
        """This section's broken rules, for a fine-tuning run only (task set); those naming the model, data or
        train sections are in rules.py."""
        ft, problems = self, Problems()
        if ft.task == "none":
            return problems
        problems.positive(ft, "finetune", "freeze_encoder_steps", allow_zero=True)
        problems.positive(ft, "finetune", "mask_length", "mask_channel_length")
        for name in ("mask_prob", "mask_channel_prob", "final_dropout"):
            v = getattr(ft, name)
            problems.need(0.0 <= v < 1.0, f"finetune.{name}={v} must be in [0, 1)")
        problems.need(len(set(ft.labels)) == len(ft.labels), f"finetune.labels has duplicates: {ft.labels}")
        return problems


def conv_layers_ok(m: Wav2Vec2Config) -> bool:
    """At least one conv block, all sizes positive: what frame arithmetic (rules.py) needs."""
    return bool(m.conv_layers) and all(min(layer) > 0 for layer in m.conv_layers)


def model_problems(m: Wav2Vec2Config) -> Problems:
    """The model section's broken rules: its own validate() (which stops at the first), then the sizes it leaves
    to us."""
    problems = Problems()
    try:
        m.validate()
    except ValueError as e:
        problems.append(str(e))
    except ArithmeticError:  # a zero size it divides by: the size checks below name it
        pass
    problems.positive(m, "model", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                      "final_dim", "num_codevector_groups", "num_codevectors_per_group", "codevector_dim",
                      "pos_conv_kernel", "pos_conv_groups", "logit_temperature", "gumbel_min_temperature",
                      "layer_norm_eps")
    problems.positive(m, "model", "mask_min_masks", "diversity_loss_weight", "feature_penalty_weight",
                      "feature_grad_mult", allow_zero=True)
    problems.need(m.gumbel_min_temperature <= m.gumbel_max_temperature,
                  f"model.gumbel_min_temperature={m.gumbel_min_temperature} must be <= "
                  f"model.gumbel_max_temperature={m.gumbel_max_temperature}")
    problems.need(0.0 < m.gumbel_temperature_decay <= 1.0,
                  f"model.gumbel_temperature_decay={m.gumbel_temperature_decay} must be in (0, 1]")
    problems.need(conv_layers_ok(m), f"model.conv_layers={m.conv_layers}: needs at least one (channels, kernel, "
                                     "stride) block, all positive")
    return problems
