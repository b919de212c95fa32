"""Corpus layouts for tools/preprocess_audio.py: CommonVoice, LibriSpeech, Multilingual LibriSpeech, header tables.

preprocess.list_inputs() hands two cases to this module; JSONL and fairseq TSV manifests and plain folders stay there.

Tables (`read_table`): a CSV/TSV manifest whose first line is a header naming the audio column, one of PATH_COLUMNS
(case-insensitive; the first of the list wins when several are present). Tab-separated tables are read without
quoting (CommonVoice's convention: its sentences hold bare quotes), comma-separated ones with CSV quoting. Paths are
relative to the table's folder (or absolute). A column "id" names the utterance, else its path as written does (as
in a JSONL manifest). Every other column with a non-empty value becomes a string label under its own name, except
that the first column present of each LABEL_ALIASES list is renamed to the canonical label ("sentence" -> "text",
"locale" -> "language", "client_id" -> "speaker"). Kind "table", or "commonvoice" when the header holds client_id,
path and sentence (a CommonVoice validated/train/dev/test/other.tsv): then the paths are relative to `clips/` next to
the .tsv and the id is the clip's path without its extension ("common_voice_en_123"; CommonVoice's names are unique
across languages and releases, so a clip keeps its id whichever .tsv lists it).

Folders (`label_folder`, after preprocess's walk): a folder is searched for corpus metadata, recognized by its
place in the layout and by its content:
  LibriSpeech  SPK/CHAP/SPK-CHAP.trans.txt ("SPK-CHAP-NNNN TEXT" lines): the files SPK-CHAP-NNNN.* of that chapter
               folder get "text", "speaker", "chapter", "language": "en" and the id SPK-CHAP-NNNN.
  MLS          SPLIT/transcripts.txt ("SPK_BOOK_UTT<TAB>text" lines) next to SPLIT/audio/: the files
               SPLIT/audio/**/SPK_BOOK_UTT.* (flac, or opus in the opus release) get "text", "speaker", "book", the
               id SPK_BOOK_UTT, and "language" when the split's parent folder is named mls_LANGUAGE[_opus] (one of
               MLS's 8 languages, as an ISO 639-1 code); otherwise no language label.
  CommonVoice  LANG/validated.tsv (a CommonVoice header) next to LANG/clips/: the clips it lists get its labels (as
               for a table); every file in clips/ gets the id of its clip path without extension.
A folder may hold several (LibriSpeech/ with all its subsets, mls_german/ with train/dev/test, several CommonVoice
languages); its kind is their names joined by "+" in sorted order ("librispeech", "commonvoice+mls"), or
"directory" when it holds none, which leaves the walk exactly as it was.
In a folder that holds a corpus: every audio file is still tried, and files the metadata does not name are kept
without labels under their relative path as id (nothing in the folder is dropped silently: a CommonVoice folder
thus includes its unvalidated and invalidated clips; give validated.tsv itself as --input for exactly those); a
metadata line whose audio file is absent becomes a "missing" reject; text files (*.txt, *.tsv: transcripts,
README/LICENSE/SPEAKERS.TXT, CommonVoice's other .tsv files) are metadata and are not tried as audio.
Labels are strings. A malformed metadata line is a ValueError naming file and line.
Memory: a folder's metadata is held as one dict per transcript file until its audio is matched; the labels end up
in the items (the same strings), so the extra is about 100 bytes per utterance of the largest transcript file.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from typing import Any

from megatron_speech.data.inputs import OUTPUT_KEYS, InputItem

PATH_COLUMNS = ("path", "audio_filepath", "audio_path", "audio_file", "audio", "file_name", "filename", "file",
                "filepath", "wav")
"""Header names of the audio column (compared lower-case), in order of preference."""
LABEL_ALIASES = {"text": ("text", "sentence", "transcript", "transcription", "tgt_text"),
                 "language": ("language", "lang", "locale"),
                 "speaker": ("speaker", "speaker_id", "client_id")}
"""Canonical label -> the column names it is read from (the first present wins; the others keep their names)."""
MLS_LANGUAGES = {"english": "en", "german": "de", "dutch": "nl", "french": "fr", "spanish": "es", "italian": "it",
                 "portuguese": "pt", "polish": "pl"}
_COMMONVOICE_COLUMNS = {"client_id", "path", "sentence"}
_LIBRISPEECH_TRANS = re.compile(r"(\d+)-(\d+)\.trans\.txt")
_MLS_LINE = re.compile(r"(\d+)_(\d+)_\d+\t(.*)")
_MLS_FOLDER = re.compile(r"mls_([a-z]+?)(_opus)?", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------- tables


def _split_header(line: str, path: str) -> tuple[str, list[str]]:
    """(delimiter, column names) of a table's first line: tab if it holds one, else comma if it holds one, else by
    the file's extension (a one-column table)."""
    line = line.lstrip("\ufeff").rstrip("\r\n")
    if "\t" in line or ("," not in line and not path.lower().endswith(".csv")):
        delimiter = "\t"
    else:
        delimiter = ","
    return delimiter, [c.strip() for c in next(csv.reader([line], **_dialect(delimiter)), [])]


