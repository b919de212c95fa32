"""Utterances of one or more preprocessed prefixes: int16 IndexedDataset shards + their utterance index
(docs/design.md §2).

    corpus = Corpus(["/data/en", "/data/fr"], "train")   # every utterance, as the index lists them (pre-training)
    corpus.lengths[i], corpus.read(i, offset, count), corpus.id(i), corpus.language(i)
    shards = AudioShards(["/data/en"], "train", min_samples=32_000)   # those of at least min_samples, with labels
    shards.lengths[i], shards.read(i, offset, count), shards.id(i), shards.labels(i)

Layout written by tools/preprocess_audio.py (docs/design.md §11): shards `PREFIX_{split}_{NNNNN}.{bin,idx}` (one
sequence per utterance), `PREFIX_{split}.manifest.jsonl` (one object per utterance with `shard` (the shard's path
without extension, relative to the manifest's folder), `index` (position in that shard), `id`, `source`, `samples`,
`orig_sample_rate`, `orig_channels`, optional `parent`/`offset` (a segment of a longer recording) and labels), and the
binary utterance index `PREFIX_{split}.index` (data/index.py), rebuilt from the manifest when missing or stale. The
manifest is the source of truth: an entry it cannot honour is an error naming the file and line.

`Corpus` is what a pre-training rank and its DataLoader workers share: everything per utterance lives in the
memory-mapped index (pages shared by all processes of a node), and a Corpus pickles as its paths, so a worker
receives a few hundred bytes whatever the corpus size. `AudioShards` adds a kept-utterance selection and any labels
(parsed from the manifest): for fine-tuning and evaluation sets, which are small.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_speech.common.audio import SAMPLE_RATE
from megatron_speech.data.index import UtteranceIndex, manifest_path

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid")
# Manifest keys that describe the audio rather than label it; every other key is kept as a label.
_AUDIO_KEYS = ("shard", "index", "id", "source", "samples", "orig_sample_rate", "orig_channels", "audio_hash",
               "warnings", "parent", "offset")
_GLOB = "*?["
MAX_OPEN_SHARDS = 256  # shard mappings a process keeps open (960k hours are ~27k shards; vm.max_map_count 65530)
_PART = re.compile(r"_part\d{4,}$")

__all__ = ["SPLITS", "AudioShards", "Corpus", "expand_prefixes", "manifest_path"]


def expand_prefixes(prefix: str | Sequence[str], split: str) -> list[str]:
    """data.prefix as a list; an entry with a glob pattern (`/data/cv_part*`) becomes the prefixes whose
    `_{split}.manifest.jsonl` it matches, sorted (the parts of a Slurm-array preprocessing run).

    Parts of an array run (PREFIX_partIIII, their journals say "part I of N") are taken only all together: a
    pattern that matches some parts of N while others are missing or unfinished (a failed array task, one still
    running) raises, naming them; otherwise ranks starting a moment apart could see different corpora."""
    given = [prefix] if isinstance(prefix, str) else list(prefix)
    out: list[str] = []
    for p in given:
        if not any(c in os.path.basename(p) for c in _GLOB):
            out.append(p)
            continue
        suffix = f"_{split}.manifest.jsonl"
        found = sorted(m[: -len(suffix)] for m in glob.glob(p + suffix))
        if not found:
            raise FileNotFoundError(f"data.prefix pattern {p!r} matches no {split} manifest ({p}{suffix}): check "
                                    "the path, or run tools/preprocess_audio.py first")
        _check_parts_complete(p, found)
        out += found
    return out


def _check_parts_complete(pattern: str, found: list[str]) -> None:
    from megatron_speech.data.parts import part_prefix, parts_status

    runs: set[tuple[str, int]] = set()  # (the run's output prefix, its number of parts)
    for prefix in found:
        try:
            with open(prefix + ".preprocess.json", encoding="utf-8") as f:
                part = json.load(f).get("params", {}).get("part")
        except (OSError, ValueError):
            continue  # written by hand or by another tool: no parts to check
        if part and _PART.search(prefix):
            runs.add((_PART.sub("", prefix), int(part[1])))
    for base, num_parts in sorted(runs):
        _, missing = parts_status(base, num_parts)
        if missing:
            raise FileNotFoundError(
                f"data.prefix pattern {pattern!r}: {len(missing)} of the {num_parts} parts of {base} are missing or "
                f"unfinished ({', '.join(os.path.basename(m) for m in missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}): finish them (NUM_PARTS={num_parts} sbatch --array=... "
                "launch/preprocess.sbatch ...), or list the prefixes to train on explicitly")
        stray = [p for p in found if _PART.sub("", p) == base and p not in {part_prefix(base, i)
                                                                              for i in range(num_parts)}]
        if stray:
            raise ValueError(f"data.prefix pattern {pattern!r} matches {stray[0]}, not one of the {num_parts} parts "
                             f"of {base}: remove it or list the prefixes explicitly")


def corpus_names(prefixes: Sequence[str]) -> list[str]:
    """The name each prefix's audio is grouped under when it has no language label: the prefix without an array
    part's `_partIIII` (the parts of one corpus are one group), shown by its base name where that is unique."""
    runs = [_PART.sub("", p.rstrip("/")) for p in prefixes]
    distinct = list(dict.fromkeys(runs))
    bases = [os.path.basename(r) or r for r in distinct]
    short = dict(zip(distinct, bases, strict=True)) if len(set(bases)) == len(bases) else {r: r for r in distinct}
    return [short[r] for r in runs]


