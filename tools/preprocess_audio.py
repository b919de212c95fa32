"""Audio files (any format, rate, channels) → 16 kHz int16 IndexedDataset shards + manifests + rejects.

    python tools/preprocess_audio.py --input DIR|MANIFEST --output-prefix PREFIX [--workers N]
        [--valid-fraction F] [--shard-size-gb G] [--min-seconds S] [--seed N]

Writes PREFIX_{train,valid}_NNNNN.{bin,idx}, PREFIX_{train,valid}.manifest.jsonl, PREFIX.rejects.jsonl and the
journal PREFIX.preprocess.json. Interrupted (crash, kill, preemption)? Run the same command again: it continues
where the last checkpoint left off and writes the same bytes as an uninterrupted run.
Formats, reject reasons and the resume design: megatron_speech/data/preprocess.py.
Exit codes: 0 done, 1 nothing kept, 2 bad arguments or input, 130 interrupted (progress saved).
"""

from __future__ import annotations

import argparse
import sys

from megatron_speech.data.preprocess import REJECT_REASONS, PreprocessInterrupted, preprocess


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="reject reasons: " + "; ".join(f"{k}: {v}" for k, v in REJECT_REASONS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of audio (recursive; every file is tried), a JSONL "
                   'manifest ({"path": ..., labels...} per line) or a fairseq TSV manifest')
    p.add_argument("--output-prefix", required=True, help="path prefix of the outputs, e.g. data/corpus")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: the usable CPUs; "
                   "0 = decode in this process)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="share of utterances in the valid split, "
                   "chosen by a hash of id and seed (default 0.01; 0 = no valid shards)")
    p.add_argument("--shard-size-gb", type=float, default=4.0, help="close a shard before its .bin passes this "
                   "many GB (1e9 bytes; default 4; fractions allowed)")
    p.add_argument("--min-seconds", type=float, default=0.5, help="reject utterances shorter than this at 16 kHz "
                   "(default 0.5; the trainer skips those below data.min_sample_seconds anyway)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid split hash (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the default off a terminal: a "
                   "log line every 30 s instead)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(args.input, args.output_prefix, workers=args.workers,
                             valid_fraction=args.valid_fraction, shard_size_gb=args.shard_size_gb,
                             min_seconds=args.min_seconds, seed=args.seed,
                             progress=False if args.no_progress else None)
    except ValueError as e:
        print(f"preprocess_audio: error: {e}", file=sys.stderr)
        return 2
    except PreprocessInterrupted as e:
        print(f"preprocess_audio: {e}", file=sys.stderr)
        return 130
    print(summary.format(args.output_prefix))
    if summary.num_kept == 0:
        print(f"preprocess_audio: no audio kept from {args.input}: see {args.output_prefix}.rejects.jsonl",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # the guard matters: worker processes are spawned and re-import this file
    sys.exit(main(sys.argv[1:]))
