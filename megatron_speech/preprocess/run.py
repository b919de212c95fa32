"""The preprocessing run: list the inputs, decode them in worker processes (cutting long unlabeled ones into
segments), write shards, manifests and rejects per split, keep a journal to resume from, write the indexes last.
The contract (outputs, resume, parts, signals) is in the package docstring (megatron_speech/preprocess/__init__.py)."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import numpy as np
import soundfile as sf
import soxr

from megatron_speech.common.audio import SAMPLE_RATE
from megatron_speech.data.audio_io import RESAMPLE_QUALITY, Kept, Rejected, decode_file
from megatron_speech.data.inputs import InputItem, _stat_and_dedupe_ids, list_inputs
from megatron_speech.data.parts import SPLITS, is_valid, part_of, part_prefix
from megatron_speech.preprocess.journal import (
    Summary,
    _check_complete,
    _fill_summary,
    _fingerprint,
    _load_journal,
    _stats,
    _write_indexes,
    _write_json_atomic,
)
from megatron_speech.preprocess.segment import decode_and_segment
from megatron_speech.preprocess.shards import _builder_class, _flush, _Mismatch, _open_truncated, _reclaim, _Split

FORMAT_VERSION = 2
"""Bump when the bytes written for the same inputs change: a journal of another version is not resumed.
2: long unlabeled inputs are cut into segments (max_segment_seconds, default 30)."""
SEGMENT_KEYS = ("parent", "offset")
"""Written after OUTPUT_KEYS on a segment's row: its input's id and its first sample in the input's 16 kHz audio."""
UNLABELED_KEYS = ("language",)
"""Input keys that do not make an input labeled: an input with no other key may be cut into segments."""


class PreprocessInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run after a checkpoint; rerunning the same command continues it."""


# --------------------------------------------------------------------------------------------------- parallel decode


def _worker_init(parent_pid: int) -> None:
    # Ctrl-C reaches the whole foreground group: the main process stops at a file boundary and checkpoints, the
    # workers carry on until then. SIGTERM keeps its default: the pool terminates workers with it once broken
    # (ignoring it deadlocks the pool's shutdown while a worker blocks on writing a large result). SIGUSR1 (Slurm's
    # warning signal reaches every process of the step) is the main process's to act on; by default it would kill.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # A worker holds both ends of the pool's task queue, so it never sees EOF when the main process is killed
    # (SIGKILL, OOM): without this it would wait forever as an orphan.
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _ordered_results(items: list[InputItem], start: int, min_samples: int, workers: int,
                     process_fn: Callable[[str, int], Kept | Rejected],
                     max_segment_of: Callable[[InputItem], int] = lambda item: 0,
                     ) -> Iterator[tuple[int, Kept | Rejected | None]]:
    """(index, result) in input order from `start`; None for an item rejected while listing.
    Each file goes through decode_and_segment(process_fn, ..., max_segment_of(item)).

    At most 4 x workers files are in flight, so memory stays bounded whatever the writer's speed. When a worker
    dies (a decoder crash, the OOM killer), the files that were in flight are retried one at a time in a fresh
    pool; one that kills its worker again is rejected as "crashed".
    """
    if workers == 0:
        for k in range(start, len(items)):
            yield k, None if items[k].reject else \
                decode_and_segment(process_fn, items[k].source, min_samples, max_segment_of(items[k]))
        return

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                   initargs=(os.getpid(),))

    pool = new_pool()
    pending: deque[tuple[int, Future | None]] = deque()
    nxt, isolate_end = start, start
    try:
        while True:
            while nxt < len(items):
                isolating = nxt < isolate_end or any(j < isolate_end for j, _ in pending)
                if len(pending) >= (1 if isolating else 4 * workers):
                    break
                item = items[nxt]
                pending.append((nxt, None if item.reject else pool.submit(
                    decode_and_segment, process_fn, item.source, min_samples, max_segment_of(item))))
                nxt += 1
            if not pending:
                return
            k, fut = pending.popleft()
            if fut is None:
                yield k, None
                continue
            try:
                result = fut.result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                pool = new_pool()
                if k < isolate_end and not pending:  # it ran alone: it is the one
                    yield k, Rejected("crashed", "decoding it killed the worker process, also when retried alone "
                                      "(a crash in the decoder, or out of memory)")
                    continue
                isolate_end, nxt = nxt, k
                pending.clear()
                continue
            yield k, result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def preprocess(input_path: str, output_prefix: str, *, workers: int | None = None, valid_fraction: float = 0.01,
               shard_size_gb: float = 4.0, min_seconds: float = 0.5, seed: int = 0, progress: bool | None = None,
               checkpoint_seconds: float = 60.0, log: Callable[[str], None] | None = None,
               process_fn: Callable[[str, int], Kept | Rejected] = decode_file, max_segment_seconds: float = 30.0,
               part: tuple[int, int] | None = None) -> Summary:
    """Turn `input_path` (folder, JSONL or TSV manifest) into shards, manifests and rejects at `output_prefix`.

    workers: decode processes (None = the CPUs this process may use; 0 = decode in this process).
    valid_fraction: share of utterances (by hash of id and seed) in the valid split; 0 = no valid shards.
    shard_size_gb: a shard's .bin is closed before it would pass this many GB (1e9 bytes; fractions allowed).
    min_seconds: shorter utterances (at 16 kHz) are rejected as too_short.
    max_segment_seconds: unlabeled inputs longer than this are cut into segments (0 = never; >= 2 x min_seconds).
    part: (i, n) = process only part i of n (by id hash) into part_prefix(output_prefix, i); None = everything
        into output_prefix.
    progress: a tqdm bar (None = when stderr is a terminal; otherwise a log line every 30 s).
    Resumes an interrupted run of the same arguments (see the module docstring); raises ValueError for bad
    arguments, a malformed input, or outputs of a different run at `output_prefix`.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    min_samples = round(min_seconds * SAMPLE_RATE)
    max_segment_samples = round(max_segment_seconds * SAMPLE_RATE)
    for ok, msg in ((workers >= 0, f"--workers={workers} must be >= 0 (0 decodes in the main process)"),
                    (0.0 <= valid_fraction <= 1.0, f"--valid-fraction={valid_fraction} must be in [0, 1]"),
                    (shard_size_gb * 1e9 >= 2, f"--shard-size-gb={shard_size_gb} must hold at least one sample"),
                    (min_seconds >= 0, f"--min-seconds={min_seconds} must be >= 0"),
                    (max_segment_samples == 0 or max_segment_samples >= 2 * max(min_samples, 1),
                     f"--max-segment-seconds={max_segment_seconds} must be 0 (never cut) or at least twice "
                     f"--min-seconds={min_seconds}: otherwise the segments could not all be long enough"),
                    (part is None or 0 <= part[0] < part[1],
                     f"--part {part[0] if part else ''}/{part[1] if part else ''}: the index must be in 0 .. N-1")):
        if not ok:
            raise ValueError(msg)
    if not os.path.basename(output_prefix):
        raise ValueError(f"--output-prefix {output_prefix!r} names a folder; give a path prefix such as "
                         f"{os.path.join(output_prefix, 'corpus')!r}")
    if part:
        _check_other_parts(output_prefix, part[1])
    prefix = part_prefix(output_prefix, part[0]) if part else output_prefix
    journal_path = prefix + ".preprocess.json"
    # Every part's outputs are left out of a folder walk; only this part's inputs are stat'ed (an input's id, and
    # so its part, is known before any file is touched; a repeated id always falls in the same part).
    kind, items = list_inputs(input_path, output_prefix, stat=False)
    clash = next((it for it in items if any(k in it.labels for k in SEGMENT_KEYS)), None)
    if clash:
        key = next(k for k in SEGMENT_KEYS if k in clash.labels)
        raise ValueError(f"--input {input_path}: the entry of {clash.source} has the key {key!r}, which the "
                         f"preprocessor writes for segments of long recordings; rename it (e.g. \"input_{key}\")")
    # Ids a segment id "{parent}@{offset}" could equal (ids of two parents never can): usually none.
    segment_like_ids = {it.id for it in items if _SEGMENT_ID.search(it.id)}
    num_listed = len(items)
    if part:
        items = [it for it in items if part_of(it.id, part[1]) == part[0]]
    if items:
        _stat_and_dedupe_ids(items, input_path)
    params = {"format_version": FORMAT_VERSION, "input": os.path.abspath(input_path), "input_kind": kind,
              "num_inputs": len(items), "valid_fraction": valid_fraction, "shard_size_bytes": int(shard_size_gb * 1e9),
              "min_seconds": min_seconds, "seed": seed, "sample_rate": SAMPLE_RATE,
              "resample_quality": RESAMPLE_QUALITY, "libsndfile": sf.__libsndfile_version__,
              "soundfile": sf.__version__, "soxr": soxr.__version__, "max_segment_seconds": max_segment_seconds,
              "part": list(part) if part else None}
    fingerprint = _fingerprint(kind, items, params)
    journal = _load_journal(journal_path, prefix, params, fingerprint)
    summary = Summary(num_inputs=len(items), workers=workers, part=part)

    def max_segment_of(item: InputItem) -> int:
        # A label other than the language describes the whole file (a transcript, a speaker): never cut it.
        return 0 if any(k not in UNLABELED_KEYS for k in item.labels) else max_segment_samples

    if journal and journal["complete"]:
        _fill_summary(summary, journal)
        _check_complete(prefix, journal)
        log(f"{prefix}: already complete for these inputs and arguments; nothing to do")
        _write_indexes(prefix, log)
        return summary

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    max_bytes = params["shard_size_bytes"]
    if journal is None:  # the journal exists before any output does: a crash leaves nothing unaccounted for
        journal = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "params": params, "complete": False,
                   "next_input": 0, "rejects_bytes": 0, "splits": {s: None for s in SPLITS}, "stats": {}}
        _write_json_atomic(journal_path, journal)
    start = journal["next_input"]
    try:
        splits = {s: _Split(prefix, s, max_bytes, journal["splits"][s]) for s in SPLITS}
        if journal["splits"]["train"] is None:
            rejects = open(prefix + ".rejects.jsonl.partial", "wb")  # noqa: SIM115
        else:
            _reclaim(prefix + ".rejects.jsonl.partial", prefix + ".rejects.jsonl")
            rejects = _open_truncated(prefix + ".rejects.jsonl.partial", journal["rejects_bytes"], "rejects")
    except _Mismatch as e:
        raise ValueError(f"cannot resume {prefix}: {e}. The outputs were changed after the interruption; delete "
                         f"{prefix}_* and {prefix}.* and run again") from None
    _fill_summary(summary, journal)
    summary.resumed_at = start
    # Duplicate detection: the first 8 bytes of each kept utterance's hash → its id (rebuilt from the manifests).
    seen: dict[int, str] = {}
    for split in splits.values():
        for r in split.records():
            seen[int(r["audio_hash"][:16], 16)] = r["id"]
    if start:
        log(f"{prefix}: resuming at file {start} of {len(items)} ({summary.num_kept} kept, "
            f"{sum(summary.rejects.values())} rejected so far)")
    else:
        of_part = f" (part {part[0]} of {part[1]}: {len(items)} of {num_listed})" if part else ""
        log(f"{prefix}: {len(items)} inputs{of_part} from {kind} {input_path}, {workers} workers")

    def checkpoint(next_input: int, complete: bool = False) -> None:
        for split in splits.values():
            split.flush()
        _flush(rejects)
        journal.update(next_input=next_input, complete=complete, rejects_bytes=rejects.tell(),
                       splits={s: splits[s].state() for s in SPLITS}, stats=_stats(summary))
        _write_json_atomic(journal_path, journal)

    _builder_class()  # import megatron-core (seconds) before the clock starts
    stop = _StopFlag()
    t0 = last_checkpoint = last_report = time.monotonic()
    bar = _progress_bar(len(items), start, progress)
    next_input = start
    try:
        with stop:
            for k, result in _ordered_results(items, start, min_samples, workers, process_fn, max_segment_of):
                item = items[k]
                if result is None:
                    result = Rejected(*item.reject)
                # The utterances of input k: (id, samples, audio_hash, segment keys); one unless it was cut.
                utterances: list[tuple[str, np.ndarray, str, dict]] = []
                if isinstance(result, Kept) and result.segments:
                    ends = [a for a, _ in result.segments[1:]] + [len(result.samples)]
                    utterances = [(f"{item.id}@{a}", result.samples[a:b], h, {"parent": item.id, "offset": a})
                                  for (a, h), b in zip(result.segments, ends, strict=True)]
                elif isinstance(result, Kept):
                    utterances = [(item.id, result.samples, result.audio_hash, {})]
                else:
                    _write_reject(rejects, summary, item, item.id, result.reason, result.detail, {})
                # A resume starts at an input: the journal is written only before or after all of input k.
                touched = closed_midway = False
                split_name = "valid" if is_valid(item.id, seed, valid_fraction) else "train"  # a segment's too
                split = splits[split_name]
                for uid, samples, audio_hash, extra in utterances:
                    key = int(audio_hash[:16], 16)
                    if extra and uid in segment_like_ids:
                        _write_reject(rejects, summary, item, uid, "duplicate_id",
                                      f"id {uid!r} (a segment of {item.id!r}) is also an input's id", extra)
                    elif key in seen:
                        _write_reject(rejects, summary, item, uid, "duplicate",
                                      f"the same 16 kHz audio as the kept utterance {seen[key]!r}", extra)
                    else:
                        if split.would_overflow(samples.nbytes):
                            split.close_shard()
                            if touched:
                                closed_midway = True  # the journal follows once the whole input is written
                            else:
                                checkpoint(k)  # before anything of file k is counted: a resume starts at k
                                last_checkpoint = time.monotonic()
                        seen[key] = uid
                        split.add(samples, {
                            "id": uid, "source": item.source, "samples": len(samples),
                            "orig_sample_rate": result.orig_sample_rate, "orig_channels": result.orig_channels,
                            "audio_hash": audio_hash, "warnings": result.warnings, **extra, **item.labels})
                        setattr(summary, f"num_{split_name}", getattr(summary, f"num_{split_name}") + 1)
                        summary.kept_samples += len(samples)
                        for w in result.warnings:
                            summary.warnings[w] = summary.warnings.get(w, 0) + 1
                    touched = True
                if isinstance(result, Kept) and result.segments:
                    summary.num_cut_inputs += 1
                    summary.num_segments += len(result.segments)
                summary.decoded_seconds += result.orig_seconds
                summary.session_decoded_seconds += result.orig_seconds
                next_input = k + 1
                now = time.monotonic()
                if closed_midway or now - last_checkpoint >= checkpoint_seconds:
                    checkpoint(next_input)
                    last_checkpoint = now
                bar_or_log = now - last_report >= (0.5 if bar else 30.0)
                if bar:
                    bar.update(1)
                if bar_or_log:
                    last_report = now
                    summary.wall_seconds = now - t0
                    rtf = summary.real_time_factor()
                    if bar:
                        bar.set_postfix_str(f"{rtf / 3600:.3g} audio h/s = {rtf:.0f}x real time", refresh=False)
                    else:
                        log(f"{prefix}: {next_input}/{len(items)} files, {summary.kept_hours:.2f} h kept, "
                            f"{rtf:.0f}x real time")
                if stop.requested:
                    break
        if stop.requested:
            checkpoint(next_input)
            raise PreprocessInterrupted(
                f"stopped by {stop.requested} after file {next_input} of {len(items)}; progress is saved in "
                f"{journal_path}: run the same command again to continue")
        for split in splits.values():
            split.finish()
        _flush(rejects)
        rejects.close()
        os.replace(prefix + ".rejects.jsonl.partial", prefix + ".rejects.jsonl")
        summary.train_shards, summary.valid_shards = (len(splits[s].shards) for s in SPLITS)
        journal.update(next_input=len(items), complete=True, rejects_bytes=os.path.getsize(prefix + ".rejects.jsonl"),
                       splits={s: splits[s].state() for s in SPLITS}, stats=_stats(summary))
        _write_json_atomic(journal_path, journal)
    finally:
        if bar:
            bar.close()
        for split in splits.values():
            if not split.manifest.closed:
                split.close_files()
        if not rejects.closed:
            rejects.close()
    _write_indexes(prefix, log)
    summary.wall_seconds = time.monotonic() - t0
    return summary