def _dialect(delimiter: str) -> dict[str, Any]:
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if delimiter == "\t" else {"delimiter": ","}


def _path_column(columns: list[str]) -> int | None:
    lower = [c.lower() for c in columns]
    return next((lower.index(name) for name in PATH_COLUMNS if name in lower), None)


def table_kind(path: str, first_line: str) -> str | None:
    """"commonvoice" or "table" when `first_line` is a header naming an audio column (PATH_COLUMNS), else None."""
    _, columns = _split_header(first_line, path)
    if _path_column(columns) is None:
        return None
    return "commonvoice" if _COMMONVOICE_COLUMNS <= {c.lower() for c in columns} else "table"


def _column_plan(columns: list[str], where: str) -> tuple[int, int | None, list[tuple[int, str]]]:
    """(path column, id column or None, [(column, label name)]) of a header; ValueError for a header it cannot use."""
    lower = [c.lower() for c in columns]
    for i, name in enumerate(lower):
        if not name:
            raise ValueError(f"{where}: column {i + 1} of the header has no name; name it or remove it")
        if name in lower[:i]:
            raise ValueError(f"{where}: two columns are named {columns[i]!r}; rename one")
    p = _path_column(columns)
    assert p is not None, "table_kind() chose this table by its path column"
    id_col = lower.index("id") if "id" in lower else None
    renamed: dict[int, str] = {}
    for canonical, aliases in LABEL_ALIASES.items():
        found = next((lower.index(a) for a in aliases if a in lower), None)
        if found is not None:
            renamed[found] = canonical
    labels = [(i, renamed.get(i, c)) for i, c in enumerate(columns) if i not in (p, id_col)]
    for _, name in labels:
        if name in OUTPUT_KEYS:
            raise ValueError(f'{where}: column "{name}" is written by the preprocessor; rename it in the header '
                             f'(e.g. "input_{name}")')
    return p, id_col, labels


def read_table(path: str, kind: str) -> list[InputItem]:
    """The items of a header table (kind "table" or "commonvoice", from table_kind), in row order.

    Labels are the non-empty cells (stripped strings). ValueError, naming file and line, for a row whose number of
    fields differs from the header's or whose path is empty.
    """
    base = os.path.dirname(os.path.abspath(path))
    if kind == "commonvoice":
        base = os.path.join(base, "clips")
    items = []
    with open(path, encoding="utf-8", newline="") as f:
        header_lineno = 1
        first = f.readline()
        while first and not first.strip():
            first, header_lineno = f.readline(), header_lineno + 1
        delimiter, columns = _split_header(first, path)
        p, id_col, labels = _column_plan(columns, f"{path}:{header_lineno}")
        reader = csv.reader(f, **_dialect(delimiter))
        try:
            for row in reader:
                where = f"{path}:{header_lineno + reader.line_num}"
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(columns):
                    raise ValueError(f"{where}: {len(row)} fields for the {len(columns)} columns of the header" + (
                        " (tab-separated tables are read without quoting)" if delimiter == "\t" else ""))
                rel = row[p].strip()
                if not rel:
                    raise ValueError(f"{where}: empty {columns[p]!r} (the audio file's path)")
                uid = row[id_col].strip() if id_col is not None else ""
                if not uid:
                    uid = os.path.normpath(rel).replace(os.sep, "/")
                    if kind == "commonvoice":
                        uid = os.path.splitext(uid)[0]
                values = {name: row[i].strip() for i, name in labels if row[i].strip()}
                items.append(InputItem(os.path.abspath(os.path.join(base, rel)), uid, values))
        except csv.Error as e:  # an unclosed quote running to the end, a cell past csv's field size limit
            raise ValueError(f"{path}:{header_lineno + reader.line_num}: {e}") from None
    return items


# --------------------------------------------------------------------------------------------------- folders


