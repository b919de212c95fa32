"""What a user hands the preprocessor (and evaluation on raw files): a folder, a JSONL manifest, a fairseq TSV or a
corpus table (importers.py), listed as InputItems with their labels; ids made unique and checked."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from megatron_speech.data.index import iter_jsonl

# Keys the preprocessor writes; an input manifest may carry "id" (it names the utterance) but none of the others.
OUTPUT_KEYS = ("shard", "index", "id", "source", "samples", "orig_sample_rate", "orig_channels", "audio_hash",
               "warnings")
_TSV_LABEL_FILES = (("wrd", "text"), ("phn", "phonemes"), ("ltr", "ltr"))


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
