"""Fine-tuning the wav2vec 2.0 encoder for a downstream task, on the pre-training trainer.

    python -m megatron_speech.finetune --config configs/finetune/TASK.yaml pretrained=CKPT [key=value ...]
    torchrun --nproc-per-node N -m megatron_speech.finetune --config ...      (or srun, one task per GPU)

TASK: phoneme (CTC, PER), asr (character CTC, WER/CER), speaker (accuracy), emotion (accuracy, unweighted
accuracy; the demo's is the prosody-style `arousal_proxy` label). `pretrained=` (or `none` for an untrained
encoder) and every other key of the `finetune` section may be given bare; the rest as section.key=value
(`--help` lists them). The model section comes from the pretrained checkpoint (dropouts may be overridden); the
labels are collected from the training manifest unless finetune.labels pins them; both are stored in every
checkpoint, so `evaluate` and `tools/convert_to_hf.py` need nothing else.

Freezing: the conv feature encoder stays frozen (finetune.freeze_feature_encoder); for the first
finetune.freeze_encoder_steps steps the whole encoder is frozen and only the head trains. A frozen parameter is out
of the DDP buffers and the optimizer (weight decay would otherwise move it), so at that step the DDP wrapper,
optimizer and scheduler are rebuilt with the encoder in them (DESIGN §4: megatron's overlapped grad reduce assumes
a fixed trainable set); the schedule continues, the head's Adam moments start over.

Validation: every train.eval_interval steps on data.valid_prefix (or data.prefix's valid split), the whole split
(capped at train.eval_iters micro-batches per rank); metrics.jsonl lines carry `task` and `label_key`; early
stopping (train.early_stop_patience) watches the valid loss, and the best task metric is reported at the end.

Exit codes as pretrain (training/signals.py): 0 done or early-stopped, 75 preempted (saved; requeue), 3 diverged,
4 a peer rank died or hung, 5 a checkpoint save failed; 2 for a configuration or data error (the message names the
key or file).
"""

# ruff: noqa: E402  (the warnings filter must precede megatron-core's import, as in pretrain.py)
from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_speech.checkpoint.checkpointing import checkpoint_dir, load_checkpoint, resume_step, save_checkpoint
from megatron_speech.checkpoint.model_io import checkpoint_config, load_model_weights
from megatron_speech.config import Config, FinetuneConfig, config_to_dict, format_help, load_config, parse_cli
from megatron_speech.data.dataset import manifest_path
from megatron_speech.data.finetune_data import (
    build_finetune_loader,
    eval_batches,
    has_rows,
    labeled_split,
    min_samples_for,
)
from megatron_speech.models.wav2vec2.config import SAMPLE_RATE
from megatron_speech.models.wav2vec2.factory import build_pretraining_model, transformer_config
from megatron_speech.models.wav2vec2.heads import Wav2Vec2ForFinetuning, build_finetuning_model
from megatron_speech.tasks.metrics import primary_metric
from megatron_speech.tasks.task import Task, collect_labels
from megatron_speech.training.driver import SavePolicy, run_training
from megatron_speech.training.ema import EMA
from megatron_speech.training.finetune_step import evaluate, train_step
from megatron_speech.training.monitor import Monitor
from megatron_speech.training.optim import build_optimizer, build_scheduler
from megatron_speech.training.parallelize import sync_params, wrap_for_training
from megatron_speech.training.signals import EXIT_DIVERGED, EXIT_DONE, StopSignal

logger = logging.getLogger("megatron_speech")
ROOT = Path(__file__).resolve().parents[1]

# Model fields that define the weights: they must be the pretrained checkpoint's. The others (dropouts, the
# pre-training objective's settings) may be overridden for fine-tuning.
ARCHITECTURE = ("conv_layers", "conv_bias", "extractor_mode", "hidden_size", "num_layers", "num_attention_heads",
                "ffn_hidden_size", "layer_norm_eps", "pos_conv_kernel", "pos_conv_groups", "final_dim",
                "num_codevector_groups", "num_codevectors_per_group", "codevector_dim")


# ------------------------------------------------------------------------------------------------------------
# Configuration


def expand_bare_keys(overrides: list[str]) -> list[str]:
    """`pretrained=CKPT` -> `finetune.pretrained=CKPT` (any key of the finetune section may be given bare)."""
    fields = set(FinetuneConfig.__dataclass_fields__)
    return [f"finetune.{o}" if o.split("=", 1)[0].strip() in fields else o for o in overrides]


