"""Audio files → 16 kHz int16 megatron-core IndexedDataset shards + manifests + a rejects report (DESIGN §2, §11).

    summary = preprocess("wavs/", "data/corpus", workers=16)    # tools/preprocess_audio.py is the CLI
    print(summary.format())

Inputs, told apart by their content, never by a guess (the kind is part of the journal's fingerprint):
  "directory"  a folder, walked recursively, symlinks followed; every regular file is tried as audio whatever its
               name, and what does not decode is a reject. A folder holding LibriSpeech, Multilingual LibriSpeech or
               CommonVoice metadata ("librispeech", "mls", "commonvoice", joined by "+" when several) is walked the
               same way, and its transcripts add labels and corpus ids (megatron_speech/data/importers.py).
  "jsonl"      a file whose first line starts with "{": one object per line, "path" (relative to the manifest's
               folder) plus any labels, copied to the output; an "id" key names the utterance.
  "tsv"        a fairseq TSV manifest: line 1 an existing folder (the root; relative to the manifest's folder) with
               no tab, line 2 `relpath<TAB>frames`; its sidecar label files `STEM.wrd`, `STEM.phn`, `STEM.ltr` (one
               line per audio line, fairseq's layout) become the labels "text", "phonemes", "ltr".
  "table"      a CSV/TSV whose header names the audio column ("path", "audio", "file_name", ...: importers.py); the
               other columns become labels. "commonvoice": a CommonVoice *.tsv (client_id, path, sentence, ...; the
               audio in clips/ next to it); sentence, client_id, locale become "text", "speaker", "language".
Anything else is a ValueError naming the file, its first line and these layouts. A folder is processed in sorted
relative-path order (then the transcript lines whose audio is missing, as rejects), a manifest in line order.

Per file (in a worker process): decode with soundfile (libsndfile) as float32, check the header against what decodes,
mix to mono (mean of the channels), resample to 16 kHz with soxr at quality "HQ" (libsoxr's 20-bit preset: already
finer than the int16 output; "VHQ" cost 1-5x the time here for nothing left after rounding), round to int16
(x * 32768, round half to even, clip). Files that are already 16 kHz are not resampled.

Outputs, for PREFIX = out/corpus (shard names relative to the manifests' folder):
  out/corpus_train_00000.{bin,idx} ...   megatron-core IndexedDataset, dtype int16, one sequence and one document per
  out/corpus_valid_00000.{bin,idx} ...   utterance; a shard is closed before it would pass shard_size_gb * 1e9 bytes
                                         of .bin (a longer single utterance gets a shard of its own)
  out/corpus_{train,valid}.manifest.jsonl  one object per utterance, in shard order:
      "shard" (e.g. "corpus_train_00000"), "index" (its position in that shard), "id", "source" (absolute input
      path), "samples" (at 16 kHz), "orig_sample_rate", "orig_channels", "audio_hash" (blake2b-128 hex of the
      stored int16 little-endian bytes),
      "warnings" (list, usually empty: "clipped" = a run of >= 3 samples at >= 99.9% of full scale in the input,
      "overshoot" = resampling rang past full scale and samples were clipped to int16), then for a segment of a
      longer recording "parent" (the input's id) and "offset" (its first sample in the input's 16 kHz audio), then
      the input's labels.
  out/corpus.rejects.jsonl   one object per rejected input (or segment): "source", "reason" (REJECT_REASONS),
                             "detail", "id" (and a segment's "parent", "offset").
  out/corpus.preprocess.json the run's journal: arguments, fingerprint, progress; "complete": true once done.
  out/corpus_{train,valid}.index  the binary utterance index of each manifest (data/index.py), written last: what
                             the trainer memory-maps instead of parsing the manifest.
Both manifests and the rejects file always exist at the end (possibly empty). Every input (every segment of a cut
one) lands in exactly one of them. The split is by a hash of (seed, id): an utterance stays in the same split when
inputs are added or reordered; a segment goes by its parent's id, so valid never shares a recording with train.

Long recordings (max_segment_seconds, default 30; 0 = never cut): an unlabeled input longer than that is cut at
low-energy points into segments of at most max_segment_seconds and at least min_seconds (megatron_speech/data/
segment.py has the rule), each a manifest row of its own with id "{parent}@{offset}" (e.g. "talks/a.flac@472200";
stable: the cuts depend on the audio alone; unique: two parents never give the same id, and a segment whose id is
also some input's id is rejected as "duplicate_id"). The segments' samples add up to the input's, in order. "Unlabeled":
the input has no label other than "language"; a transcript, phonemes, a speaker or any other key describes the
whole file, so such an input is never cut. Duplicates are found per segment (a duplicate segment is rejected,
its siblings kept). Cutting runs in the workers; the unit of progress stays the input file.

Parts (`part=(i, n)`, the CLI's --part I/N; a Slurm array runs one per task: launch/preprocess.sbatch): the run
takes the inputs whose id hashes to i modulo n (blake2b, independent of the split's hash) and writes PREFIX_partIIII
(4 digits) with its own journal. By id hash, not contiguous ranges: parts balance in hours even when a language's
files are all long, and adding inputs changes only the parts they fall in (the others stay complete). The split,
the segments and each kept utterance's bytes do not depend on n; duplicates are found within a part only (an input
and its copy in another part are both kept). Train on all parts with data.prefix='PREFIX_part*'.

Truncation policy: a file whose header declares more audio than the file holds (a WAV/AIFF/W64 data chunk longer than
the file, an RF64 ds64 data size above what is there, fewer frames decodable than the header states) is rejected as
"truncated", never kept in part, whatever its format: it is nearly always an interrupted copy, its labels (text,
phonemes) describe audio that is missing, and the fix is to copy it again. A streamed WAV (data size 0xFFFFFFFF) is not
truncated. MP3 frame counts are estimates (exact only with a Xing/LAME header), so MP3 is truncated only when more than
1% + 2 MPEG frames are missing. A decoder error part-way (e.g. a FLAC cut mid-frame: "lost sync") is "decode_error".
libsndfile reports a cut Ogg as either malformed ("unreadable") or as holding 0 frames ("empty", with its byte size in
the detail): it cannot be told from an empty one. A WAV whose header says 0 data bytes is "empty" too.
Duplicates are found by the first 64 bits of audio_hash (a false match has odds ~n^2 / 2^65 for n kept utterances).

Resume: the journal is rewritten atomically (temp file + rename) after every closed shard (after the input, when a
shard closes between two segments of one) and every `checkpoint_seconds`, always at an input boundary, recording
the inputs done, each split's closed shards (name, items, bytes), the open shard's
item count and bytes, and the byte length of every manifest/rejects file. Shards are written as `*.bin.partial` and
renamed when closed; manifests and rejects are `*.partial` until the end. A rerun of the same command (same inputs with
the same sizes and mtimes, same output-affecting arguments, same library versions; --workers may change) truncates the
files to the journal, rebuilds the open shard from its bytes (checked against each utterance's audio_hash) and goes on:
the result is byte-identical to an uninterrupted run (tested on one machine; soxr's output could differ on
another CPU type, which the fingerprint cannot see; the cut points are exact integer arithmetic). A rerun with
changed arguments or inputs is refused. SIGINT, SIGTERM or SIGUSR1 (Slurm's warning signal) stops at the next file
boundary, saves a checkpoint and raises PreprocessInterrupted.

Memory: the input list (~0.5 KB per input) and the duplicate detector (~110 bytes per kept utterance) live in the
main process; split very large corpora into several prefixes or parts (data.prefix takes several, and globs).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from megatron_speech.common.audio import SAMPLE_RATE
from megatron_speech.data.index import iter_jsonl
from megatron_speech.data.segment import cut_offsets

FORMAT_VERSION = 2
"""Bump when the bytes written for the same inputs change: a journal of another version is not resumed.
2: long unlabeled inputs are cut into segments (max_segment_seconds, default 30)."""
RESAMPLE_QUALITY = "HQ"
SPLITS = ("train", "valid")
REJECT_REASONS = {
    "unreadable": "soundfile cannot open it (not audio, an unsupported format or a broken header)",
    "empty": "no audio frames (a 0-byte file, or a header with no data)",
    "truncated": "the header declares more audio than the file holds",
    "decode_error": "opened, but decoding failed part-way",
    "nan_or_inf": "a float file with NaN or infinite samples",
    "too_short": "shorter than min_seconds at 16 kHz",
    "silent": "peak-to-peak <= 2 LSB at 16 bit: digital silence or a constant",
    "duplicate": "the same 16 kHz int16 audio as an utterance kept earlier",
    "duplicate_id": "its id was already used by an earlier input",
    "missing": "a manifest entry whose file does not exist or is not a regular file",
    "crashed": "decoding it killed the worker process twice (a decoder crash, or out of memory)",
}
# Keys the preprocessor writes; an input manifest may carry "id" (it names the utterance) but none of the others.
OUTPUT_KEYS = ("shard", "index", "id", "source", "samples", "orig_sample_rate", "orig_channels", "audio_hash",
               "warnings")
SEGMENT_KEYS = ("parent", "offset")
"""Written after OUTPUT_KEYS on a segment's row: its input's id and its first sample in the input's 16 kHz audio."""
UNLABELED_KEYS = ("language",)
"""Input keys that do not make an input labeled: an input with no other key may be cut into segments."""
_TSV_LABEL_FILES = (("wrd", "text"), ("phn", "phonemes"), ("ltr", "ltr"))
_BLOCK_FRAMES = 1 << 17  # decode and resample in blocks: memory stays bounded for hour-long files
_FULL_SCALE = 0.999
_MPEG_FRAME = 1152


class PreprocessInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run after a checkpoint; rerunning the same command continues it."""


# --------------------------------------------------------------------------------------------------- inputs


@dataclass(slots=True)
class InputItem:
    """One input file: where it is, what it is called, its labels, and a reject decided while listing."""

    source: str
    id: str
    labels: dict[str, Any]
    reject: tuple[str, str] | None = None
    size: int = -1
    mtime_ns: int = -1


# What follows an output prefix in its files' names (a part's prefix too: PREFIX_part0003_train_00000.bin).
_OUTPUT_NAME = re.compile(
    r"(_part\d{4,})?(_(train|valid)(_\d{5,}\.(bin|idx)(\.partial(\.resume)?)?|\.manifest\.jsonl(\.partial)?)"
    r"|_(train|valid)\.index(\.lock|\.tmp\.\w+)?"  # the utterance index (data/index.py)
    r"|\.rejects\.jsonl(\.partial)?|\.preprocess\.(json(\.tmp)?|lock))"
)


def list_inputs(input_path: str, output_prefix: str | None = None, stat: bool = True) -> tuple[str, list[InputItem]]:
    """(kind, items) for a folder ("directory", or a corpus folder: "librispeech", "mls", "commonvoice", joined by
    "+"), a JSONL ("jsonl"), fairseq TSV ("tsv") or header table ("table", "commonvoice") manifest.

    Files of `output_prefix`'s own outputs are left out of a folder walk. Items are stat'ed (stat=False: the
    caller calls _stat_and_dedupe_ids on the items it keeps, e.g. one part of 10^8 files on a parallel file
    system); missing files and repeated ids are marked as rejects then. Raises ValueError for a malformed
    manifest, naming file and line.
    """
    from megatron_speech.data import importers  # not at the top: importers builds InputItems (an import cycle)

    if os.path.isdir(input_path):
        kind, items = importers.label_folder(input_path, _list_directory(input_path, output_prefix))
    elif os.path.isfile(input_path):
        kind = _manifest_kind(input_path)
        if kind in ("jsonl", "tsv"):
            items = _list_jsonl(input_path) if kind == "jsonl" else _list_tsv(input_path)
        else:
            items = importers.read_table(input_path, kind)
    else:
        raise ValueError(f"--input {input_path!r} does not exist: give a folder of audio or a JSONL/TSV/CSV manifest")
    if not items:
        raise ValueError(f"--input {input_path!r} lists no files")
    if stat:
        _stat_and_dedupe_ids(items, input_path)
    return kind, items


def _list_directory(root: str, output_prefix: str | None) -> list[InputItem]:
    root_abs = os.path.abspath(root)
    out_abs = os.path.abspath(output_prefix) if output_prefix else None
    visited: set[tuple[int, int]] = set()
    found: list[tuple[str, str, bool]] = []  # (relpath, abspath, is a regular file)

    def fail(err: OSError) -> None:
        raise ValueError(f"cannot list {err.filename!r} under --input {root!r}: {err.strerror}; fix its permissions or "
                         "move it out of the input folder")

    for dirpath, dirnames, filenames in os.walk(root_abs, onerror=fail, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in visited:  # a symlink cycle, or a second way to reach the same folder
            dirnames[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            if out_abs and path.startswith(out_abs) and _OUTPUT_NAME.fullmatch(path[len(out_abs):]):
                continue
            found.append((os.path.relpath(path, root_abs).replace(os.sep, "/"), path, os.path.isfile(path)))
    found.sort()
    items = []
    for rel, path, regular in found:
        item = InputItem(path, rel, {})
        if not regular:
            item.reject = ("unreadable", "not a regular file (a broken symbolic link, a FIFO or a device)")
        items.append(item)
    return items


_FAIRSEQ_LINE = re.compile(r"[^\t]+\t\d+\s*")
_LAYOUTS = ('a JSONL file with one {"path": ...} object per line; a fairseq TSV (line 1 an existing root folder, '
            "then relpath<TAB>frames lines); a CSV/TSV table whose header names the audio column (one of COLUMNS), "
            "such as CommonVoice's validated.tsv; or a folder (of audio, or a LibriSpeech, MLS or CommonVoice corpus)")


def _manifest_kind(path: str) -> str:
    """"jsonl", "tsv" (fairseq) or a header table's kind ("table", "commonvoice"), from the first two lines."""
    from megatron_speech.data import importers

    first = second = None
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if first is not None:
                    second = line.rstrip("\r\n")
                    break
                if line.strip():
                    first = line.rstrip("\r\n")
    except UnicodeDecodeError:
        pass
    layouts = _LAYOUTS.replace("COLUMNS", ", ".join(importers.PATH_COLUMNS))
    if first is None:
        raise ValueError(f"--input {path!r} is neither a folder nor a manifest (empty or not UTF-8 text). Accepted: "
                         f"{layouts}")
    if first.lstrip().startswith("{"):
        return "jsonl"
    # fairseq: a root folder without a tab, then relpath<TAB>frames. A header line (CommonVoice's holds tabs) is
    # never taken for the root: the root must exist.
    if "\t" not in first and (second is None or _FAIRSEQ_LINE.fullmatch(second)):
        root = os.path.join(os.path.dirname(os.path.abspath(path)), first.strip())
        if os.path.isdir(root):
            return "tsv"
        if second is not None:
            raise ValueError(f"{path}:1: a fairseq TSV manifest (line 2 is relpath<TAB>frames) whose root folder "
                             f"{first.strip()!r} (line 1) is not a folder (resolved to {root}); fix the first line")
    kind = importers.table_kind(path, first)
    if kind is None:
        raise ValueError(f"--input {path!r}: cannot tell its layout from its first line {first[:200]!r}. Accepted: "
                         f"{layouts}")
    return kind


