"""The pre-training data path at the seed's scale: start-up, memory and epoch build against the number of utterances.

    python bench/data_scale.py [--sizes 100000 1000000 10000000] [--workers 2] [--work DIR] [--keep]

For each size N it writes a synthetic prefix cheaply (64 real clips of 1-15 s in one shard; the manifest's N rows
point at them round-robin, with 53 languages), then measures, for one rank of the tiny config:
  - first start (no index: the trainer builds it from the manifest) and restart (index present): seconds from
    `python -m megatron_speech.pretrain` until its first training step is logged, with data.num_workers workers;
  - PSS of the rank and its workers together (shared pages counted once), peak over a third run to the first step
    (sampled: sampling walks the resident pages and would slow the timed runs);
  - bytes pickled into each DataLoader worker (the micro-batch builder the DataLoader sends at spawn);
  - in process: opening the corpus index, building the sampler, building one epoch.
Then the linear extrapolation (slope between the two largest sizes) to 350M utterances (the seed's ~960k hours at
~10 s per utterance). Prints a table and one JSON object per size; results: docs/performance.md §7.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
TARGET = 350_000_000
NUM_CLIPS, NUM_LANGUAGES, SR = 64, 53, 16_000


def write_clips(folder: Path) -> list[int]:
    """One shard of NUM_CLIPS clips (1-15 s) at folder/clips_train_00000; returns their lengths."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(folder / "clips_train_00000.bin"), dtype=np.int16)
    lengths = []
    for _ in range(NUM_CLIPS):
        n = int(rng.uniform(1.0, 15.0) * SR)
        builder.add_item(torch.from_numpy((rng.standard_normal(n) * 3000).astype(np.int16)))
        builder.end_document()
        lengths.append(n)
    builder.finalize(str(folder / "clips_train_00000.idx"))
    return lengths


def write_manifest(path: Path, num: int, lengths: list[int]) -> float:
    """num rows pointing round-robin at the clips; returns seconds taken."""
    t0 = time.perf_counter()
    heads = [f'{{"shard": "clips_train_00000", "index": {c}, "samples": {n}, ' for c, n in enumerate(lengths)]
    langs = [f'"language": "l{k:02d}"' for k in range(NUM_LANGUAGES)]
    with open(path, "w", buffering=1 << 22) as f:
        chunk = 100_000
        for start in range(0, num, chunk):
            f.write("".join(f'{heads[k % NUM_CLIPS]}"id": "u{k:010d}", {langs[k % NUM_LANGUAGES]}}}\n'
                            for k in range(start, min(num, start + chunk))))
    return time.perf_counter() - t0