def resolve_config_file(path: str) -> Path:
    """A config file path as given, else relative to the repository root."""
    for candidate in (Path(path), ROOT / path):
        if candidate.is_file():
            return candidate
    raise ValueError(f"finetune.scratch_config={path!r}: no such file (tried {Path(path).resolve()} and "
                     f"{ROOT / path})")


def load_finetune_config(path: str | None, overrides: list[str]) -> Config:
    """The run's config: the pretrained checkpoint's model section (or scratch_config's) and normalization, then
    the YAML file and the overrides on top. Architecture changes against the checkpoint are refused."""
    overrides = expand_bare_keys(overrides)
    probe = load_config(path, overrides, validate=False)
    ft = probe.finetune
    if ft.task == "none":
        raise ValueError("finetune.task is 'none': set it (phoneme, asr, speaker or emotion), e.g. with "
                         "--config configs/finetune/phoneme.yaml")
    if ft.pretrained_path:
        source, what = checkpoint_config(ft.pretrained_path), f"the pretrained checkpoint {ft.pretrained_path}"
    else:
        scratch = resolve_config_file(ft.scratch_config)
        source, what = load_config(str(scratch), validate=False), f"finetune.scratch_config={scratch}"
    base = Config()
    base.model = source.model
    base.data.normalize, base.data.normalize_eps = source.data.normalize, source.data.normalize_eps
    cfg = load_config(path, overrides, base=base)
    changed = [k for k in ARCHITECTURE if getattr(cfg.model, k) != getattr(source.model, k)]
    if changed:
        raise ValueError(f"model.{changed[0]}={getattr(cfg.model, changed[0])!r} differs from {what} "
                         f"({getattr(source.model, changed[0])!r}): the architecture comes from there; remove "
                         f"model.{', model.'.join(changed)} from the fine-tuning config")
    return cfg


# ------------------------------------------------------------------------------------------------------------
# Model and trainer


def build_model(cfg: Config, task: Task, tp: int) -> Wav2Vec2ForFinetuning:
    """The encoder (pre-training model, untrained) with the task's head, on this rank."""
    t, p = cfg.train, cfg.parallel
    tconfig = transformer_config(cfg.model, tp, p.sequence_parallel_enabled, t.precision, t.recompute_transformer)
    tconfig.recompute_num_layers = t.recompute_num_layers if t.recompute_transformer == "full" else None
    wav2vec2 = build_pretraining_model(cfg.model, tconfig, recompute_conv=t.recompute_conv)
    return build_finetuning_model(wav2vec2, task.kind, task.num_outputs, cfg.finetune.layer_weighting,
                                  cfg.finetune.final_dropout, cfg.model.init_std)


def build_trainer(model: Wav2Vec2ForFinetuning, cfg: Config, frozen: bool, scheduler_steps: int = 0):
    """(DDP wrapper, optimizer, scheduler) over the trainable set of a phase: the head only while `frozen`, the
    head and the encoder (minus the conv feature encoder when finetune.freeze_feature_encoder) after."""
    ft, p = cfg.finetune, cfg.parallel
    for param in model.parameters():
        # The previous phase's non-distributed optimizer leaves `.grad` pointing into the old DDP buffer: autograd
        # would accumulate the next gradient onto it.
        param.grad = None
    model.set_trainable(encoder=not frozen, feature_encoder=not ft.freeze_feature_encoder,
                        mask_emb=ft.mask_prob > 0)
    ddp = wrap_for_training(model, p.use_distributed_optimizer, p.overlap_grad_reduce,
                            overlap_param_gather=p.overlap_param_gather)
    optimizer = build_optimizer(ddp, cfg.optim, cfg.train, p)
    scheduler = build_scheduler(optimizer, cfg.optim)
    if scheduler_steps:
        scheduler.step(increment=scheduler_steps)
    return ddp, optimizer, scheduler


def retire(ddp) -> None:
    """Disarm a DDP wrapper that a rebuild replaces. megatron-core 0.16.1 registers its gradient hooks on the
    parameters' gradient accumulators without keeping handles; they stay attached, and each starts with `if param
    in self.param_to_bucket_group`: emptying that map makes them no-ops, so the new wrapper alone handles every
    gradient (tests/test_finetune.py checks the gradients after a rebuild)."""
    if getattr(ddp, "use_forward_hook", False):  # parallel.overlap_param_gather: gather the current weights first
        ddp.disable_forward_pre_hook(param_sync=True)
    ddp.param_to_bucket_group.clear()


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------------------
# Driver


