"""Data pipeline throughput: preprocessing (x real time per core) and, with the data loader, loading.

    python bench/data_throughput.py --preprocess [--files 48] [--seconds 8] [--workers N] [--keep DIR]
    python bench/data_throughput.py --loader [--prefix P] [--noise-dir D]   # loader audio-seconds/s per worker
    python bench/data_throughput.py                  # every section that exists

Prints one JSON object per section. The preprocessing corpus is generated (tones + noise at 8-48 kHz, 1-2 channels,
WAV PCM_16/FLOAT, FLAC, OGG Vorbis): real speech costs the same to decode and resample per second of audio, except
compressed formats, whose share here is a third of the files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from megatron_speech.preprocess import decode_file, preprocess

_FORMATS = (("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("wav", "WAV", "FLOAT"), ("ogg", "OGG", "VORBIS"))
_RATES = (8000, 16000, 22050, 44100, 48000)


def make_corpus(folder: Path, num_files: int, seconds: float, seed: int = 0) -> float:
    """Write num_files files of `seconds` each into folder; returns the total audio seconds."""
    rng = np.random.default_rng(seed)
    for i in range(num_files):
        rate, (ext, fmt, subtype) = _RATES[i % len(_RATES)], _FORMATS[i % len(_FORMATS)]
        channels = 1 + i % 2
        t = np.arange(int(seconds * rate)) / rate
        x = 0.2 * np.sin(2 * np.pi * (100 + 13 * i) * t)[:, None] + 0.05 * rng.standard_normal((len(t), channels))
        sf.write(str(folder / f"f{i:05d}.{ext}"), x.astype(np.float32), rate, format=fmt, subtype=subtype)
    return num_files * seconds


def bench_preprocess(num_files: int = 48, seconds: float = 8.0, workers: int | None = None,
                     keep: str | None = None) -> dict:
    """Preprocessing speed on a generated corpus.

    decode_x_rt_per_core: audio seconds per CPU second of decode + mono + resample + int16 in one process.
    pipeline_x_rt: audio seconds per wall second of the whole tool with `workers` processes (shards, manifests
    and hashing included; start-up excluded: megatron-core is imported first), and that divided by workers.
    """
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    with tempfile.TemporaryDirectory(dir=keep) as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        audio_seconds = make_corpus(src, num_files, seconds)
        files = sorted(str(p) for p in src.iterdir())

        cpu0 = time.process_time()
        for path in files:
            decode_file(path, 0)
        decode_cpu = time.process_time() - cpu0

        from megatron_speech.preprocess import _builder_class

        _builder_class()  # import megatron-core now, outside the timed run
        summary = preprocess(str(src), str(Path(tmp) / "out" / "bench"), workers=workers, valid_fraction=0.01,
                             shard_size_gb=0.05, min_seconds=0.0, progress=False, log=lambda msg: None)
        assert summary.num_kept == num_files, summary.format()
    return {
        "section": "preprocess",
        "files": num_files,
        "audio_hours": round(audio_seconds / 3600, 4),
        "decode_x_rt_per_core": round(audio_seconds / decode_cpu, 1),
        "workers": workers,
        "pipeline_wall_s": round(summary.wall_seconds, 2),
        "pipeline_x_rt": round(summary.real_time_factor(), 1),
        "pipeline_x_rt_per_worker": round(summary.real_time_factor() / max(workers, 1), 1),
        "cpus": os.cpu_count(),
    }


def bench_loader(args: argparse.Namespace) -> list[dict]:
    """Loader speed (audio-seconds/s, per worker, with and without augmentation) over --prefix, or over shards
    packed here from a generated corpus. Compare with what one A100 consumes at 45% MFU: ~1,200 audio-s/s."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench/ is its package
    from bench.loader_throughput import bench_loader as run

    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        prefix = args.prefix
        if not prefix:
            src = Path(tmp) / "in"
            src.mkdir()
            make_corpus(src, args.files, max(args.seconds, 25.0))  # longer than the 20 s maximum crop
            prefix = str(Path(tmp) / "out" / "bench")
            preprocess(str(src), prefix, workers=args.workers, valid_fraction=0.0, shard_size_gb=0.2,
                       min_seconds=0.0, progress=False, log=lambda msg: None)
        results = run(prefix, num_workers=args.loader_workers, noise_dir=args.noise_dir, seconds=args.loader_seconds)
    return [{"section": "loader", **r} for r in results]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preprocess", action="store_true", help="preprocessing speed (x real time per core)")
    p.add_argument("--loader", action="store_true", help="data loader speed (audio-seconds/s per worker)")
    p.add_argument("--prefix", default="", help="shards to read (loader; default: packed from a generated corpus)")
    p.add_argument("--noise-dir", default="", help="MUSAN-layout folder for the augmented loader runs")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to try")
    p.add_argument("--loader-seconds", type=float, default=5.0, help="seconds per loader setting")
    p.add_argument("--files", type=int, default=48, help="generated files (preprocess)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per generated file (preprocess)")
    p.add_argument("--workers", type=int, default=None, help="preprocess workers (default: usable CPUs)")
    p.add_argument("--keep", default=None, help="folder for the generated corpus (default: the system temp)")
    args = p.parse_args(argv)
    run_all = not (args.preprocess or args.loader)
    if args.preprocess or run_all:
        print(json.dumps(bench_preprocess(args.files, args.seconds, args.workers, args.keep)), flush=True)
    if args.loader or run_all:
        for row in bench_loader(args):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":  # the guard matters: preprocessing workers are spawned and re-import this file
    sys.exit(main(sys.argv[1:]))