def _first_line(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return next((line for line in f if line.strip()), "")


def _read_librispeech(path: str, spk: str, chap: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, _, text = line.strip().partition(" ")
            if not re.fullmatch(rf"{spk}-{chap}-\d+", key) or key in out:
                why = "listed twice" if key in out else f"not {spk}-{chap}-NNNN TEXT"
                raise ValueError(f"{path}:{lineno}: {key!r} {why} (LibriSpeech's transcript of chapter {chap})")
            out[key] = {"text": text.strip(), "speaker": spk, "chapter": chap, "language": "en"}
    return out


def _read_mls(path: str, language: str | None) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            m = _MLS_LINE.fullmatch(line.rstrip("\r\n"))
            key = line.split("\t")[0]
            if m is None or key in out:
                why = "listed twice" if m else "not SPEAKER_BOOK_UTT<TAB>text"
                raise ValueError(f"{path}:{lineno}: {key[:80]!r} {why} (an MLS transcripts.txt)")
            out[key] = {"text": m.group(3).strip(), "speaker": m.group(1), "book": m.group(2)}
            if language:
                out[key]["language"] = language
    return out


def _read_commonvoice(path: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in read_table(path, "commonvoice"):
        clip = os.path.relpath(item.source, os.path.join(os.path.dirname(os.path.abspath(path)), "clips"))
        clip = clip.replace(os.sep, "/")
        if clip in out:
            raise ValueError(f"{path}: clip {clip!r} is listed twice")
        out[clip] = item.labels
    return out


@dataclass(slots=True)
class _Metadata:
    """One transcript file of a folder: its utterances' labels by key, until their audio is found."""

    kind: str
    folder: str  # relative to the walked root, "" for the root itself
    labels: dict[str, dict[str, str]]
    audio_ext: str  # of the audio matched so far: names the file of a line whose audio is missing


def _find_metadata(root: str, rels: list[str]) -> dict[tuple[str, str], _Metadata]:
    """{(kind, folder relative to root): metadata} of the corpus metadata files among `rels` (a folder walk)."""
    found: dict[tuple[str, str], _Metadata] = {}
    for rel in rels:
        parts = rel.split("/")
        name, folder = parts[-1], "/".join(parts[:-1])
        full = os.path.join(root, rel)
        candidate = name in ("transcripts.txt", "validated.tsv") or name.endswith(".trans.txt")
        if not candidate or not os.path.isfile(full):
            continue
        m = _LIBRISPEECH_TRANS.fullmatch(name)
        if m and os.path.normpath(full).split(os.sep)[-3:-1] == [m.group(1), m.group(2)]:  # root may be SPK/CHAP
            found["librispeech", folder] = _Metadata(
                "librispeech", folder, _read_librispeech(full, m.group(1), m.group(2)), ".flac")
        elif name == "transcripts.txt" and os.path.isdir(os.path.join(root, folder, "audio")) \
                and _MLS_LINE.fullmatch(_first_line(full).rstrip("\r\n")):
            parent = os.path.basename(os.path.dirname(os.path.abspath(os.path.join(root, folder))))
            lm = _MLS_FOLDER.fullmatch(parent)
            language = MLS_LANGUAGES.get(lm.group(1).lower()) if lm else None
            found["mls", folder] = _Metadata("mls", folder, _read_mls(full, language), ".flac")
        elif name == "validated.tsv" and os.path.isdir(os.path.join(root, folder, "clips")) \
                and table_kind(full, _first_line(full)) == "commonvoice":
            found["commonvoice", folder] = _Metadata("commonvoice", folder, _read_commonvoice(full), "")
    return found


def label_folder(root: str, items: list[InputItem]) -> tuple[str, list[InputItem]]:
    """(kind, items) for a walked folder (items in walk order, ids = relative paths): corpus labels and ids added.

    "directory" and the items untouched when the folder holds no corpus metadata (see the module docstring).
    """
    found = _find_metadata(os.path.abspath(root), [it.id for it in items])
    if not found:
        return "directory", items
    out = []
    for item in items:
        if item.id.lower().endswith((".txt", ".tsv")):
            continue  # transcripts, documentation, CommonVoice's tables: metadata, not audio
        parts = item.id.split("/")
        stem = os.path.splitext(parts[-1])[0]
        meta, key = found.get(("librispeech", "/".join(parts[:-1]))), stem
        for i, part in enumerate(parts[:-1]):
            if meta is not None:
                break
            kind = {"audio": "mls", "clips": "commonvoice"}.get(part)
            meta = found.get((kind, "/".join(parts[:i]))) if kind else None
            if meta is not None and kind == "commonvoice":  # a clip is named by its path in clips/, listed or not
                key = "/".join(parts[i + 1:])
                item.id = os.path.splitext(key)[0]
        labels = meta.labels.pop(key, None) if meta is not None else None
        if labels is not None:
            item.labels = labels
            if meta.kind != "commonvoice":
                item.id = key
                meta.audio_ext = os.path.splitext(parts[-1])[1]
        out.append(item)
    # Metadata lines without their audio file: "missing" rejects (preprocess's stat marks them), so none is lost.
    for meta in found.values():
        for key, labels in meta.labels.items():
            if meta.kind == "librispeech":
                rel, uid = f"{meta.folder}/{key}{meta.audio_ext}", key
            elif meta.kind == "mls":
                rel, uid = f"{meta.folder}/audio/{labels['speaker']}/{labels['book']}/{key}{meta.audio_ext}", key
            else:
                rel, uid = f"{meta.folder}/clips/{key}", os.path.splitext(key)[0]
            out.append(InputItem(os.path.join(os.path.abspath(root), rel.lstrip("/")), uid, labels))
        meta.labels = {}
    return "+".join(sorted({kind for kind, _ in found})), out
