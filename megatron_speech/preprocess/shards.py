"""The shard writer of one split: audio appended to megatron-core IndexedDataset shards (int16), manifest rows and
rejects beside them, fsynced so that a run killed at any point resumes from its journal byte-identically."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator

import numpy as np

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
