"""Test helpers that start and watch training: the pre-training driver under torchrun and its metrics, a rank's
training set-up and step for the checkpoint tests, and Slurm-style signals to spawned children."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from tests.fixtures import ROOT, global_batch, tiny_config


def torchrun(nproc: int, save_dir: Path, *overrides: str, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m",
           "megatron_speech.pretrain", "--config", "configs/tiny.yaml", f"train.save_dir={save_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def metrics(save_dir: Path, split: str = "train") -> dict[int, dict]:
    path = save_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r["split"] == split}


def setup_training(tp: int, distributed_optimizer: bool = True):
    from megatron.core import parallel_state

    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import initialize_parallel
    from megatron_speech.training.ema import EMA
    from megatron_speech.training.optim import build_optimizer, build_scheduler
    from megatron_speech.training.parallelize import wrap_for_training

    initialize_parallel(tp, seed=3)
    cfg = tiny_config("optim.warmup_steps=1", f"parallel.use_distributed_optimizer={distributed_optimizer}",
                      dropout=0.0)
    model = build_model(cfg.model, tp=tp, sequence_parallel=False)
    model.quantizer.gumbel_noise = False
    ddp = wrap_for_training(model, use_distributed_optimizer=distributed_optimizer, overlap_grad_reduce=True)
    opt = build_optimizer(ddp, cfg.optim, cfg.train, cfg.parallel)
    sched = build_scheduler(opt, cfg.optim)
    ema = EMA(model, 0.9)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    return cfg, model, ddp, opt, sched, ema, dp_rank, dp


def train_one_step(cfg, ddp, opt, sched, ema, step, dp_rank, dp):
    from megatron_speech.training.step import train_step

    batches = global_batch(cfg.model, step, num_micro=2)
    mine = batches[dp_rank::dp]  # the same global batch, split over the DP ranks
    out = train_step(ddp, opt, mine)
    sched.step(increment=1)
    ema.update()
    return out["loss"]


def _spawned_children() -> list[psutil.Process]:
    """This process's spawned multiprocessing children (DataLoader workers; not the resource tracker)."""
    out = []
    for child in psutil.Process().children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:
            pass
    return out


@contextlib.contextmanager
def slurm_signals_to_children():
    """USR1 and TERM to every spawned child of this process, every 50 ms while the block runs (Slurm signals every
    process of the step); yields the set of pids signalled so far."""
    done, signalled = threading.Event(), set()

    def pester():
        while not done.is_set():
            for child in _spawned_children():
                for sig in (signal.SIGUSR1, signal.SIGTERM):
                    try:
                        child.send_signal(sig)
                        signalled.add(child.pid)
                    except psutil.Error:
                        pass
            time.sleep(0.05)

    thread = threading.Thread(target=pester, daemon=True)
    thread.start()
    try:
        yield signalled
    finally:
        done.set()
        thread.join()
