"""Loader throughput: audio-seconds delivered per second, per worker, with and without augmentation (called by
bench/data_throughput.py).

    results = bench_loader("/data/en", num_workers=(0, 2, 4), noise_dir="/data/musan", seconds=20)
    print(format_results(results))

What is measured is the whole pre-training loader of one rank as the trainer sees it (dynamic batches, crops,
speed perturbation, noise, normalization, masks and distractors, worker transfer), with the XL recipe's data
and masking settings unless configs are given. Compare the per-GPU figure with what the model consumes
(docs/design.md §10: an A100 at 100% MFU would take 2,613 audio-s/s of XL): the loader must not be the bottleneck.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from megatron_speech.common.audio import SAMPLE_RATE
from megatron_speech.config import DataConfig
from megatron_speech.data.loader import build_pretrain_loader
from megatron_speech.models.wav2vec2.config import Wav2Vec2Config


def bench_loader(
    prefix: str | Sequence[str],
    *,
    num_workers: Sequence[int] = (0, 1, 2, 4),
    augment: Sequence[bool] = (False, True),
    noise_dir: str = "",
    seconds: float = 10.0,
    data_cfg: DataConfig | None = None,
    model_cfg: Wav2Vec2Config | None = None,
    tp_size: int = 1,
    num_micro_batches: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run the loader of rank 0 of one DP rank for about `seconds` per (workers, augment) setting.

    prefix: PREFIX(es) of tools/preprocess_audio.py (their train split); noise_dir: MUSAN-layout folder used when
    augmenting ("" = speed perturbation only); data_cfg / model_cfg: defaults are the XL recipe (DataConfig(),
    Wav2Vec2Config()); their augmentation fields are replaced per setting.
    Returns one dict per setting: num_workers, augment, noise, startup_s (build + first step), steps,
    audio_seconds, wall_s, audio_seconds_per_second, audio_seconds_per_second_per_worker (per process doing the
    work: the main process when num_workers = 0).
    """
    base = data_cfg or DataConfig()
    model_cfg = model_cfg or Wav2Vec2Config()
    prefixes = [prefix] if isinstance(prefix, str) else list(prefix)
    results = []
    for aug in augment:
        for workers in num_workers:
            cfg = dataclasses.replace(
                base, prefix=prefixes, num_workers=workers,
                speed_perturb=list(base.speed_perturb or [0.9, 1.0, 1.1]) if aug else [],
                noise_dir=noise_dir if aug else "")
            start = time.perf_counter()
            loader = build_pretrain_loader(cfg, model_cfg, 0, 1, num_micro_batches, tp_size, seed)
            try:
                next(loader)  # worker start-up, shard opening, noise decoding
                startup = time.perf_counter() - start
                samples, steps = 0, 0
                begin = time.perf_counter()
                while (wall := time.perf_counter() - begin) < seconds or steps == 0:
                    samples += sum(b["num_samples"] for b in next(loader))
                    steps += 1
            finally:
                loader.close()
            rate = samples / SAMPLE_RATE / wall
            results.append({
                "num_workers": workers, "augment": aug, "noise": bool(aug and noise_dir), "startup_s": startup,
                "steps": steps, "audio_seconds": samples / SAMPLE_RATE, "wall_s": wall,
                "audio_seconds_per_second": rate, "audio_seconds_per_second_per_worker": rate / max(1, workers),
            })
    return results


def format_results(results: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of bench_loader's results."""
    lines = [f"{'workers':>7} {'augment':>8} {'noise':>6} {'startup s':>10} {'audio-s/s':>11} {'per worker':>11}"]
    for r in results:
        lines.append(f"{r['num_workers']:>7} {str(r['augment']):>8} {str(r['noise']):>6} {r['startup_s']:>10.1f} "
                     f"{r['audio_seconds_per_second']:>11.1f} {r['audio_seconds_per_second_per_worker']:>11.1f}")
    return "\n".join(lines)
