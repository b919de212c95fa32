"""Configuration rules that need two sections, or the world size: what tensor parallelism must divide, whether
masking fits the shortest crop, recompute against the model's depth, the tri_stage phases against the run's length,
the best metric against what the run's evaluation reports, and what fine-tuning asks of the others.
Each returns its broken rules; Config.validate (run.py) collects them with the sections' own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_speech.common.audio import SAMPLE_RATE
from megatron_speech.config.engine import Problems
from megatron_speech.config.schema import conv_layers_ok

if TYPE_CHECKING:
    from megatron_speech.config.run import Config


def tensor_parallel_problems(cfg: Config, world_size: int | None) -> Problems:
    """TP must divide the heads, the FFN width and the world size: checked before any process group forms
    (docs/design.md §3 Layouts). A TP below 1 is parallel's own problem (ParallelConfig.problems)."""
    m, tp, problems = cfg.model, cfg.parallel.tensor_model_parallel_size, Problems()
    if tp >= 1:
        for name in ("num_attention_heads", "ffn_hidden_size"):
            v = getattr(m, name)
            problems.need(v % tp == 0, f"parallel.tensor_model_parallel_size={tp} must divide model.{name}={v}; "
                                       f"pick a divisor of {v}")
        if world_size is not None:
            problems.need(world_size % tp == 0,
                          f"parallel.tensor_model_parallel_size={tp} must divide the world size {world_size} "
                          "(data-parallel size = world size / TP)")
    return problems


def masking_problems(cfg: Config) -> Problems:
    """Masking must fit the shortest crop, and every TP rank needs at least one frame of it."""
    m, d, tp, problems = cfg.model, cfg.data, cfg.parallel.tensor_model_parallel_size, Problems()
    if conv_layers_ok(m) and d.min_sample_seconds > 0 and tp >= 1:
        min_frames = m.num_frames(round(d.min_sample_seconds * SAMPLE_RATE))
        problems.need(min_frames >= tp,
                      f"data.min_sample_seconds={d.min_sample_seconds} gives {min_frames} frames, fewer than "
                      f"parallel.tensor_model_parallel_size={tp}: every TP rank needs at least one frame")
        span = m.mask_length_frames
        problems.need(m.mask_min_masks * span < min_frames,
                      f"model.mask_min_masks={m.mask_min_masks} spans of {span} frames "
                      f"(model.mask_length / mask_length_ms) cover the whole shortest crop of {min_frames} frames "
                      f"(data.min_sample_seconds={d.min_sample_seconds}): shorten the spans or raise "
                      "min_sample_seconds")
    return problems


def recompute_problems(cfg: Config) -> Problems:
    """Full recompute's chunk must fit the model's depth; LayerDrop rules out the overlapped param gather."""
    m, t, problems = cfg.model, cfg.train, Problems()
    if t.recompute_transformer == "full":
        # megatron's uniform method checkpoints layers [l, l + k) for l = 0, k, 2k, ...: a remainder indexes past
        # the last layer (IndexError in TransformerBlock._checkpointed_forward)
        k = t.recompute_num_layers
        problems.need(1 <= k <= m.num_layers and m.num_layers % k == 0,
                      f"train.recompute_num_layers={k} must divide model.num_layers={m.num_layers} with "
                      "train.recompute_transformer='full'")
    # megatron's overlapped param gather waits for a bucket in a forward pre-hook of the module owning its params:
    # a skipped layer's modules never run, so its bucket's all-gather is never waited for and the next step's
    # dispatch asserts (param_and_grad_buffer: param_gather_handle is None)
    problems.need(m.layerdrop == 0 or not cfg.parallel.overlap_param_gather,
                  f"model.layerdrop={m.layerdrop} needs parallel.overlap_param_gather=false (a skipped layer never "
                  "runs the hook that waits for its parameters' all-gather)")
    return problems


BEST_METRICS: dict[str, dict[str, bool]] = {
    "none": {"loss": False, "contrastive": False, "accuracy": True},
    "asr": {"wer": False, "cer": False, "loss": False},
    "phoneme": {"per": False, "loss": False},
    "speaker": {"accuracy": True, "loss": False},
    "emotion": {"accuracy": True, "unweighted_accuracy": True, "loss": False},
}
"""finetune.task ("none" = pre-training) -> the validation metrics train.best_metric may name -> whether higher is
better; the first is the default. The names are those the evaluation returns (training/step.py global_stats,
tasks/metrics.py metrics; tests check both)."""


def best_metric(cfg: Config) -> tuple[str, bool]:
    """(train.best_metric, or the run's default; whether higher is better). Raises ValueError for a name the
    run's evaluation does not report."""
    choices = BEST_METRICS[cfg.finetune.task]
    name = cfg.train.best_metric or next(iter(choices))
    if name not in choices:
        what = "pre-training" if cfg.finetune.task == "none" else f"finetune.task={cfg.finetune.task}"
        raise ValueError(f"train.best_metric={name!r} is not a validation metric of {what}: use one of "
                         f"{', '.join(choices)} (or \"\" for {next(iter(choices))})")
    return name, choices[name]


def training_problems(cfg: Config) -> Problems:
    """The tri_stage schedule's phases in train.max_steps, and train.best_metric against the task."""
    o, t, problems = cfg.optim, cfg.train, Problems()
    if o.lr_schedule == "tri_stage":
        # fairseq's int(max_update x ratio): megatron's scheduler needs a step after warmup, fairseq's decay one
        decay_steps = int(t.max_steps * o.phase_ratio[2])
        problems.need(decay_steps >= 1, f"optim.phase_ratio={list(o.phase_ratio)} gives {decay_steps} decay steps "
                                        f"of train.max_steps={t.max_steps}: the decay phase needs at least one")
    if cfg.finetune.task in BEST_METRICS:  # else choice_problems names the task
        try:
            best_metric(cfg)
        except ValueError as e:
            problems.append(str(e))
    return problems


def finetune_problems(cfg: Config) -> Problems:
    """What a fine-tuning run (finetune.task set) asks of the model, data and train sections."""
    ft, m, d, t, problems = cfg.finetune, cfg.model, cfg.data, cfg.train, Problems()
    if ft.task == "none":
        return problems
    problems.need(ft.mask_channel_length <= m.hidden_size,
                  f"finetune.mask_channel_length={ft.mask_channel_length} must be <= model.hidden_size={m.hidden_size}")
    problems.need(not d.speed_perturb, f"data.speed_perturb={d.speed_perturb}: fine-tuning never crops labeled "
                                       "audio, and speed perturbation would; set data.speed_perturb=[]")
    problems.need(t.perplexity_floor_evals == 0, "train.perplexity_floor_evals must be 0 when fine-tuning (the "
                                                 "quantizer is not used)")
    return problems
