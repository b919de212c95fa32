"""Audio files (any format, rate, channels) → 16 kHz int16 IndexedDataset shards + manifests + rejects.

    python tools/preprocess_audio.py --input DIR|MANIFEST --output-prefix PREFIX [--workers N]
        [--valid-fraction F] [--shard-size-gb G] [--min-seconds S] [--max-segment-seconds S] [--seed N]
        [--part I/N]

Writes PREFIX_{train,valid}_NNNNN.{bin,idx}, PREFIX_{train,valid}.manifest.jsonl, PREFIX.rejects.jsonl and the
journal PREFIX.preprocess.json. Interrupted (crash, kill, preemption)? Run the same command again: it continues
where the last checkpoint left off and writes the same bytes as an uninterrupted run.
Unlabeled recordings longer than --max-segment-seconds are cut at pauses into segments ("{id}@{offset}" rows).
--part I/N processes part I of N into PREFIX_partIIII (a Slurm array runs one per task: launch/preprocess.sbatch);
train on all parts with data.prefix='PREFIX_part*'.
Formats, reject reasons, segments, parts and the resume design: megatron_speech/preprocess/ (its package docstring).
Exit codes: 0 done (or an empty part), 1 nothing kept, 2 bad arguments or input, 130 interrupted (progress saved).
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_speech.preprocess import (
    REJECT_REASONS,
    PreprocessInterrupted,
    part_prefix,
    parts_status,
    preprocess,
)


def _part(text: str) -> tuple[int, int]:
    """--part I/N → (I, N)."""
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N, e.g. 3/64 (a Slurm array "
                                         "task: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-63)")
    return int(index), int(count)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="reject reasons: " + "; ".join(f"{k}: {v}" for k, v in REJECT_REASONS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of audio (recursive; every file is tried; LibriSpeech, "
                   "MLS and CommonVoice folders get their transcripts as labels), a JSONL manifest "
                   '({"path": ..., labels...} per line), a fairseq TSV manifest, or a CSV/TSV table whose header '
                   "names the audio column (CommonVoice's validated.tsv is one)")
    p.add_argument("--output-prefix", required=True, help="path prefix of the outputs, e.g. data/corpus")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: the usable CPUs; "
                   "0 = decode in this process)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="share of utterances in the valid split, "
                   "chosen by a hash of id and seed (default 0.01; 0 = no valid shards)")
    p.add_argument("--shard-size-gb", type=float, default=4.0, help="close a shard before its .bin passes this "
                   "many GB (1e9 bytes; default 4; fractions allowed)")
    p.add_argument("--min-seconds", type=float, default=0.5, help="reject utterances shorter than this at 16 kHz "
                   "(default 0.5; the trainer skips those below data.min_sample_seconds anyway)")
    p.add_argument("--max-segment-seconds", type=float, default=30.0, help="cut unlabeled inputs longer than "
                   "this at low-energy points into segments of at most this length, none shorter than "
                   "--min-seconds (default 30; 0 = never cut; at least twice --min-seconds). Inputs with any label "
                   "other than language (text, phonemes, speaker...) are never cut")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid split hash (default 0)")
    p.add_argument("--part", type=_part, default=None, metavar="I/N", help="process only part I of N (0-based; "
                   "an input's part is a hash of its id) into PREFIX_partIIII, with its own journal; duplicates "
                   "are found within a part only. One per Slurm array task: launch/preprocess.sbatch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the default off a terminal: a "
                   "log line every 30 s instead)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(args.input, args.output_prefix, workers=args.workers,
                             valid_fraction=args.valid_fraction, shard_size_gb=args.shard_size_gb,
                             min_seconds=args.min_seconds, seed=args.seed,
                             progress=False if args.no_progress else None,
                             max_segment_seconds=args.max_segment_seconds, part=args.part)
    except ValueError as e:
        print(f"preprocess_audio: error: {e}", file=sys.stderr)
        return 2
    except PreprocessInterrupted as e:
        print(f"preprocess_audio: {e}", file=sys.stderr)
        return 130
    prefix = part_prefix(args.output_prefix, args.part[0]) if args.part else args.output_prefix
    print(summary.format(prefix))
    if args.part:
        print(_parts_report(args.output_prefix, args.part[1]))
    if summary.num_kept == 0 and not (args.part and summary.num_inputs == 0):
        print(f"preprocess_audio: no audio kept from {args.input}: see {prefix}.rejects.jsonl", file=sys.stderr)
        return 1
    return 0


def _parts_report(output_prefix: str, num_parts: int) -> str:
    """How far the whole array is, and the data.prefix that trains on it."""
    complete, missing = parts_status(output_prefix, num_parts)
    if missing:
        lines = [f"{len(complete)} of {num_parts} parts complete; not yet: " + " ".join(
            os.path.basename(p) for p in missing[:8]) + (" ..." if len(missing) > 8 else "")]
    else:
        lines = [f"all {num_parts} parts complete"]
    lines.append(f"train on them with data.prefix='{output_prefix}_part*' or "
                 f"data.prefix=[{','.join(part_prefix(output_prefix, i) for i in range(num_parts))}]")
    return "\n".join(lines)


if __name__ == "__main__":  # the guard matters: worker processes are spawned and re-import this file
    sys.exit(main(sys.argv[1:]))
