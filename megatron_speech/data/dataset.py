"""Utterances of one or more preprocessed prefixes: int16 IndexedDataset shards + JSON-lines manifests (DESIGN §2).

    shards = AudioShards(["/data/en", "/data/fr"], "train", min_samples=32_000)
    shards.lengths[i]                  # samples (16 kHz) of utterance i
    shards.read(i, offset, count)      # int16 view into the mmap'd shard: zero-copy
    shards.id(i), shards.labels(i)     # {"language": "en", "speaker": ...} (only the labels present)

Layout written by tools/preprocess_audio.py (DESIGN §11): shards `PREFIX_{split}_{NNNNN}.{bin,idx}` (one sequence per
utterance) and `PREFIX_{split}.manifest.jsonl`, one object per utterance with `shard` (the shard's path without
extension, relative to the manifest's folder), `index` (position in that shard), `id`, `source`, `samples`,
`orig_sample_rate`, `orig_channels`, and optional labels. The manifest is the source of truth: a shard it does not
name is reported, an entry it cannot honour is an error naming the file and line.

Per-utterance strings (ids, labels) live in one bytes blob with offsets rather than in Python objects: a 100k-hour
corpus holds tens of millions of utterances, and this object is pickled into every DataLoader worker.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_speech.models.wav2vec2.config import SAMPLE_RATE

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid")
# Manifest keys that describe the audio rather than label it; every other key is kept as a label.
_AUDIO_KEYS = ("shard", "index", "id", "source", "samples", "orig_sample_rate", "orig_channels", "audio_hash",
               "warnings")
_REQUIRED_KEYS = ("shard", "index", "id", "samples")


def manifest_path(prefix: str, split: str) -> str:
    """`PREFIX_{split}.manifest.jsonl`."""
    return f"{prefix}_{split}.manifest.jsonl"


class StringTable:
    """An immutable list of optional strings stored as one UTF-8 blob + offsets (None = missing)."""

    def __init__(self, values: Sequence[str | None]) -> None:
        encoded = [b"" if v is None else v.encode() for v in values]
        self._present = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._present)

    def __getitem__(self, i: int) -> str | None:
        if not self._present[i]:
            return None
        return self._blob[self._offsets[i]:self._offsets[i + 1]].decode()


class AudioShards:
    """All utterances of `prefix` (one or several prefixes, concatenated in order) for one split.

    prefix: PREFIX or list of PREFIXes (tools/preprocess_audio.py --output-prefix); split: "train" or "valid".
    min_samples: utterances shorter than this many 16 kHz samples are skipped and counted (`num_skipped`,
    `skipped_seconds`, per prefix in `skipped_per_prefix`), never silently dropped.
    label_keys: the labels to keep (None = every manifest key beyond the audio description); pre-training keeps
    only "language": transcripts of millions of utterances would be pickled into every worker for nothing.

    Attributes: `lengths` int64 [N] (samples), `prefix_index` int16 [N] (which prefix), `languages` int32 [N]
    (code into `language_names`; -1 = no "language" label), `prefixes`.
    Raises FileNotFoundError naming a missing manifest or shard file, ValueError naming the manifest line of an
    entry that is malformed or points outside its shard.
    """

    def __init__(self, prefix: str | Sequence[str], split: str, min_samples: int = 0,
                 label_keys: Sequence[str] | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {list(SPLITS)}")
        prefixes = [prefix] if isinstance(prefix, str) else list(prefix)
        if not prefixes:
            raise ValueError("no data prefix given: set data.prefix to the --output-prefix of "
                             "tools/preprocess_audio.py")
        self.prefixes = prefixes
        self.split = split
        self.min_samples = int(min_samples)

        self._shard_paths: list[str] = []  # path prefixes (no extension), indexed by shard id
        self._shards: dict[int, Any] = {}  # shard id -> open IndexedDataset (reopened lazily after pickling)
        shard_ids, indices, lengths, prefix_index, ids = [], [], [], [], []
        labels: dict[str, list[str | None]] = {}
        self.skipped_per_prefix: dict[str, tuple[int, int]] = {}  # prefix -> (utterances, samples)
        kept = 0
        for p, pre in enumerate(prefixes):
            rows = self._read_manifest(pre)
            skipped = skipped_samples = 0
            for row_ids, row in rows:
                n = row["samples"]
                if n < self.min_samples:
                    skipped += 1
                    skipped_samples += n
                    continue
                shard_ids.append(row_ids)
                indices.append(row["index"])
                lengths.append(n)
                prefix_index.append(p)
                ids.append(str(row["id"]))
                for key, value in row.items():
                    if key in _AUDIO_KEYS or (label_keys is not None and key not in label_keys):
                        continue
                    # JSON text: any label type (str, number, list of phonemes) round-trips exactly.
                    labels.setdefault(key, [None] * kept).append(json.dumps(value, ensure_ascii=False))
                kept += 1
                for column in labels.values():
                    if len(column) < kept:
                        column.append(None)
            self.skipped_per_prefix[pre] = (skipped, skipped_samples)
            if skipped:
                logger.info("%s (%s): skipped %d utterances shorter than %d samples (%.2f h)", pre, split,
                            skipped, self.min_samples, skipped_samples / SAMPLE_RATE / 3600)

        if kept == 0:
            raise ValueError(f"no {split} utterance of at least {self.min_samples} samples in {prefixes}: "
                             "lower data.min_sample_seconds or check the manifests")
        self._shard_of = np.asarray(shard_ids, dtype=np.int32)
        self._index_in_shard = np.asarray(indices, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.prefix_index = np.asarray(prefix_index, dtype=np.int16)
        self._ids = StringTable(ids)
        self._labels = {key: StringTable(column) for key, column in labels.items()}
        language = labels.get("language", [None] * kept)
        names = sorted({json.loads(v) for v in language if v is not None}, key=str)
        code = {json.dumps(n, ensure_ascii=False): i for i, n in enumerate(names)}
        self.language_names: list[str] = [str(n) for n in names]
        self.languages = np.fromiter((-1 if v is None else code[v] for v in language), dtype=np.int32,
                                     count=kept)

    # --- manifest and shards

    def _read_manifest(self, prefix: str) -> list[tuple[int, dict[str, Any]]]:
        path = manifest_path(prefix, self.split)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"manifest {path} not found: run tools/preprocess_audio.py --output-prefix "
                                    f"{prefix} (it writes PREFIX_train/valid.manifest.jsonl next to the shards)")
        folder = os.path.dirname(os.path.abspath(path))
        local: dict[str, int] = {}
        rows: list[tuple[int, dict[str, Any]]] = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not a JSON object ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
                missing = [k for k in _REQUIRED_KEYS if k not in row]
                if missing:
                    raise ValueError(f"{where}: missing key(s) {missing} (needs {list(_REQUIRED_KEYS)})")
                for key in ("index", "samples"):
                    if not isinstance(row[key], int) or isinstance(row[key], bool) or row[key] < 0:
                        raise ValueError(f"{where}: {key}={row[key]!r} must be a non-negative integer")
                name = row["shard"]
                if name not in local:
                    local[name] = self._open_new_shard(os.path.join(folder, name), where)
                shard_id = local[name]
                self._check_entry(shard_id, row, where)
                rows.append((shard_id, row))
        self._warn_unused_shards(prefix, local)
        return rows

    def _open_new_shard(self, shard_prefix: str, where: str) -> int:
        for ext in (".idx", ".bin"):
            if not os.path.isfile(shard_prefix + ext):
                raise FileNotFoundError(f"{where} names shard {shard_prefix}, but {shard_prefix}{ext} does not "
                                        "exist: the shards and the manifest must stay together")
        shard_id = len(self._shard_paths)
        self._shard_paths.append(shard_prefix)
        dataset = self._shard(shard_id)
        dtype = dataset.index.dtype
        if dtype != np.int16:
            raise ValueError(f"shard {shard_prefix}.idx holds {np.dtype(dtype).name}, expected int16 PCM "
                             "(written by tools/preprocess_audio.py)")
        return shard_id

    def _check_entry(self, shard_id: int, row: dict[str, Any], where: str) -> None:
        stored = self._shard(shard_id).sequence_lengths
        path = self._shard_paths[shard_id]
        index = row["index"]
        if index >= len(stored):
            raise ValueError(f"{where}: index {index} points outside shard {path}.idx, which holds "
                             f"{len(stored)} utterances (manifest and shards out of sync?)")
        if int(stored[index]) != row["samples"]:
            raise ValueError(f"{where}: samples={row['samples']} but utterance {index} of shard {path}.idx "
                             f"holds {int(stored[index])} samples (manifest and shards out of sync?)")

    def _warn_unused_shards(self, prefix: str, used: dict[str, int]) -> None:
        used_paths = {os.path.abspath(self._shard_paths[i]) for i in used.values()}
        on_disk = {os.path.abspath(p[:-4]) for p in glob.glob(glob.escape(f"{prefix}_{self.split}_") + "*.idx")}
        unused = sorted(on_disk - used_paths)
        if unused:
            warnings.warn(f"{manifest_path(prefix, self.split)} names none of the utterances in shard(s) "
                          f"{unused}: their audio is not used", stacklevel=3)

    def _shard(self, shard_id: int):
        dataset = self._shards.get(shard_id)
        if dataset is None:
            # Imported here: a DataLoader worker pays for importing megatron.core only when it reads audio.
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            dataset = IndexedDataset(self._shard_paths[shard_id], mmap=True)
            self._shards[shard_id] = dataset
        return dataset

    def __getstate__(self) -> dict[str, Any]:
        # mmaps do not travel to spawned workers: each process reopens the shards it reads.
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    # --- per-utterance access

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, i: int, offset: int = 0, count: int | None = None) -> np.ndarray:
        """Samples [offset, offset + count) of utterance i as an int16 view into the shard (zero-copy, read-only)."""
        length = int(self.lengths[i])
        if count is None:
            count = length - offset
        if offset < 0 or count < 0 or offset + count > length:
            raise IndexError(f"samples [{offset}, {offset + count}) are outside utterance {i} ({self.id(i)}) "
                             f"of {length} samples")
        return self._shard(int(self._shard_of[i])).get(int(self._index_in_shard[i]), offset, count)

    def id(self, i: int) -> str:
        """The manifest `id` of utterance i."""
        return self._ids[i]  # type: ignore[return-value]

    def labels(self, i: int) -> dict[str, Any]:
        """The labels utterance i has (manifest keys beyond the audio description), decoded from JSON."""
        out = {}
        for key, column in self._labels.items():
            value = column[i]
            if value is not None:
                out[key] = json.loads(value)
        return out

    def language(self, i: int) -> str | None:
        """The "language" label of utterance i, or None."""
        code = int(self.languages[i])
        return None if code < 0 else self.language_names[code]

    @property
    def total_seconds(self) -> float:
        """Audio kept, in seconds."""
        return float(self.lengths.sum()) / SAMPLE_RATE

    @property
    def num_skipped(self) -> int:
        """Utterances skipped for being shorter than min_samples, over all prefixes."""
        return sum(n for n, _ in self.skipped_per_prefix.values())

    @property
    def skipped_seconds(self) -> float:
        """Audio skipped for being too short, in seconds."""
        return sum(s for _, s in self.skipped_per_prefix.values()) / SAMPLE_RATE
