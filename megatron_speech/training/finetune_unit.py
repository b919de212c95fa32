"""Fine-tuning in the shared loop (training/loop.py): the encoder with a task head, the trainer of each freezing
phase, the task's step and evaluation (the loop's Monitor keeps the best train.best_metric: the task's by default).

Freezing: the conv feature encoder stays frozen (finetune.freeze_feature_encoder); for the first
finetune.freeze_encoder_steps steps the whole encoder is frozen and only the head trains. A frozen parameter is out
of the DDP buffers and the optimizer (weight decay would otherwise move it), so at that step the DDP wrapper,
optimizer and scheduler are rebuilt with the encoder in them (megatron's overlapped grad reduce assumes a fixed
trainable set); the schedule continues, the head's Adam moments start over.
"""

from __future__ import annotations

import logging
from typing import Any

from megatron_speech.compat.megatron_core import disarm_ddp
from megatron_speech.data.finetune_data import LabeledSplit, eval_batches
from megatron_speech.models.wav2vec2 import factory
from megatron_speech.models.wav2vec2.factory import HeadSpec
from megatron_speech.models.wav2vec2.heads import Wav2Vec2ForFinetuning
from megatron_speech.tasks.task import Task
from megatron_speech.training.finetune_step import evaluate, train_step
from megatron_speech.training.loop import TrainUnit
from megatron_speech.training.optim import build_optimizer, build_scheduler
from megatron_speech.training.parallelize import wrap_for_training

logger = logging.getLogger("megatron_speech")


def build_model(cfg, task: Task, tp: int) -> Wav2Vec2ForFinetuning:
    """The encoder (pre-training model, untrained) with the task's head, on this rank."""
    t, p, ft = cfg.train, cfg.parallel, cfg.finetune
    return factory.build_model(cfg.model, tp=tp, sequence_parallel=p.sequence_parallel_enabled, precision=t.precision,
                               recompute=t.recompute_transformer, recompute_num_layers=t.recompute_num_layers,
                               recompute_conv=t.recompute_conv,
                               head=HeadSpec(task.kind, task.num_outputs, ft.layer_weighting, ft.final_dropout))


def build_trainer(model: Wav2Vec2ForFinetuning, cfg, frozen: bool, scheduler_steps: int = 0):
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
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    if scheduler_steps:
        scheduler.step(increment=scheduler_steps)
    return ddp, optimizer, scheduler


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class FinetuneUnit(TrainUnit):
    """A task head on the encoder. `step` is where the run starts (0, or the resumed checkpoint's step): the
    trainer a checkpoint holds is the one that made its last update, head-only up to and including step
    finetune.freeze_encoder_steps; `before_step` rebuilds it when the next update needs the encoder."""

    evaluate_at_end = True  # the last step's metrics are the run's result

    def __init__(self, cfg, model: Wav2Vec2ForFinetuning, task: Task, valid: LabeledSplit | None, step: int,
                 dp_rank: int, dp_size: int, tp_size: int):
        self.cfg, self.model, self.task, self.valid = cfg, model, task, valid
        self.dp_rank, self.dp_size, self.tp_size = dp_rank, dp_size, tp_size
        self.has_evaluation = valid is not None
        ft = cfg.finetune
        self.frozen = ft.freeze_encoder_steps > 0 and step <= ft.freeze_encoder_steps
        self.ddp, self.optimizer, self.scheduler = build_trainer(model, cfg, self.frozen)
        self.tags = {"task": task.name, "label_key": task.label_key}

    def before_step(self, step: int) -> None:
        if self.frozen and step >= self.cfg.finetune.freeze_encoder_steps:
            disarm_ddp(self.ddp)
            self.ddp, self.optimizer, self.scheduler = build_trainer(self.model, self.cfg, False,
                                                                     self.scheduler.num_steps)
            self.frozen = False
            logger.info("step %7d | encoder unfrozen: %s parameters trained", step,
                        f"{trainable_count(self.model):,}")

    def train_step(self, batches, stop: bool) -> dict[str, Any]:
        return train_step(self.ddp, self.optimizer, self.task, batches, stop=stop)

    def train_values(self, out: dict[str, Any]) -> tuple[dict[str, Any], str]:
        frozen = " | encoder frozen" if self.frozen else ""
        return {"encoder_frozen": int(self.frozen), "num_infeasible": out["num_infeasible"], **self.tags}, \
            f"{self.task.describe} | loss {out['loss']:.4f}{frozen}"

    def evaluate(self) -> dict[str, float]:
        t = self.cfg.train
        return evaluate(self.ddp, self.task, eval_batches(self.valid, self.task, self.cfg, self.dp_rank,
                                                          self.dp_size, self.tp_size, t.eval_iters))

    def eval_values(self, step: int, metrics: dict[str, float]):
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "num_utterances")
        # the best metric and early stopping watch train.best_metric (Monitor.check_eval)
        return self.tags, f"{self.task.describe} | {shown}", metrics
