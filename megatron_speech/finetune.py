"""Fine-tuning the wav2vec 2.0 encoder for a downstream task, on the pre-training trainer.

    python -m megatron_speech.finetune --config configs/finetune/TASK.yaml pretrained=CKPT [key=value ...]
    torchrun --nproc-per-node N -m megatron_speech.finetune --config ...      (or srun, one task per GPU)

TASK: phoneme (CTC, PER), asr (character CTC, WER/CER), speaker (accuracy), emotion (accuracy, unweighted
accuracy; the demo's is the prosody-style `arousal_proxy` label). `pretrained=` (or `none` for an untrained
encoder) and every other key of the `finetune` section may be given bare; the rest as section.key=value
(`--help` lists them). The model section comes from the pretrained checkpoint (dropouts may be overridden); the
labels are collected from the training manifest unless finetune.labels pins them; both are stored in every
checkpoint, so `evaluate` and `tools/convert_to_hf.py` need nothing else.

Freezing (finetune.freeze_feature_encoder, finetune.freeze_encoder_steps): training/finetune_unit.py.

Validation: every train.eval_interval steps on data.valid_prefix (or data.prefix's valid split), the whole split
(capped at train.eval_iters micro-batches per rank); metrics.jsonl lines carry `task` and `label_key`; early
stopping (train.early_stop_patience) watches train.best_metric (the task's: WER, PER, accuracy), whose best is
reported at the end and, with train.keep_best, kept as the checkpoint <save_dir>/best names.

Exit codes as pretrain (training/signals.py): 0 done or early-stopped, 75 preempted (saved; requeue), 3 diverged,
4 a peer rank died or hung, 5 a checkpoint save failed; 2 for a configuration or data error (the message names the
key or file).
"""

# ruff: noqa: E402  (the warnings filter must precede megatron-core's import, as in pretrain.py)
from __future__ import annotations

import logging
import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_speech.checkpoint.checkpointing import checkpoint_dir, resume_step
from megatron_speech.checkpoint.model_io import checkpoint_config, load_model_weights
from megatron_speech.common.audio import SAMPLE_RATE
from megatron_speech.config import Config, format_help, load_config, parse_cli
from megatron_speech.data.dataset import manifest_path
from megatron_speech.data.finetune_data import (
    build_finetune_loader,
    has_rows,
    labeled_split,
    min_samples_for,
)
from megatron_speech.tasks.task import Task, collect_labels
from megatron_speech.training.driver import run_training
from megatron_speech.training.ema import EMA
from megatron_speech.training.finetune_config import expand_bare_keys, load_finetune_config
from megatron_speech.training.finetune_unit import FinetuneUnit, build_model, trainable_count
from megatron_speech.training.loop import Loop, restore
from megatron_speech.training.monitor import Monitor
from megatron_speech.training.signals import StopSignal

logger = logging.getLogger("megatron_speech")


def main(argv: list[str] | None = None) -> int:
    path, overrides, want_help = parse_cli(sys.argv[1:] if argv is None else argv)
    if want_help:
        print(format_help(load_config(path, expand_bare_keys(overrides), validate=False)))
        return 0
    cfg = load_finetune_config(path, overrides)
    return run_training(cfg, train)


def run_labels(cfg: Config, train_split, resume_from: int | None) -> list[str]:
    """The labels of this run: those of the run being resumed, else finetune.labels, else the training data's."""
    ft = cfg.finetune
    if resume_from is not None:
        stored = checkpoint_config(checkpoint_dir(cfg.train.save_dir, resume_from)).finetune.labels
        if ft.labels and ft.labels != stored:
            raise ValueError(f"finetune.labels differ from those of the run in {cfg.train.save_dir} being resumed: "
                             "drop the override, or train into another train.save_dir")
        return list(stored)
    return list(ft.labels) if ft.labels else collect_labels(ft.task, train_split.labels)


def train(cfg: Config, progress: dict[str, int], stop: StopSignal) -> int:
    """Fine-tuning on this rank (process groups formed); returns the exit code."""
    t, p, ft, d = cfg.train, cfg.parallel, cfg.finetune, cfg.data
    tp, dp = p.tensor_model_parallel_size, parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()

    # --- data and labels
    label_key = ft.task_label_key
    min_samples = min_samples_for(d, cfg.model)
    max_samples = round(d.max_sample_seconds * SAMPLE_RATE)
    train_split = labeled_split(d.prefix, "train", label_key, min_samples, max_samples)
    resume_from = resume_step(t.save_dir) if t.resume else None  # falls back past a damaged checkpoint
    # The run's labels become part of its config: every checkpoint stores them for evaluate and the export.
    ft.labels = run_labels(cfg, train_split, resume_from)
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
                "tokens + blank" if task.kind == "ctc" else "classes", len(train_split.indices),
                float(train_split.lengths.sum()) / SAMPLE_RATE / 3600,
                f", {len(valid.indices)} valid" if valid is not None else "")

    # --- model, trainer, loop
    model = build_model(cfg, task, tp)
    if resume_from is None and ft.pretrained_path:  # before wrapping: DDP and the optimizer copy the weights
        load_model_weights(ft.pretrained_path, model.wav2vec2, use_ema=ft.pretrained_ema)
        logger.info("encoder from %s%s", ft.pretrained_path, " (EMA)" if ft.pretrained_ema else "")
    elif resume_from is None:
        logger.info("encoder untrained (from %s)", ft.scratch_config)
    unit = FinetuneUnit(cfg, model, task, valid, resume_from or 0, dp_rank, dp, tp)
    ema = EMA(model, t.ema_decay)
    monitor = Monitor(cfg, dist.get_rank(), 0)
    step, loader_state = restore(t, resume_from, unit, ema, monitor)
    loader = build_finetune_loader(train_split, task, cfg, dp_rank, dp, tp, loader_state)
    logger.info("world %d = TP %d x DP %d; %s parameters, %s trained%s", dist.get_world_size(), tp, dp,
                f"{sum(q.numel() for q in model.parameters()):,}", f"{trainable_count(model):,}",
                " (encoder frozen)" if unit.frozen else "")
    return Loop(cfg, unit, loader, ema, monitor, stop, progress).run(step)


if __name__ == "__main__":  # the guard dist_checkpointing's writer processes need (docs/design.md §4)
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:  # a user's mistake: the message names the key or the file
        print(f"finetune: {e}", file=sys.stderr)
        sys.exit(2)