def main(argv: list[str] | None = None) -> int:
    path, overrides, want_help = parse_cli(sys.argv[1:] if argv is None else argv)
    if want_help:
        print(format_help(load_config(path, expand_bare_keys(overrides), validate=False)))
        return 0
    cfg = load_finetune_config(path, overrides)
    return run_training(cfg, train)


def train(cfg: Config, progress: dict[str, int], stop: StopSignal) -> int:
    """The fine-tuning loop on this rank (process groups formed); returns the exit code (pretrain.train's
    policies: signals, divergence, save failures)."""
    t, p, ft, d = cfg.train, cfg.parallel, cfg.finetune, cfg.data
    rank = dist.get_rank()
    tp, dp = p.tensor_model_parallel_size, parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()

    # --- data and labels
    label_key = ft.task_label_key
    min_samples = min_samples_for(d, cfg.model)
    max_samples = round(d.max_sample_seconds * SAMPLE_RATE)
    train = labeled_split(d.prefix, "train", label_key, min_samples, max_samples)
    resume_from = resume_step(t.save_dir) if t.resume else None  # falls back past a damaged checkpoint
    if resume_from is not None:
        stored = checkpoint_config(checkpoint_dir(t.save_dir, resume_from)).finetune.labels
        if ft.labels and ft.labels != stored:
            raise ValueError(f"finetune.labels differ from those of the run in {t.save_dir} being resumed: drop the "
                             "override, or train into another train.save_dir")
        ft.labels = list(stored)
    if not ft.labels:
        ft.labels = collect_labels(ft.task, train.labels)
    task = Task.from_config(ft)
    valid = None
    if t.eval_interval > 0:
        if d.valid_prefix:
            valid = labeled_split(d.valid_prefix, "valid", label_key, min_samples, max_samples)
        elif all(has_rows(manifest_path(prefix, "valid")) for prefix in d.prefix):
            valid = labeled_split(d.prefix, "valid", label_key, min_samples, max_samples)
        else:
            logger.warning("no validation data (data.prefix has no valid split; set data.valid_prefix): "
                           "evaluations are skipped")
    logger.info("task %s: %d %s, %d training utterances (%.2f h)%s", task.describe, len(task.labels),
                "tokens + blank" if task.kind == "ctc" else "classes", len(train.indices),
                float(train.lengths.sum()) / SAMPLE_RATE / 3600,
                f", {len(valid.indices)} valid" if valid is not None else "")

    # --- model and trainer
    model = build_model(cfg, task, tp)
    if resume_from is None and ft.pretrained_path:  # before wrapping: DDP and the optimizer copy the weights
        load_model_weights(ft.pretrained_path, model.wav2vec2, use_ema=ft.pretrained_ema)
        logger.info("encoder from %s%s", ft.pretrained_path, " (EMA)" if ft.pretrained_ema else "")
    elif resume_from is None:
        logger.info("encoder untrained (from %s)", ft.scratch_config)
    step = resume_from or 0
    # The optimizer a checkpoint holds is the one that made its last update: head-only up to and including
    # step freeze_encoder_steps; the loop below rebuilds it when the next update needs the encoder.
    frozen = ft.freeze_encoder_steps > 0 and step <= ft.freeze_encoder_steps
    ddp, optimizer, scheduler = build_trainer(model, cfg, frozen)
    ema = EMA(model, t.ema_decay)
    monitor = Monitor(cfg, rank, 0)
    best_name, higher_is_better = primary_metric(task)
    best = {"step": None, "value": None}
    loader_state = None
    if resume_from is not None:
        state = load_checkpoint(checkpoint_dir(t.save_dir, resume_from), ddp, optimizer, scheduler, ema)
        loader_state = state["loader"]
        monitor.load_state_dict(state["monitor"])
        best = state.get("best", best)
        logger.info("resumed from %s", checkpoint_dir(t.save_dir, resume_from))
    loader = build_finetune_loader(train, task, cfg, dp_rank, dp, tp, loader_state)
    tags = {"task": task.name, "label_key": task.label_key}
    logger.info("world %d = TP %d x DP %d; %s parameters, %s trained%s", dist.get_world_size(), tp, dp,
                f"{sum(q.numel() for q in model.parameters()):,}", f"{trainable_count(model):,}",
                " (encoder frozen)" if frozen else "")

    # ddp / optimizer / scheduler are rebuilt when the encoder unfreezes: the lambda reads the current ones
    def save(at: int, reshardable: bool) -> None:
        sync_params(ddp)
        save_checkpoint(t.save_dir, at, ddp, optimizer, scheduler, ema,
                        {"loader": loader.state_dict(), "monitor": monitor.state_dict(), "best": best,
                         "config": config_to_dict(cfg)}, keep_last=t.keep_last, reshardable=reshardable)

    saves = SavePolicy(t, monitor, save, stop)

    def validate() -> str | None:
        sync_params(ddp)
        metrics = evaluate(ddp, task, eval_batches(valid, task, cfg, dp_rank, dp, tp, t.eval_iters))
        monitor.write(step, "valid", {**metrics, **tags})
        value = metrics[best_name]
        if best["value"] is None or (value > best["value"] if higher_is_better else value < best["value"]):
            best.update(step=step, value=value)
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "num_utterances")
        logger.info("step %6d | valid %s | %s", step, task.describe, shown)
        if ema.enabled:
            backup = ema.copy_to()
            monitor.write(step, "valid_ema", {**evaluate(ddp, task, eval_batches(valid, task, cfg, dp_rank, dp, tp,
                                                                                 t.eval_iters)), **tags})
            ema.restore(backup)
        return monitor.check_eval(step, {"loss": metrics["loss"]})  # early stopping on the valid loss

    exit_code, reason, evaluated_at = EXIT_DONE, f"reached train.max_steps={t.max_steps}", None
    last_time, audio = time.perf_counter(), 0.0
    while step < t.max_steps:
        if frozen and step >= ft.freeze_encoder_steps:
            retire(ddp)
            ddp, optimizer, scheduler = build_trainer(model, cfg, False, scheduler.num_steps)
            frozen = False
            logger.info("step %6d | encoder unfrozen: %s parameters trained", step, f"{trainable_count(model):,}")
        out = train_step(ddp, optimizer, task, next(loader), stop=stop.requested_here)
        step = progress["step"] = step + 1
        if out["updated"]:
            scheduler.step(increment=1)
            if ema.enabled:
                sync_params(ddp)
                ema.update()
        audio += out["num_samples"]
        loss_scale = float(optimizer.get_loss_scale())
        if step % t.log_interval == 0:
            now = time.perf_counter()
            rate = audio / SAMPLE_RATE / max(now - last_time, 1e-9)
            last_time, audio = now, 0.0
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = float(out["grad_norm"]) if out["grad_norm"] is not None else float("nan")
            monitor.write(step, "train", {"loss": out["loss"], "lr": lr, "grad_norm": grad_norm,
                                          "loss_scale": loss_scale, "audio_seconds_per_second": rate,
                                          "encoder_frozen": int(frozen), "num_infeasible": out["num_infeasible"],
                                          "skipped": not out["updated"], **tags})
            logger.info("step %6d | %s | loss %.4f | lr %.3e | gnorm %.3f | %.0f audio-s/s%s", step, task.describe,
                        out["loss"], lr, grad_norm, rate, " | encoder frozen" if frozen else "")
        why = monitor.check_step(out, loss_scale, step)
        if why:
            exit_code, reason = EXIT_DIVERGED, why
            break
        if valid is not None and step % t.eval_interval == 0:
            evaluated_at = step
            why = validate()
            if why:
                exit_code, reason = saves.early_stop(step, why)
                break
        ending = saves.after_step(step, out["stop"])
        if ending:
            exit_code, reason = ending
            break
    if exit_code == EXIT_DONE and valid is not None and evaluated_at != step:
        validate()
    exit_code, reason = saves.finish(step, exit_code, reason)
    if best["value"] is not None:
        logger.info("best valid %s %s: %.4f at step %d", task.describe, best_name, best["value"], best["step"])
    logger.info("stopping at step %d: %s (exit %d)", step, reason, exit_code)
    monitor.close()
    return exit_code


if __name__ == "__main__":  # the guard dist_checkpointing's writer processes need (DESIGN §4)
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:  # a user's mistake: the message names the key or the file
        print(f"finetune: {e}", file=sys.stderr)
        sys.exit(2)