class Corpus:
    """Every utterance of one split of one or more prefixes (concatenated in order), from their indexes.

    Attributes: `prefixes`, `language_names` (sorted, over all prefixes). `lengths` int32 [N] (samples; for one
    prefix a view into the index, for several a copy made on first use), `languages` int16 [N] (code into
    language_names, -1 = none) and `prefix_index` int16 [N] (built per call): a worker needs none of them.
    Raises FileNotFoundError / ValueError naming the manifest (and line) that cannot be indexed.
    """

    def __init__(self, prefix: str | Sequence[str], split: str, log=None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {list(SPLITS)}")
        prefixes = expand_prefixes(prefix, split)
        if not prefixes:
            raise ValueError("no data prefix given: set data.prefix to the --output-prefix of "
                             "tools/preprocess_audio.py")
        if len(prefixes) > 32767:  # prefix numbers are int16 per utterance
            raise ValueError(f"data.prefix names {len(prefixes)} prefixes; at most 32767 are supported: merge parts")
        self.prefixes, self.split = prefixes, split
        self.indexes = [UtteranceIndex.open(p, split, log or logger.info) for p in prefixes]
        for p, index in zip(prefixes, self.indexes, strict=True):
            if index.unused_shards:
                warnings.warn(f"{manifest_path(p, split)} names none of the utterances in shard(s) "
                              f"{index.unused_shards}: their audio is not used", stacklevel=2)
        self.starts = np.zeros(len(prefixes) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in self.indexes], out=self.starts[1:])
        self.language_names: list[str] = sorted({n for x in self.indexes for n in x.language_names})
        code = {n: i for i, n in enumerate(self.language_names)}
        # Per prefix: its local language code + 1 -> the global code (local -1 = none -> -1).
        self._language_maps = [np.array([-1] + [code[n] for n in x.language_names], dtype=np.int16)
                               for x in self.indexes]
        self._reset()

    def _reset(self) -> None:
        # (prefix, shard code) -> the shard's .bin as int16 memmap, least recently used first; at most
        # MAX_OPEN_SHARDS mappings per process (a view handed out keeps its own mapping alive).
        self._shards: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lengths: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        # What a worker receives: the index paths (UtteranceIndex pickles as its path) and small tables; the mmaps
        # and the arrays built on first use stay behind.
        state = self.__dict__.copy()
        state.update(_shards=OrderedDict(), _lengths=None)
        return state

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = self.indexes[0].lengths if len(self.indexes) == 1 else \
                np.concatenate([x.lengths for x in self.indexes])
        return self._lengths

    @property
    def languages(self) -> np.ndarray:
        """A new int16 array [N] on every call (not kept: 2 bytes per utterance the loader needs only once)."""
        return np.concatenate([m[x.language + 1]
                               for m, x in zip(self._language_maps, self.indexes, strict=True)])

    @property
    def prefix_index(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.prefixes), dtype=np.int16), np.diff(self.starts))

    def long_enough(self, min_samples: int) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
        """Which utterances have at least min_samples samples (bool [N]), and per prefix the (utterances,
        samples) skipped, logged: shorter audio is counted, never silently dropped. Raises ValueError when none
        is kept."""
        keep = self.lengths >= min_samples
        skipped: dict[str, tuple[int, int]] = {}
        for p, prefix in enumerate(self.prefixes):
            a, b = self.starts[p], self.starts[p + 1]
            short = ~keep[a:b]
            n = int(short.sum())
            samples = int(self.lengths[a:b][short].sum(dtype=np.int64)) if n else 0
            skipped[prefix] = (n, samples)
            if n:
                logger.info("%s (%s): skipped %d utterances shorter than %d samples (%.2f h)", prefix, self.split,
                            n, min_samples, samples / SAMPLE_RATE / 3600)
        if not keep.any():
            raise ValueError(f"no {self.split} utterance of at least {min_samples} samples in {self.prefixes}: "
                             "lower data.min_sample_seconds or check the manifests")
        return keep, skipped

    def locate(self, i: int) -> tuple[int, int]:
        """(prefix number, row in that prefix's index) of utterance i."""
        if not 0 <= i < len(self):
            raise IndexError(f"utterance {i} is outside the corpus of {len(self)}")
        p = int(np.searchsorted(self.starts, i, side="right")) - 1
        return p, i - int(self.starts[p])

    def lengths_of(self, indices: np.ndarray) -> np.ndarray:
        """Lengths of the given utterances, without building the concatenated `lengths` (cheap in a worker)."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(self.indexes) == 1:
            return self.indexes[0].lengths[indices].astype(np.int64)
        p = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty(len(indices), dtype=np.int64)
        for a in np.unique(p).tolist():
            sel = p == a
            out[sel] = self.indexes[a].lengths[indices[sel] - self.starts[a]]
        return out

    def read(self, i: int, offset: int = 0, count: int | None = None) -> np.ndarray:
        """Samples [offset, offset + count) of utterance i as an int16 view into the shard (zero-copy, read-only)."""
        p, j = self.locate(i)
        index = self.indexes[p]
        length = int(index.lengths[j])
        if count is None:
            count = length - offset
        if offset < 0 or count < 0 or offset + count > length:
            raise IndexError(f"samples [{offset}, {offset + count}) are outside utterance {i} ({index.id(j)}) "
                             f"of {length} samples")
        key = (p, int(index.shard[j]))
        shard = self._shards.get(key)
        if shard is None:
            shard = self._shards[key] = np.memmap(index.shard_path(key[1]) + ".bin", dtype=np.int16, mode="r")
            if len(self._shards) > MAX_OPEN_SHARDS:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(key)
        start = int(index.pointer[j]) // 2 + offset  # int16: 2 bytes per sample
        return shard[start:start + count]

    def id(self, i: int) -> str:
        p, j = self.locate(i)
        return self.indexes[p].id(j)

    def language(self, i: int) -> str | None:
        """The "language" label of utterance i, or None."""
        p, j = self.locate(i)
        code = int(self._language_maps[p][int(self.indexes[p].language[j]) + 1])
        return None if code < 0 else self.language_names[code]


class AudioShards:
    """The utterances of at least `min_samples` samples of `prefix` (one or several) for one split, with labels.

    prefix: PREFIX or list of PREFIXes (tools/preprocess_audio.py --output-prefix; glob patterns allowed);
    split: "train" or "valid". min_samples: shorter utterances are skipped and counted (`num_skipped`,
    `skipped_seconds`, per prefix in `skipped_per_prefix`), never silently dropped.
    label_keys: the labels to keep (None = every manifest key beyond the audio description). Only "language" comes
    from the index; any other label is parsed from the manifests (fine for labeled sets; a pre-training corpus
    uses Corpus directly).

    Attributes: `lengths` int64 [N] (samples), `prefix_index` int16 [N] (which prefix), `languages` int32 [N]
    (code into `language_names`; -1 = no "language" label), `prefixes`, `corpus` (the Corpus of every utterance).
    """

    def __init__(self, prefix: str | Sequence[str], split: str, min_samples: int = 0,
                 label_keys: Sequence[str] | None = None) -> None:
        self.corpus = corpus = Corpus(prefix, split)
        self.prefixes, self.split, self.min_samples = corpus.prefixes, split, int(min_samples)
        keep, self.skipped_per_prefix = corpus.long_enough(self.min_samples)
        self._kept = np.flatnonzero(keep)
        self.lengths = corpus.lengths[self._kept].astype(np.int64)
        self.prefix_index = corpus.prefix_index[self._kept]
        self.language_names = corpus.language_names
        self.languages = corpus.languages[self._kept].astype(np.int32)
        wanted = None if label_keys is None else [k for k in label_keys if k != "language"]
        self._with_language = label_keys is None or "language" in label_keys
        self._labels = self._read_labels(keep, wanted) if wanted is None or wanted else {}

    def _read_labels(self, keep: np.ndarray, wanted: list[str] | None) -> dict[str, list[str | None]]:
        """Label columns (JSON text, None = absent) of the kept utterances, other than "language"."""
        columns: dict[str, list[str | None]] = {}
        k = row_number = 0
        for pre in self.prefixes:
            with open(manifest_path(pre, self.split), encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    kept = keep[row_number]
                    row_number += 1
                    if not kept:
                        continue
                    for key, value in json.loads(line).items():
                        if key in _AUDIO_KEYS or key == "language" or (wanted is not None and key not in wanted):
                            continue
                        column = columns.get(key)
                        if column is None:
                            column = columns[key] = [None] * len(self._kept)
                        # JSON text: any label type (str, number, list of phonemes) round-trips exactly.
                        column[k] = json.dumps(value, ensure_ascii=False)
                    k += 1
        return columns

    # --- per-utterance access

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, i: int, offset: int = 0, count: int | None = None) -> np.ndarray:
        """Samples [offset, offset + count) of utterance i as an int16 view into the shard (zero-copy, read-only)."""
        return self.corpus.read(int(self._kept[i]), offset, count)

    def id(self, i: int) -> str:
        """The manifest `id` of utterance i."""
        return self.corpus.id(int(self._kept[i]))

    def labels(self, i: int) -> dict[str, Any]:
        """The labels utterance i has (manifest keys beyond the audio description), decoded from JSON."""
        out = {}
        if self._with_language:
            language = self.language(i)
            if language is not None:
                out["language"] = language
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