def _list_jsonl(path: str) -> list[InputItem]:
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for where, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("path"), str) or not obj["path"]:
            raise ValueError(f'{where}: needs a "path" key holding the audio file\'s path (relative to {base})')
        clash = [k for k in obj if k in OUTPUT_KEYS and k != "id"]
        if clash:
            raise ValueError(f'{where}: key "{clash[0]}" is written by the preprocessor; rename it in the '
                             f'manifest (e.g. "input_{clash[0]}")')
        rel = obj.pop("path")
        uid = obj.pop("id", None)
        if uid is None:
            uid = os.path.normpath(rel).replace(os.sep, "/")
        elif isinstance(uid, bool) or not isinstance(uid, str | int) or uid == "":
            raise ValueError(f'{where}: "id" must be a non-empty string or an integer, got {uid!r}')
        items.append(InputItem(os.path.abspath(os.path.join(base, rel)), str(uid), obj))
    return items


def _list_tsv(path: str) -> list[InputItem]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    root = lines[0].strip() if lines else ""
    if not root:
        raise ValueError(f"{path}:1: a fairseq TSV manifest starts with its root folder on the first line")
    root_abs = os.path.abspath(os.path.join(base, root))
    rels = []
    for lineno, line in enumerate(lines[1:], 2):
        rel = line.split("\t")[0].strip()
        if not rel:
            raise ValueError(f"{path}:{lineno}: empty line; fairseq TSV lines are relpath<TAB>frames "
                             "(label files are matched to them by line number, so no blank lines)")
        rels.append(rel)
    labels: list[dict[str, Any]] = [{} for _ in rels]
    stem = path[: -len(".tsv")] if path.endswith(".tsv") else path
    for ext, key in _TSV_LABEL_FILES:
        side = f"{stem}.{ext}"
        if not os.path.isfile(side):
            continue
        with open(side, encoding="utf-8") as f:
            values = f.read().splitlines()
        if len(values) != len(rels):
            raise ValueError(f"{side} has {len(values)} lines for the {len(rels)} audio lines of {path}: fairseq "
                             f"label files hold one line per audio line; fix it or move it away")
        for d, v in zip(labels, values, strict=True):
            d[key] = v
    return [InputItem(os.path.abspath(os.path.join(root_abs, rel)), rel, lab)
            for rel, lab in zip(rels, labels, strict=True)]


