"""Where `embed --manifest` puts what it computes, resumably (one writer process per output folder).

    DIR/embed.json       the run's settings (layers, pool, format, checkpoint, ...): a rerun must match them
    DIR/index.jsonl      what was written, one line per utterance, appended after its files are in place:
                           npy:    {"id", "file": "<name>.npy", "frames"}      DIR/<layer>/<name>.npy
                           shards: {"id", "shard", "row", "frames"}            DIR/<layer>/shard_NNNNNN.npy
                           a file that failed to decode: {"id", "rejected": "reason: detail"}
    DIR/<layer>/...      one folder per layer: "0".."L" (transformers' hidden_states[l]) or "final"

Every array file is written under a temporary name and renamed into place, and index lines are appended only
after their files are renamed: a kill at any moment leaves finished utterances listed and nothing half-written
listed. A rerun reads the index (a torn last line is cut off), skips the utterances it lists, and writes the
others; shard numbers are never reused, so a shard that a kill left unlisted is only unreferenced, never
overwritten under a listed utterance. Framewise arrays are [frames, hidden] float32; pooled ones are [hidden]
(npy) or one row of a [rows, hidden] shard. A shard's rows are its window's utterances in the order of their
index lines (length-sorted): `row` (the first row of the utterance) and `frames` (its row count; pooled: its
real frame count, one row) locate it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

INDEX, SETTINGS, LOCK = "index.jsonl", "embed.json", ".embed.lock"
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")
_SHARD = re.compile(r"shard_(\d{6,})\.npy")


def safe_name(uid: str) -> str:
    """A file name for utterance id `uid`: the id itself where it is a plain name, else its plain characters
    plus 12 hex digits of its hash (unique: ids differing only in what is replaced stay apart)."""
    if _SAFE.fullmatch(uid):
        return uid
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", uid).strip("._")[:120]
    return f"{plain}-{hashlib.blake2b(uid.encode(), digest_size=6).hexdigest()}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class EmbeddingStore:
    """The output folder of one embedding run. `open` checks the settings, takes the lock and reads what is done;
    `add` writes one batch's utterances; `close` releases the lock."""

    def __init__(self, root: str | Path, layers: Sequence[str], pooled: bool, fmt: str, settings: dict[str, Any]):
        if fmt not in ("npy", "shards"):
            raise ValueError(f"--format {fmt!r}: expected npy or shards")
        self.root, self.layers, self.pooled, self.fmt = Path(root), list(layers), pooled, fmt
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / LOCK, "w")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{self.root} is being written by another embed run: wait for it or pick another "
                             "--output") from None
        try:
            self._check_settings(settings)
        except ValueError:
            self._lock.close()
            raise
        for layer in self.layers:
            (self.root / layer).mkdir(exist_ok=True)
            for tmp in (self.root / layer).glob("*.tmp"):  # debris of a killed run: never listed, never read
                tmp.unlink()
        self.done, next_shard = self._read_index()
        on_disk = [int(m[1]) for layer in self.layers for p in (self.root / layer).iterdir()
                   if (m := _SHARD.fullmatch(p.name))]
        self._next_shard = max([next_shard, *(k + 1 for k in on_disk)])
        self._index = open(self.root / INDEX, "a", encoding="utf-8")  # noqa: SIM115
        self._shard: dict[str, Any] | None = None

    def _check_settings(self, settings: dict[str, Any]) -> None:
        path = self.root / SETTINGS
        if path.exists():
            before = json.loads(path.read_text())
            for key, value in settings.items():
                if before.get(key) != value:
                    raise ValueError(f"{self.root} holds embeddings with {key}={before.get(key)!r}, this run asks "
                                     f"for {value!r}: rerun with the same settings to resume, or pick another "
                                     "--output")
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=1) + "\n")
        os.replace(tmp, path)

    def _read_index(self) -> tuple[set[str], int]:
        """The ids already handled, and the next unused shard number. Cuts a torn last line off the file."""
        path = self.root / INDEX
        done: set[str] = set()
        next_shard = 0
        if not path.exists():
            return done, next_shard
        with open(path, "r+b") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a kill during the append: that line's utterances are redone
                f.truncate(end)
        for line in data[:end].splitlines():
            row = json.loads(line)
            done.add(row["id"])
            if "shard" in row:
                next_shard = max(next_shard, row["shard"] + 1)
        return done, next_shard

    # --- writing

    def begin_window(self, num_rows: int, width: int) -> None:
        """Shards only: the next `num_rows` rows (framewise: frames; pooled: utterances) go into new shards."""
        if self.fmt != "shards" or num_rows == 0:
            return
        k = self._next_shard
        self._next_shard += 1
        files = {}
        for layer in self.layers:
            final = self.root / layer / f"shard_{k:06d}.npy"
            tmp = final.with_name(final.name + ".tmp")
            # written in place through the page cache: a window's frames of every layer never sit in memory at once
            files[layer] = (np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(num_rows, width)),
                            tmp, final)
        self._shard = {"k": k, "files": files, "row": 0, "rows": num_rows, "lines": []}

    def add(self, ids: Sequence[str], arrays: dict[str, Sequence[np.ndarray]], frames: Sequence[int]) -> None:
        """One batch: arrays[layer][b] is utterance ids[b]'s output ([frames, hidden], or [hidden] pooled)."""
        if self.fmt == "npy":
            lines = []
            for b, uid in enumerate(ids):
                name = safe_name(uid) + ".npy"
                for layer in self.layers:
                    _save_npy(self.root / layer / name, arrays[layer][b])
                lines.append({"id": uid, "file": name, "frames": int(frames[b])})
            self._append(lines)
            return
        shard = self._shard
        assert shard is not None, "begin_window before add"
        for b, uid in enumerate(ids):
            rows = 1 if self.pooled else int(frames[b])
            for layer in self.layers:
                shard["files"][layer][0][shard["row"]:shard["row"] + rows] = arrays[layer][b]
            shard["lines"].append({"id": uid, "shard": shard["k"], "row": shard["row"], "frames": int(frames[b])})
            shard["row"] += rows

    def end_window(self) -> None:
        """Shards only: the window's shards are complete: flush, rename into place, then list their utterances."""
        shard, self._shard = self._shard, None
        if shard is None:
            return
        assert shard["row"] == shard["rows"], (shard["row"], shard["rows"])
        for array, tmp, final in shard["files"].values():
            array.flush()
            os.replace(tmp, final)
        shard["files"].clear()  # unmaps
        self._append(shard["lines"])

    def reject(self, rejects: Sequence[tuple[str, str]]) -> None:
        """Files that failed to decode: listed, so that a rerun does not decode them again."""
        self._append([{"id": uid, "rejected": why} for uid, why in rejects])

    def _append(self, lines: list[dict[str, Any]]) -> None:
        if not lines:
            return
        self._index.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in lines))
        self._index.flush()
        self.done.update(row["id"] for row in lines)

    def close(self) -> None:
        self._index.close()
        self._lock.close()
