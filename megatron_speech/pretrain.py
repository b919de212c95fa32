"""wav2vec 2.0 pre-training on megatron-core.

    python -m megatron_speech.pretrain --config configs/NAME.yaml [section.key=value ...]
    python -m megatron_speech.pretrain --config ... --dry-run [--world-size N]   (layout, memory, FLOPs; no run)
    torchrun --nproc-per-node N -m megatron_speech.pretrain --config ...     (or srun, one task per GPU)

`--help` lists every key. Exit codes (training/signals.py): 0 done or early-stopped, 75 preempted by a signal
after saving (requeue), 3 stopped on divergence (NaN/inf losses, fp16 loss scale at its floor), 4 a peer rank
died or hung (a collective failed or timed out), 5 a checkpoint save failed (docs/reliability.md).
"""

from __future__ import annotations

import logging
import sys
import warnings
from itertools import islice
from typing import Any

# Every CPU run would print these at import: no TE/apex is the expected CPU configuration.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_speech import dry_run
from megatron_speech.checkpoint.checkpointing import resume_step
from megatron_speech.checkpoint.model_io import load_model_weights, untrained_heads
from megatron_speech.config import format_help, load_config, parse_cli
from megatron_speech.data.loader import build_eval_loader, build_pretrain_loader
from megatron_speech.models.wav2vec2.factory import build_model, gumbel_temperature
from megatron_speech.training.driver import run_training
from megatron_speech.training.ema import EMA
from megatron_speech.training.loop import Loop, TrainUnit, restore
from megatron_speech.training.monitor import Monitor
from megatron_speech.training.optim import build_optimizer, build_scheduler
from megatron_speech.training.parallelize import wrap_for_training
from megatron_speech.training.signals import StopSignal
from megatron_speech.training.step import evaluate_batches, train_step

logger = logging.getLogger("megatron_speech")


class PretrainUnit(TrainUnit):
    """The contrastive objective in the shared loop: the Gumbel temperature before each step, the masked
    objective's metrics, evaluation on the valid split (the same batches every time)."""

    def __init__(self, cfg, model, ddp, optimizer, scheduler, eval_loader):
        self.cfg, self.model, self.ddp, self.optimizer, self.scheduler = cfg, model, ddp, optimizer, scheduler
        self.eval_loader, self.has_evaluation = eval_loader, eval_loader is not None
        self.temperature = gumbel_temperature(cfg.model, 0)

    def before_step(self, step: int) -> None:
        self.temperature = self.model.quantizer.temperature = gumbel_temperature(self.cfg.model, step)

    def train_step(self, batches, stop: bool) -> dict[str, Any]:
        return train_step(self.ddp, self.optimizer, batches, stop=stop)

    def train_values(self, out: dict[str, Any]) -> tuple[dict[str, Any], str]:
        values = {k: out[k] for k in ("contrastive", "accuracy", "code_perplexity", "diversity", "mask_fraction")}
        return {**values, "gumbel_temperature": self.temperature}, \
            f"loss {out['loss']:.4f} | acc {out['accuracy']:.3f} | ppl {out['code_perplexity']:6.1f}"

    def evaluate(self) -> dict[str, float]:
        """Loss, contrastive accuracy and code perplexity on the valid split."""
        loader = self.eval_loader
        batches = list(islice(iter(loader), min(self.cfg.train.eval_iters, loader.num_batches)))
        self.ddp.eval()
        with torch.no_grad():
            metrics = evaluate_batches(self.ddp, batches)
        self.ddp.train()
        return metrics

    def eval_values(self, step: int, metrics: dict[str, float]):
        return {}, (f"loss {metrics['loss']:.4f} | acc {metrics['accuracy']:.3f} | "
                    f"ppl {metrics['code_perplexity']:.1f}"), metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--dry-run" in argv:  # check + estimate only: no process group, no model (dry_run.py)
        return dry_run.main(argv)
    path, overrides, want_help = parse_cli(argv)
    cfg = load_config(path, overrides)
    if want_help:
        print(format_help(cfg))
        return 0
    return run_training(cfg, train)


def train(cfg, progress: dict[str, int], stop: StopSignal) -> int:
    """Pre-training on this rank (process groups formed); returns the exit code."""
    t, p = cfg.train, cfg.parallel
    tp, dp = p.tensor_model_parallel_size, parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()

    model = build_model(cfg.model, tp=tp, sequence_parallel=p.sequence_parallel_enabled, precision=t.precision,
                        recompute=t.recompute_transformer, recompute_num_layers=t.recompute_num_layers,
                        recompute_conv=t.recompute_conv)
    resume_from = resume_step(t.save_dir) if t.resume else None  # falls back past a damaged checkpoint
    if resume_from is None and t.init_checkpoint:  # before wrapping: DDP and the optimizer copy the weights
        untrained = untrained_heads(load_model_weights(t.init_checkpoint, model))
        logger.info("initialized the model from %s", t.init_checkpoint)
        if untrained:
            logger.warning("%s has no trained quantizer (converted from an encoder-only model): %s start from a "
                           "fresh initialization, so early targets are random codes", t.init_checkpoint,
                           ", ".join(untrained))
    ddp = wrap_for_training(model, p.use_distributed_optimizer, p.overlap_grad_reduce,
                            overlap_param_gather=p.overlap_param_gather)
    optimizer = build_optimizer(ddp, cfg.optim, t, p)
    eval_loader = build_eval_loader(cfg.data, cfg.model, dp_rank, dp, tp, t.seed) if t.eval_interval > 0 else None
    unit = PretrainUnit(cfg, model, ddp, optimizer, build_scheduler(optimizer, cfg.optim, t.max_steps), eval_loader)
    ema = EMA(model, t.ema_decay)
    monitor = Monitor(cfg, dist.get_rank(), cfg.model.num_codevector_groups * cfg.model.num_codevectors_per_group)
    logger.info("world %d = TP %d x DP %d; %s parameters on this rank", dist.get_world_size(), tp, dp,
                f"{sum(q.numel() for q in model.parameters()):,}")
    step, loader_state = restore(t, resume_from, unit, ema, monitor)
    loader = build_pretrain_loader(cfg.data, cfg.model, dp_rank, dp, t.num_micro_batches, tp, t.seed, loader_state,
                                   pin_memory=torch.cuda.is_available())  # to_device then copies asynchronously
    return Loop(cfg, unit, loader, ema, monitor, stop, progress).run(step)


if __name__ == "__main__":  # the guard dist_checkpointing's writer processes need (docs/design.md §4)
    sys.exit(main())