def _stat_and_dedupe_ids(items: list[InputItem], input_path: str) -> None:
    first: dict[str, str] = {}
    num_missing = 0
    for item in items:
        try:
            st = os.stat(item.source)
            item.size, item.mtime_ns = st.st_size, st.st_mtime_ns
            regular = os.path.isfile(item.source)
        except OSError:
            regular = False
        if item.reject is None and not regular:
            item.reject = ("missing", "no such file" if item.size < 0 else "not a regular file")
            num_missing += 1
        if item.id in first:
            if item.reject is None:
                item.reject = ("duplicate_id", f"id {item.id!r} was already used by {first[item.id]}")
        else:
            first[item.id] = item.source
    if num_missing == len(items):
        raise ValueError(f"none of the {len(items)} files listed in {input_path} exists (the first resolves to "
                         f"{items[0].source}); paths are relative to the manifest's folder (fairseq TSV: to its "
                         "root line; CommonVoice: to clips/ next to the .tsv)")


# --------------------------------------------------------------------------------------------------- decoding


@dataclass(slots=True)
class Kept:
    """A decoded utterance: int16 samples at 16 kHz and what the report needs.

    segments: when the input was cut, (offset, audio_hash) per segment, in order (the samples from each offset to
    the next, or to the end); empty = one utterance, whose hash is audio_hash."""

    samples: np.ndarray
    orig_sample_rate: int
    orig_channels: int
    orig_seconds: float
    warnings: list[str]
    audio_hash: str
    segments: list[tuple[int, str]] = field(default_factory=list)


@dataclass(slots=True)
class Rejected:
    """Why an input is not kept; orig_seconds is the audio decoded before deciding (for the speed report)."""

    reason: str
    detail: str
    orig_seconds: float = 0.0


# libsndfile's log names a chunk whose declared size the file cannot hold: WAV "data", AIFF "SSND", W64 "riff".
_CHUNK_SHORT = re.compile(r"^\s*(data|SSND|riff) : (\d+) \(should be (\d+)\)", re.M)
# RF64 keeps the data size in its ds64 chunk (its frame count field is optional, and often wrong: scipy's files).
_RF64_DATA_SIZE = re.compile(r"^\s*Data size : (\d+)$", re.M)
_BLOCK_ALIGN = re.compile(r"^\s*Block Align\s*: (\d+)$", re.M)
_STREAMED_SIZES = (0xFFFFFFFF, 0x7FFFFFFF)  # written by streaming writers (ffmpeg to a pipe): "size unknown"


def _header_truncation(log: str, num_frames: int) -> str | None:
    """What libsndfile's log says is missing (`num_frames`: the frames it found), or None."""
    for m in _CHUNK_SHORT.finditer(log):
        declared, held = int(m[2]), int(m[3])
        if held < declared and declared not in _STREAMED_SIZES:
            return f"its '{m[1]}' chunk declares {declared} bytes, the file holds {held}"
    size, align = _RF64_DATA_SIZE.search(log), _BLOCK_ALIGN.search(log)
    if size and align:
        declared, held = int(size[1]), num_frames * int(align[1])
        if declared - held >= int(align[1]) and declared < 0xFFFFFFFFFFFFFFFF:
            return f"its ds64 chunk declares {declared} bytes of data, the file holds {held}"
    return None


def _message(e: BaseException) -> str:
    return getattr(e, "error_string", None) or str(e) or type(e).__name__