_SEGMENT_ID = re.compile(r"@\d+\Z")


def _write_reject(rejects, summary: Summary, item: InputItem, uid: str, reason: str, detail: str,
                  extra: dict) -> None:
    """One line of the rejects file: an input's, or (extra = its parent and offset) a segment's."""
    rejects.write((json.dumps({"source": item.source, "reason": reason, "detail": detail, "id": uid, **extra},
                              ensure_ascii=False) + "\n").encode())
    summary.rejects[reason] = summary.rejects.get(reason, 0) + 1


def _check_other_parts(output_prefix: str, num_parts: int) -> None:
    """Refuse to add a part of num_parts next to parts of another split count (a resubmission with a wrong N
    would put inputs in two parts, or in none)."""
    for path in sorted(glob.glob(glob.escape(output_prefix) + "_part*.preprocess.json")):
        try:
            with open(path, encoding="utf-8") as f:
                other = json.load(f).get("params", {}).get("part")
        except (OSError, ValueError):
            continue  # not ours to judge: _load_journal reports a broken journal of this part
        if other and other[1] != num_parts:
            raise ValueError(f"{path} is part {other[0]} of {other[1]}, this run splits the inputs into "
                             f"{num_parts}: give --part I/{other[1]} (resubmitting some array tasks: set NUM_PARTS), "
                             f"or delete {output_prefix}_part* to start over")


class _StopFlag:
    """SIGINT/SIGTERM/SIGUSR1 set `requested` (the loop stops at the next file boundary); a second SIGINT raises.
    USR1 is Slurm's warning before the time limit (launch/preprocess.sbatch: --signal=USR1@300)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> _StopFlag:
        try:
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _progress_bar(total: int, initial: int, progress: bool | None):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="file", dynamic_ncols=True, smoothing=0.05)
