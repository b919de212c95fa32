"""Noise for augmentation, packed once into shards and memory-mapped by every worker (Kaldi's MUSAN layout).

    bank = open_noise("/data/musan", ["noise", "music", "babble"])   # a MUSAN folder (packed on first use) or a
    bank.count("music"), bank.audio("music", k)                       # prefix packed by tools/preprocess_audio.py

Why packed: a worker that decodes and caches the files it draws ends up holding the whole noise corpus (MUSAN: ~12 GB
as int16) in every worker of every rank, and decodes each file once per worker. Packed, the audio is decoded once,
stored as int16 shards with an utterance index, and shared read-only through the page cache by all processes.

`data.noise_dir` is either
  - a packed prefix: `python tools/preprocess_audio.py --input musan/ --output-prefix data/musan --valid-fraction 0
    --min-seconds 0 --max-segment-seconds 0`, then data.noise_dir=data/musan; or
  - a MUSAN folder (noise/, music/, speech/, searched recursively): packed on first use into `DIR/.packed/musan`
    (by one process under a file lock; the others wait), and repacked when the folder's files change.
A kind comes from the top folder of each file's path below the MUSAN folder: noise/ -> "noise", music/ -> "music",
speech/ -> "babble".
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
from collections.abc import Sequence

import numpy as np

from megatron_speech.data.augment import FOLDER_OF_KIND, NOISE_KINDS, list_noise_files

logger = logging.getLogger(__name__)

PACKED = os.path.join(".packed", "musan")  # where a MUSAN folder is packed, below it


def is_packed_prefix(path: str) -> bool:
    """Whether `path` is a prefix written by tools/preprocess_audio.py (its train manifest exists)."""
    return os.path.isfile(f"{path}_train.manifest.jsonl")


def check_noise_source(noise_dir: str, kinds: Sequence[str]) -> None:
    """Cheap check (no torch, no decoding) that data.noise_dir is a packed prefix or a MUSAN folder with every
    kind: raises FileNotFoundError / ValueError naming the path and the missing folder."""
    if is_packed_prefix(noise_dir):
        return
    if not os.path.isdir(noise_dir):
        raise FileNotFoundError(f"data.noise_dir={noise_dir!r} is neither a MUSAN folder (noise/, music/, speech/) "
                                f"nor a prefix packed by tools/preprocess_audio.py ({noise_dir}_train.manifest.jsonl "
                                "does not exist); set data.noise_dir= (empty) to train without noise")
    list_noise_files(noise_dir, kinds)


def _pack(folder: str, log=logger.info) -> str:
    """Pack a MUSAN folder into FOLDER/.packed/musan (once; under a lock); returns the prefix."""
    from megatron_speech.data.preprocess import preprocess  # the preprocessing tool's own code

    prefix = os.path.join(folder, PACKED)
    try:
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        fd = os.open(prefix + ".preprocess.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise PermissionError(f"data.noise_dir={folder!r}: cannot pack it into {prefix} ({e.strerror}); pack it "
                              f"where you can write: python tools/preprocess_audio.py --input {folder} "
                              "--output-prefix NOISE --valid-fraction 0 --min-seconds 0 --max-segment-seconds 0, "
                              "then set data.noise_dir=NOISE") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        files = sum(len(v) for v in list_noise_files(folder, _kinds_present(folder)).values())
        workers = 0 if files < 64 else min(8, len(os.sched_getaffinity(0)))
        kwargs = dict(workers=workers, valid_fraction=0.0, min_seconds=0.0, progress=False, log=log)
        if _supports_segments():
            kwargs["max_segment_seconds"] = 0.0  # noise files are drawn whole (with a random window)
        try:
            preprocess(folder, prefix, **kwargs)
        except ValueError as e:
            if "holds the outputs of another run" not in str(e):
                raise
            log(f"{folder} changed since it was packed: packing it again into {prefix}")
            for path in glob.glob(glob.escape(prefix) + "[._]*"):
                if not path.endswith(".preprocess.lock"):
                    os.remove(path)
            preprocess(folder, prefix, **kwargs)
    finally:
        os.close(fd)
    return prefix


def _kinds_present(folder: str) -> list[str]:
    """The kinds whose folder exists below a MUSAN folder."""
    return [k for k in NOISE_KINDS if os.path.isdir(os.path.join(folder, FOLDER_OF_KIND[k]))]


def _supports_segments() -> bool:
    import inspect

    from megatron_speech.data.preprocess import preprocess

    return "max_segment_seconds" in inspect.signature(preprocess).parameters


class NoiseBank:
    """Noise clips per kind from a packed prefix, memory-mapped (picklable: workers reopen it by path)."""

    def __init__(self, prefix: str, kinds: Sequence[str], where: str | None = None) -> None:
        from megatron_speech.data.dataset import Corpus

        self.prefix, self.kinds = prefix, [k for k in NOISE_KINDS if k in kinds]
        self.corpus = Corpus(prefix, "train")
        kind_of_folder = {folder: kind for kind, folder in FOLDER_OF_KIND.items()}
        top = [self.corpus.id(i).split("/", 1)[0] for i in range(len(self.corpus))]
        self._members = {kind: np.array([i for i, t in enumerate(top) if kind_of_folder.get(t) == kind], np.int64)
                         for kind in self.kinds}
        for kind, members in self._members.items():
            if len(members) == 0:
                raise ValueError(f"data.noise_dir={where or prefix!r}: the packed noise {prefix} holds no "
                                 f"{FOLDER_OF_KIND[kind]}/ clip, needed for {kind!r} noise (ids must start with "
                                 f"{FOLDER_OF_KIND[kind]}/: pack the MUSAN folder itself); remove {kind!r} from "
                                 "data.noise_types to go without")

    def count(self, kind: str) -> int:
        return len(self._members[kind])

    def audio(self, kind: str, k: int) -> np.ndarray:
        """Clip k of `kind`: int16 16 kHz samples, a read-only view into the shard."""
        return self.corpus.read(int(self._members[kind][k]))


def open_noise(noise_dir: str, kinds: Sequence[str]) -> NoiseBank:
    """The NoiseBank of data.noise_dir (a packed prefix, or a MUSAN folder packed here on first use)."""
    check_noise_source(noise_dir, kinds)
    prefix = noise_dir if is_packed_prefix(noise_dir) else _pack(noise_dir)
    return NoiseBank(prefix, kinds, where=noise_dir)