def tree_pss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_to_first_step(prefix: str, workers: int, save_dir: Path, timeout: float, pss: bool) -> dict:
    """Start one pre-training rank; return seconds to its first logged step and, with pss=True, the peak PSS of
    the rank and its workers until then (sampled every 0.5 s; sampling walks every resident page, so the timed
    runs do not sample)."""
    shutil.rmtree(save_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "megatron_speech.pretrain", "--config", str(ROOT / "configs/tiny.yaml"),
           f"data.prefix=[{prefix}]", f"data.num_workers={workers}", "train.max_steps=100000",
           "train.save_interval=100000", "train.eval_interval=100000", f"train.save_dir={save_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ps = psutil.Process(proc.pid)
    metrics, peak, seconds = save_dir / "metrics.jsonl", 0, None
    try:
        while time.perf_counter() - t0 < timeout:
            if pss:
                peak = max(peak, tree_pss(ps))
            if metrics.exists() and any('"split": "train"' in line for line in metrics.open()):
                seconds = time.perf_counter() - t0
                if pss:
                    peak = max(peak, tree_pss(ps))
                break
            if proc.poll() is not None:
                raise RuntimeError(f"pretrain exited with {proc.returncode}:\n{proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.5 if pss else 0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if seconds is None:
        raise RuntimeError(f"no training step within {timeout} s")
    return {"seconds": seconds, "pss_bytes": peak}


def in_process(prefix: str, workers: int) -> dict:
    """Index open, sampler build, epoch build and the per-worker payload, measured in this process."""
    from megatron_speech.config import load_config
    from megatron_speech.data.dataset import Corpus
    from megatron_speech.data.loader import build_pretrain_loader

    cfg = load_config(str(ROOT / "configs/tiny.yaml"), [f"data.prefix=[{prefix}]", f"data.num_workers={workers}"])
    t0 = time.perf_counter()
    Corpus(prefix, "train")
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    loader = build_pretrain_loader(cfg.data, cfg.model, 0, 1, 1, 1, cfg.train.seed)
    t_loader = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = loader.sampler.epoch_batches(0)
    t_epoch = time.perf_counter() - t0
    return {"index_open_s": t_open, "loader_build_s": t_loader, "epoch_build_s": t_epoch,
            "batches_per_epoch": len(batches), "worker_payload_bytes": len(pickle.dumps(loader.builder))}


def extrapolate(rows: list[dict], key: str) -> float:
    a, b = rows[-2], rows[-1]
    slope = (b[key] - a[key]) / (b["utterances"] - a["utterances"])
    return b[key] + slope * (TARGET - b["utterances"])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default=None, help="folder for the synthetic prefixes (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic prefixes")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to reach the first step")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="data_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    lengths = write_clips(work)
    rows = []
    try:
        for n in sorted(args.sizes):
            prefix = work / f"n{n}"
            row = {"utterances": n, "manifest_write_s": write_manifest(Path(f"{prefix}_train.manifest.jsonl"), n,
                                                                        lengths)}
            write_manifest(Path(f"{prefix}_valid.manifest.jsonl"), NUM_CLIPS, lengths)
            row["manifest_bytes"] = os.path.getsize(f"{prefix}_train.manifest.jsonl")
            first = run_to_first_step(str(prefix), args.workers, work / "run", args.timeout, pss=False)
            row["index_bytes"] = os.path.getsize(f"{prefix}_train.index")
            again = run_to_first_step(str(prefix), args.workers, work / "run", args.timeout, pss=False)
            memory = run_to_first_step(str(prefix), args.workers, work / "run", args.timeout, pss=True)
            row.update(first_start_s=first["seconds"], restart_s=again["seconds"], restart_pss=memory["pss_bytes"],
                       **in_process(str(prefix), args.workers))
            print(json.dumps(row), flush=True)
            rows.append(row)
            for f in work.glob(f"n{n}_*"):
                if not args.keep:
                    f.unlink()
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    gib = 2**30
    print(f"\n{'utterances':>12} {'first start':>12} {'restart':>8} {f'PSS (rank+{args.workers} workers)':>22} "
          f"{'payload/worker':>15} {'epoch build':>12} {'index':>10}")
    for r in rows:
        print(f"{r['utterances']:>12,} {r['first_start_s']:>11.1f}s {r['restart_s']:>7.1f}s "
              f"{r['restart_pss'] / gib:>21.2f}G {r['worker_payload_bytes'] / 2**20:>14.3f}M "
              f"{r['epoch_build_s']:>11.2f}s {r['index_bytes'] / 2**20:>9.1f}M")
    if len(rows) >= 2:
        print(f"\nlinear extrapolation to {TARGET:,} utterances (slope between the two largest sizes):")
        print(f"  restart to the first step: {extrapolate(rows, 'restart_s') / 60:.1f} min; first start (index "
              f"built): {extrapolate(rows, 'first_start_s') / 60:.1f} min")
        print(f"  PSS, rank + {args.workers} workers: {extrapolate(rows, 'restart_pss') / gib:.1f} GiB; "
              f"epoch build: {extrapolate(rows, 'epoch_build_s'):.0f} s; per-worker payload: "
              f"{extrapolate(rows, 'worker_payload_bytes') / 2**20:.3f} MiB; index file: "
              f"{extrapolate(rows, 'index_bytes') / gib:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