def decode_file(path: str, min_samples: int) -> Kept | Rejected:
    """Decode `path`, mix to mono, resample to 16 kHz, round to int16 and check it (runs in the workers).

    Returns Kept (int16 samples [n] at 16 kHz) or Rejected (a REJECT_REASONS key and a detail for the report).
    `min_samples` (at 16 kHz) makes shorter results "too_short"; a result must have at least one sample.
    """
    try:
        f = sf.SoundFile(path)
    except (RuntimeError, OSError, ValueError, TypeError) as e:
        size = os.path.getsize(path) if os.path.exists(path) else -1
        if size == 0:
            return Rejected("empty", "a 0-byte file")
        return Rejected("unreadable", f"libsndfile {sf.__libsndfile_version__}: {_message(e)} ({size} bytes)")
    with f:
        sr, channels, declared = f.samplerate, f.channels, f.frames
        fmt = f"{f.format}/{f.subtype}"
        is_mp3 = f.format == "MP3"
        short = _header_truncation(f.extra_info, declared)
        if short:
            return Rejected("truncated", f"{fmt}: {short}")
        if declared <= 0:
            return Rejected("empty", f"{fmt}: no audio frames in its {os.path.getsize(path)} bytes")
        resampler = None if sr == SAMPLE_RATE else soxr.ResampleStream(
            sr, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        pieces: list[np.ndarray] = []
        num_read, clipped = 0, False
        try:
            while num_read < declared:
                block = f.read(min(_BLOCK_FRAMES, declared - num_read), dtype="float32", always_2d=True)  # [n, C]
                if len(block) == 0:
                    break
                finite = np.isfinite(block)
                if not finite.all():
                    bad = int(np.argmin(finite.all(axis=1)))
                    return Rejected("nan_or_inf", f"{fmt}: a NaN or infinite sample at frame {num_read + bad}",
                                    (num_read + bad) / sr)
                clipped = clipped or _has_clipping(block)
                mono = _mix_to_mono(block)  # [n]
                num_read += len(block)
                pieces.append(resampler.resample_chunk(mono) if resampler else mono)
            if resampler:
                pieces.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        except (RuntimeError, ValueError, MemoryError, OSError) as e:
            return Rejected("decode_error", f"{fmt}: decoding stopped after {num_read} of {declared} frames: "
                            f"{_message(e)}", num_read / sr)
    seconds = num_read / sr
    missing = declared - num_read
    tolerated = declared // 100 + 2 * _MPEG_FRAME if is_mp3 else 0  # MP3 lengths are estimates
    if missing > tolerated:
        return Rejected("truncated", f"{fmt}: the header declares {declared} frames, {num_read} decode", seconds)
    scaled = np.rint(np.concatenate(pieces) * np.float32(32768.0))
    overshoot = bool(np.any(np.abs(scaled) > 32768.0))
    samples = np.clip(scaled, -32768, 32767).astype(np.int16)  # [n] at 16 kHz
    if len(samples) < max(min_samples, 1):
        return Rejected("too_short", f"{len(samples) / SAMPLE_RATE:.3f} s at 16 kHz (minimum "
                        f"{min_samples / SAMPLE_RATE:g} s)", seconds)
    peak_to_peak = int(samples.max()) - int(samples.min())
    if peak_to_peak <= 2:
        return Rejected("silent", f"{fmt}: peak-to-peak {peak_to_peak} LSB at 16 bit over "
                        f"{len(samples) / SAMPLE_RATE:.2f} s", seconds)
    notes = (["clipped"] if clipped else []) + (["overshoot"] if overshoot else [])
    return Kept(samples, sr, channels, seconds, notes, _audio_hash(samples))


def _audio_hash(samples: np.ndarray) -> str:
    """blake2b-128 hex of int16 [n] samples as little-endian bytes (the manifests' audio_hash)."""
    return hashlib.blake2b(np.ascontiguousarray(samples, dtype="<i2").data, digest_size=16).hexdigest()


def decode_and_segment(process_fn: Callable[[str, int], Kept | Rejected], path: str, min_samples: int,
                       max_segment_samples: int) -> Kept | Rejected:
    """process_fn(path, min_samples) (decode_file), then, when the result is longer than max_segment_samples (> 0),
    its cut points and per-segment hashes in Kept.segments (segment.py's rule). Runs in the workers: an hour of
    audio costs ~0.2 s of energy and hashing there, which the single writing process could not spare."""
    result = process_fn(path, min_samples)
    if isinstance(result, Kept) and 0 < max_segment_samples < len(result.samples):
        offsets = cut_offsets(result.samples, max_segment_samples, min_samples)
        ends = offsets[1:] + [len(result.samples)]
        result.segments = [(a, _audio_hash(result.samples[a:b])) for a, b in zip(offsets, ends, strict=True)]
    return result


def _mix_to_mono(block: np.ndarray) -> np.ndarray:
    """Mean over channels: [n, C] → [n] float32. Summed channel by channel: block.mean(axis=1) up to float32
    rounding (bit-equal up to 5 channels here) at a twentieth of its cost on a short axis."""
    mono = np.array(block[:, 0])
    for c in range(1, block.shape[1]):
        mono += block[:, c]
    if block.shape[1] > 1:
        mono /= np.float32(block.shape[1])
    return mono


def _has_clipping(block: np.ndarray) -> bool:
    """True when a channel holds >= 3 consecutive samples at >= 99.9% of full scale. block: [n, C] float."""
    if len(block) < 3 or float(np.abs(block).max()) < _FULL_SCALE:
        return False
    hot = np.abs(block) >= _FULL_SCALE
    return bool((hot[:-2] & hot[1:-1] & hot[2:]).any())


def is_valid(uid: str, seed: int, valid_fraction: float) -> bool:
    """Whether utterance `uid` belongs to the valid split: a hash of (seed, id), not its position."""
    digest = hashlib.blake2b(f"{seed}\0{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < valid_fraction * 2.0**64


def part_of(uid: str, num_parts: int) -> int:
    """The part (0 .. num_parts - 1) input `uid` belongs to: a hash of its id alone (salted apart from is_valid's,
    so every part keeps the same valid share), stable when other inputs are added or reordered."""
    digest = hashlib.blake2b(uid.encode(), digest_size=8, person=b"ms-part").digest()
    return int.from_bytes(digest, "little") % num_parts


def part_prefix(output_prefix: str, index: int) -> str:
    """The outputs' prefix of part `index`: PREFIX_part0003."""
    return f"{output_prefix}_part{index:04d}"


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


# --------------------------------------------------------------------------------------------------- writing


def _builder_class() -> type:
    # Imported here: workers must not pay for (or fork) torch and megatron-core.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _reclaim(partial: str, final: str) -> None:
    """A crash can land after `partial` was renamed to `final` but before the journal said so: take it back."""
    if not os.path.exists(partial) and os.path.exists(final):
        os.replace(final, partial)


def _open_truncated(path: str, num_bytes: int, what: str):
    """Open `path` for appending after truncating it to the journal's `num_bytes`."""
    size = os.path.getsize(path) if os.path.exists(path) else -1
    if size < num_bytes:
        raise _Mismatch(f"{path} holds {max(size, 0)} bytes, the journal recorded {num_bytes} of {what}")
    f = open(path, "r+b")  # noqa: SIM115 - kept open for the whole run
    f.truncate(num_bytes)
    f.seek(num_bytes)
    return f


class _Mismatch(RuntimeError):
    """The files on disk disagree with the journal (edited or deleted by hand)."""


class _Split:
    """The shards and the manifest of one split (train or valid)."""

    def __init__(self, prefix: str, split: str, max_bytes: int, state: dict | None) -> None:
        self.prefix, self.split, self.max_bytes = prefix, split, max_bytes
        self.base = os.path.basename(prefix)
        self.manifest_path = f"{prefix}_{split}.manifest.jsonl"
        self.shards: list[dict] = []  # closed: {"name", "items", "bin_bytes"}
        self.builder = None
        self.open_items = self.open_bytes = 0
        self._manifest_bytes = 0
        if state is None:
            self._remove_stale(0)  # a crash before the first checkpoint may have left a shard 0
            self.manifest = open(self.manifest_path + ".partial", "wb")  # noqa: SIM115
        else:
            self._resume(state)

    def name(self, number: int) -> str:
        return f"{self.base}_{self.split}_{number:05d}"

    def path(self, number: int) -> str:
        return os.path.join(os.path.dirname(self.prefix), self.name(number))

    def state(self) -> dict:
        open_ = {"items": self.open_items, "bin_bytes": self.open_bytes} if self.builder is not None else None
        manifest_bytes = self._manifest_bytes if self.manifest.closed else self.manifest.tell()
        return {"manifest_bytes": manifest_bytes, "shards": list(self.shards), "open": open_}

    def records(self) -> Iterator[dict]:
        """The manifest written so far (call after flush)."""
        with open(self.manifest_path + ".partial", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def add(self, samples: np.ndarray, record: dict) -> None:
        """Append one utterance (int16 [n]) to the open shard and its line to the manifest."""
        import torch

        if self.builder is None:
            self.builder = _builder_class()(self.path(len(self.shards)) + ".bin.partial", dtype=np.int16)
        record = {"shard": self.name(len(self.shards)), "index": self.open_items, **record}
        self.builder.add_item(torch.from_numpy(samples))
        self.builder.end_document()
        self.manifest.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self.open_items += 1
        self.open_bytes += samples.nbytes

    def would_overflow(self, num_bytes: int) -> bool:
        return self.builder is not None and self.open_bytes + num_bytes > self.max_bytes

    def close_shard(self) -> None:
        """Finalize the open shard and rename it to its final name (the caller then writes the journal)."""
        path = self.path(len(self.shards))
        self.builder.finalize(path + ".idx.partial")
        for ext in (".bin", ".idx"):
            with open(path + ext + ".partial", "rb") as f:
                os.fsync(f.fileno())
        os.replace(path + ".bin.partial", path + ".bin")
        os.replace(path + ".idx.partial", path + ".idx")
        _fsync_dir(path)
        self.shards.append({"name": self.name(len(self.shards)), "items": self.open_items,
                            "bin_bytes": self.open_bytes})
        self.builder, self.open_items, self.open_bytes = None, 0, 0

    def flush(self) -> None:
        if self.builder is not None:
            _flush(self.builder.data_file)
        _flush(self.manifest)

    def finish(self) -> None:
        if self.builder is not None:
            self.close_shard()
        _flush(self.manifest)
        self._manifest_bytes = self.manifest.tell()
        self.manifest.close()
        os.replace(self.manifest_path + ".partial", self.manifest_path)

    def close_files(self) -> None:
        self.manifest.close()
        if self.builder is not None:
            self.builder.data_file.close()

    def _resume(self, state: dict) -> None:
        _reclaim(self.manifest_path + ".partial", self.manifest_path)
        self.manifest = _open_truncated(self.manifest_path + ".partial", state["manifest_bytes"], "manifest")
        self.shards = list(state["shards"])
        for shard in self.shards:
            path = os.path.join(os.path.dirname(self.prefix), shard["name"])
            if not os.path.exists(path + ".idx") or not os.path.exists(path + ".bin") or \
                    os.path.getsize(path + ".bin") != shard["bin_bytes"]:
                raise _Mismatch(f"closed shard {path}.bin/.idx is missing or not {shard['bin_bytes']} bytes")
        number = len(self.shards)
        path = self.path(number)
        aside = path + ".bin.partial.resume"
        if state["open"]:
            # The open shard's bytes: set aside (a crash while rebuilding leaves the aside copy as the source).
            for src in (path + ".bin.partial", path + ".bin"):
                if not os.path.exists(aside) and os.path.exists(src):
                    os.replace(src, aside)
            if not os.path.exists(aside):
                raise _Mismatch(f"the open shard {path}.bin.partial is missing")
        self._remove_stale(number)
        if state["open"]:
            self._rebuild(aside, state["open"])
            os.remove(aside)

    def _remove_stale(self, first: int) -> None:
        """Delete shard files numbered >= first (written after the journal), except the aside copy."""
        folder = os.path.dirname(os.path.abspath(self.prefix))
        pattern = re.compile(re.escape(self.base) + rf"_{self.split}_(\d{{5,}})\.(bin|idx)(\.partial)?")
        for name in os.listdir(folder):
            m = pattern.fullmatch(name)
            if m and int(m[1]) >= first:
                os.remove(os.path.join(folder, name))

    def _rebuild(self, source: str, open_state: dict) -> None:
        import torch

        name = self.name(len(self.shards))
        self.flush()
        records = [r for r in self.records() if r["shard"] == name]
        if [r["index"] for r in records] != list(range(open_state["items"])) or \
                2 * sum(r["samples"] for r in records) != open_state["bin_bytes"]:
            raise _Mismatch(f"the manifest's lines for {name} do not match the journal's open shard")
        self.builder = _builder_class()(self.path(len(self.shards)) + ".bin.partial", dtype=np.int16)
        with open(source, "rb") as f:
            for r in records:
                samples = np.fromfile(f, dtype="<i2", count=r["samples"])
                digest = hashlib.blake2b(samples.data, digest_size=16).hexdigest()
                if len(samples) != r["samples"] or digest != r["audio_hash"]:
                    raise _Mismatch(f"utterance {r['id']!r} in {source} does not match its audio_hash")
                self.builder.add_item(torch.from_numpy(samples))
                self.builder.end_document()
        self.open_items, self.open_bytes = open_state["items"], open_state["bin_bytes"]


# --------------------------------------------------------------------------------------------------- the run


@dataclass
class Summary:
    """What a run did. Counts cover the whole job (resumed parts included); speed covers this session."""

    num_inputs: int
    num_train: int = 0
    num_valid: int = 0
    kept_samples: int = 0
    decoded_seconds: float = 0.0
    rejects: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    train_shards: int = 0
    valid_shards: int = 0
    num_cut_inputs: int = 0
    """Long unlabeled inputs cut into segments."""
    num_segments: int = 0
    """Segments those were cut into (kept or rejected; num_train + num_valid count the kept ones)."""
    part: tuple[int, int] | None = None
    resumed_at: int = 0
    session_decoded_seconds: float = 0.0
    wall_seconds: float = 0.0
    workers: int = 1

    @property
    def num_kept(self) -> int:
        return self.num_train + self.num_valid

    @property
    def kept_hours(self) -> float:
        return self.kept_samples / SAMPLE_RATE / 3600

    def real_time_factor(self) -> float:
        """Seconds of input audio decoded per wall-clock second in this session."""
        return self.session_decoded_seconds / max(self.wall_seconds, 1e-9)

    def format(self, prefix: str = "PREFIX") -> str:
        rejects = sum(self.rejects.values())
        of_part = f" (part {self.part[0]} of {self.part[1]})" if self.part else ""
        lines = [
            f"{self.num_inputs} files in{of_part}: {self.num_kept} kept ({self.num_train} train, {self.num_valid} "
            f"valid), {self.kept_hours:.3f} h at 16 kHz in {self.train_shards} train + {self.valid_shards} valid "
            "shards",
            f"{rejects} rejected" + (": " + ", ".join(f"{r} {n}" for r, n in sorted(self.rejects.items()))
                                     + f" (see {prefix}.rejects.jsonl)" if rejects else ""),
        ]
        if self.num_cut_inputs:
            files = "file" if self.num_cut_inputs == 1 else "files"
            lines.insert(1, f"{self.num_cut_inputs} long unlabeled {files} cut into {self.num_segments} segments "
                         "(each a kept utterance or a reject)")
        if self.warnings:
            lines.append("warnings on kept files: " + ", ".join(f"{w} {n}" for w, n in sorted(self.warnings.items())))
        if self.resumed_at:
            lines.append(f"resumed at file {self.resumed_at}")
        if self.session_decoded_seconds == 0:
            return "\n".join(lines)
        rtf = self.real_time_factor()
        lines.append(f"{self.session_decoded_seconds / 3600:.3f} h decoded in {self.wall_seconds:.1f} s: {rtf:.0f}x "
                     f"real time ({rtf / max(self.workers, 1):.0f}x per worker, {self.workers} workers)")
        return "\n".join(lines)


def _fingerprint(kind: str, items: list[InputItem], params: dict) -> str:
    h = hashlib.sha256(json.dumps([kind, params], sort_keys=True).encode())
    for it in items:
        h.update(json.dumps([it.source, it.id, it.labels, it.size, it.mtime_ns, it.reject],
                            sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path)


def _existing_outputs(prefix: str) -> list[str]:
    folder = os.path.dirname(os.path.abspath(prefix))
    base = os.path.basename(prefix)
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n.startswith(base) and _OUTPUT_NAME.fullmatch(n[len(base):]))


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


def _write_indexes(prefix: str, log: Callable[[str], None]) -> None:
    """The binary utterance index of each split (data/index.py), so that no trainer parses the manifests: built
    after the journal says complete (a crash in between leaves it to the trainer, which builds a missing one)."""
    from megatron_speech.data.index import ensure_index

    for split in SPLITS:
        ensure_index(prefix, split, log)


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


def parts_status(output_prefix: str, num_parts: int) -> tuple[list[str], list[str]]:
    """(complete, missing) part prefixes of a `num_parts`-part run at output_prefix, by their journals."""
    complete, missing = [], []
    for i in range(num_parts):
        p = part_prefix(output_prefix, i)
        try:
            with open(p + ".preprocess.json", encoding="utf-8") as f:
                done = json.load(f).get("complete", False)
        except (OSError, ValueError):
            done = False
        (complete if done else missing).append(p)
    return complete, missing


def _stats(s: Summary) -> dict:
    return {"num_train": s.num_train, "num_valid": s.num_valid, "kept_samples": s.kept_samples,
            "decoded_seconds": s.decoded_seconds, "rejects": dict(sorted(s.rejects.items())),
            "warnings": dict(sorted(s.warnings.items())), "num_cut_inputs": s.num_cut_inputs,
            "num_segments": s.num_segments}


def _fill_summary(summary: Summary, journal: dict) -> None:
    st = journal["stats"]
    summary.num_cut_inputs, summary.num_segments = st.get("num_cut_inputs", 0), st.get("num_segments", 0)
    summary.num_train, summary.num_valid = st.get("num_train", 0), st.get("num_valid", 0)
    summary.kept_samples, summary.decoded_seconds = st.get("kept_samples", 0), st.get("decoded_seconds", 0.0)
    summary.rejects, summary.warnings = dict(st.get("rejects", {})), dict(st.get("warnings", {}))
    splits = journal["splits"]
    summary.train_shards, summary.valid_shards = (len(splits[s]["shards"]) if splits[s] else 0 for s in SPLITS)


def _check_complete(prefix: str, journal: dict) -> None:
    folder = os.path.dirname(os.path.abspath(prefix))
    expected = [f"{prefix}_{s}.manifest.jsonl" for s in SPLITS] + [prefix + ".rejects.jsonl"]
    for s in SPLITS:
        for shard in journal["splits"][s]["shards"]:
            expected += [os.path.join(folder, shard["name"] + ext) for ext in (".bin", ".idx")]
    missing = [p for p in expected if not os.path.exists(p)]
    if missing:
        raise ValueError(f"{prefix} was completed, but {missing[0]} (and {len(missing) - 1} more) is gone since; "
                         f"delete {prefix}_* and {prefix}.* and run again")


def _load_journal(path: str, prefix: str, params: dict, fingerprint: str) -> dict | None:
    """The journal of an earlier run of the same job, None for a fresh start; ValueError when they differ."""
    if not os.path.exists(path):
        # A leftover journal temp file only means a crash before the first journal was in place.
        # Nor do a lock file (noise packing takes one before it starts) or an index built by a trainer.
        found = [n for n in _existing_outputs(prefix)
                 if not re.search(r"\.preprocess\.(json\.tmp|lock)$|\.index(\.lock|\.tmp\.\w+)?$", n)]
        if found:
            raise ValueError(f"{found[0]} (and {len(found) - 1} more) exist at --output-prefix {prefix} without "
                             f"{os.path.basename(path)}: not the outputs of a resumable run of this tool; delete "
                             "them or choose another --output-prefix")
        return None
    with open(path, encoding="utf-8") as f:
        journal = json.load(f)
    if journal.get("fingerprint") == fingerprint:
        return journal
    old = journal.get("params", {})
    changed = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in params.items() if old.get(k) != v]
    why = "; ".join(changed) if changed else \
        "the input files changed (a file added, removed, renamed, resized or modified, or a label edited)"
    state = "finished" if journal.get("complete") else "was interrupted"
    raise ValueError(f"{prefix} holds the outputs of another run, which {state} ({why}). To resume it, rerun with "
                     f"its arguments and inputs; to start over, delete {prefix}_* and {prefix}.* first; or choose "
                     "another --output-prefix")


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

