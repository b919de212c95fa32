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

# Every CPU run would print these at import: no TE/apex is the expected CPU configuration.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_speech.checkpoint.checkpointing import checkpoint_dir, load_checkpoint, resume_step, save_checkpoint
from megatron_speech.checkpoint.model_io import load_model_weights
from megatron_speech.config import config_to_dict, format_help, load_config, parse_cli
from megatron_speech.data.loader import build_eval_loader, build_pretrain_loader
from megatron_speech.models.wav2vec2.factory import build_pretraining_model, gumbel_temperature, transformer_config
from megatron_speech.training import dry_run
from megatron_speech.training.driver import SavePolicy, run_training
from megatron_speech.training.ema import EMA
from megatron_speech.training.monitor import Monitor
from megatron_speech.training.optim import build_optimizer, build_scheduler
from megatron_speech.training.parallelize import sync_params, wrap_for_training
from megatron_speech.training.signals import EXIT_DIVERGED, EXIT_DONE, StopSignal
from megatron_speech.training.step import evaluate_batches, train_step

logger = logging.getLogger("megatron_speech")


def evaluate(model, eval_loader, num_batches: int) -> dict[str, float]:
    """Loss, contrastive accuracy and code perplexity on the valid split (same batches every time)."""
    batches = list(islice(iter(eval_loader), min(num_batches, eval_loader.num_batches)))
    sync_params(model)
    model.eval()
    with torch.no_grad():
        metrics = evaluate_batches(model, batches)
    model.train()
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--dry-run" in argv:  # check + estimate only: no process group, no model (training/dry_run.py)
        return dry_run.main(argv)
    path, overrides, want_help = parse_cli(argv)
    cfg = load_config(path, overrides)
    if want_help:
        print(format_help(cfg))
        return 0
    return run_training(cfg, train)


def train(cfg, progress: dict[str, int], stop: StopSignal) -> int:
    """The training loop on this rank (process groups formed); returns the exit code. Keeps progress["step"]."""
    t, p = cfg.train, cfg.parallel
    rank = dist.get_rank()
    tp, dp = p.tensor_model_parallel_size, parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()

    tconfig = transformer_config(cfg.model, tp, p.sequence_parallel_enabled, t.precision, t.recompute_transformer)
    tconfig.recompute_num_layers = t.recompute_num_layers if t.recompute_transformer == "full" else None
    model = build_pretraining_model(cfg.model, tconfig, recompute_conv=t.recompute_conv)
    resume_from = resume_step(t.save_dir) if t.resume else None  # falls back past a damaged checkpoint
    if resume_from is None and t.init_checkpoint:  # before wrapping: DDP and the optimizer copy the weights
        load_model_weights(t.init_checkpoint, model)
        logger.info("initialized the model from %s", t.init_checkpoint)
    ddp = wrap_for_training(model, p.use_distributed_optimizer, p.overlap_grad_reduce,
                            overlap_param_gather=p.overlap_param_gather)
    optimizer = build_optimizer(ddp, cfg.optim, t, p)
    scheduler = build_scheduler(optimizer, cfg.optim)
    ema = EMA(model, t.ema_decay)
    monitor = Monitor(cfg, rank, cfg.model.num_codevector_groups * cfg.model.num_codevectors_per_group)
    logger.info("world %d = TP %d x DP %d; %s parameters on this rank", dist.get_world_size(), tp, dp,
                f"{sum(q.numel() for q in model.parameters()):,}")

    step, loader_state = 0, None
    if resume_from is not None:
        state = load_checkpoint(checkpoint_dir(t.save_dir, resume_from), ddp, optimizer, scheduler, ema)
        step, loader_state = state["step"], state["loader"]
        monitor.load_state_dict(state["monitor"])
        logger.info("resumed from %s", checkpoint_dir(t.save_dir, resume_from))
    loader = build_pretrain_loader(cfg.data, cfg.model, dp_rank, dp, t.num_micro_batches, tp, t.seed, loader_state,
                                   pin_memory=torch.cuda.is_available())  # to_device then copies asynchronously
    eval_loader = build_eval_loader(cfg.data, cfg.model, dp_rank, dp, tp, t.seed) if t.eval_interval > 0 else None
    def save(at: int, reshardable: bool) -> None:
        sync_params(ddp)
        save_checkpoint(t.save_dir, at, ddp, optimizer, scheduler, ema,
                        {"loader": loader.state_dict(), "monitor": monitor.state_dict(), "config": config_to_dict(cfg)},
                        keep_last=t.keep_last, reshardable=reshardable)

    saves = SavePolicy(t, monitor, save, stop)

    exit_code, reason = EXIT_DONE, f"reached train.max_steps={t.max_steps}"
    while step < t.max_steps:
        temperature = gumbel_temperature(cfg.model, step)
        model.quantizer.temperature = temperature
        out = train_step(ddp, optimizer, next(loader), stop=stop.requested_here)
        step = progress["step"] = step + 1
        if out["updated"]:
            scheduler.step(increment=1)
            if ema.enabled:
                sync_params(ddp)
                ema.update()
        loss_scale = float(optimizer.get_loss_scale())
        monitor.train_step(step, out, optimizer.param_groups[0]["lr"], loss_scale, temperature)
        why = monitor.check_step(out, loss_scale, step)
        if why:  # keep the last good checkpoint as `latest`: nothing worth saving now
            exit_code, reason = EXIT_DIVERGED, why
            break
        if eval_loader is not None and step % t.eval_interval == 0:
            metrics = evaluate(ddp, eval_loader, t.eval_iters)
            monitor.write(step, "valid", metrics)
            if ema.enabled:
                backup = ema.copy_to()
                monitor.write(step, "valid_ema", evaluate(ddp, eval_loader, t.eval_iters))
                ema.restore(backup)
            logger.info("step %7d | valid loss %.4f | acc %.3f | ppl %.1f", step, metrics["loss"],
                        metrics["accuracy"], metrics["code_perplexity"])
            why = monitor.check_eval(step, metrics)
            if why:
                exit_code, reason = saves.early_stop(step, why)
                break
        ending = saves.after_step(step, out["stop"])
        if ending:
            exit_code, reason = ending
            break
    exit_code, reason = saves.finish(step, exit_code, reason)
    logger.info("stopping at step %d: %s (exit %d)", step, reason, exit_code)
    monitor.close()
    return exit_code


if __name__ == "__main__":  # the guard dist_checkpointing's writer processes need (DESIGN §4)
    sys.exit(main())
