"""Noise for augmentation, packed once into shards and memory-mapped by every worker (Kaldi's MUSAN layout).

    bank = open_noise("/data/musan", ["noise", "music", "babble"])   # a MUSAN folder (packed on first use) or a
    bank.count("music"), bank.audio("music", k)                       # prefix packed by tools/preprocess_audio.py

Why packed: a worker that decodes and caches the files it draws ends up holding the whole noise corpus (MUSAN: ~12 GB
as int16) in every worker of every rank, and decodes each file once per worker. Packed, the audio is decoded once,
stored as int16 shards with an utterance index, and shared read-only through the page cache by all processes.

`data.noise_dir` is either
  - a packed prefix: `python tools/preprocess_audio.py --input musan/ --output-prefix data/musan --valid-fraction 0
    --min-seconds 0 --max-segment-seconds 0`, then data.noise_dir=data/musan; or
  - a MUSAN folder (noise/, music/, speech/, searched recursively): packed on first use into
    `DIR/.packed/<fingerprint>/musan` (by one process under a file lock; the others wait); a folder whose files
    change gets a new pack beside the old one, which running jobs keep reading.
A kind comes from the top folder of each file's path below the MUSAN folder: noise/ -> "noise", music/ -> "music",
speech/ -> "babble".
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

from megatron_speech.common.stop_signals import stop_signals_blocked
from megatron_speech.data.augment import FOLDER_OF_KIND, NOISE_KINDS, list_noise_files

logger = logging.getLogger(__name__)

PACKED_DIR = ".packed"  # where a MUSAN folder is packed, below it: .packed/<fingerprint>/musan


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


def _listing(folder: str) -> tuple[str, list[tuple[str, str]]]:
    """(fingerprint, [(path, id)]) of the noise files below a MUSAN folder: ids are the paths below it (their top
    folder names the kind); the fingerprint covers names, sizes and mtimes."""
    files = list_noise_files(folder, _kinds_present(folder))
    h = hashlib.sha256()
    entries = []
    for path in sorted(p for paths in files.values() for p in paths):
        st = os.stat(path)
        uid = os.path.relpath(path, folder).replace(os.sep, "/")
        entries.append((path, uid))
        h.update(f"{uid}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16], entries


def _is_complete(prefix: str) -> bool:
    try:
        with open(prefix + ".preprocess.json", encoding="utf-8") as f:
            return bool(json.load(f).get("complete"))
    except (OSError, ValueError):
        return False


_PACK_CODE = ("import sys; from megatron_speech.preprocess import preprocess; "
              "preprocess(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), valid_fraction=0.0, min_seconds=0.0, "
              "max_segment_seconds=0.0, progress=False, log=print)")


def _pack(folder: str, log=logger.info) -> str:
    """Pack a MUSAN folder into FOLDER/.packed/<fingerprint>/musan (once, under a lock); returns the prefix.

    The pack's folder is named by the fingerprint of the noise files: a changed folder gets a new pack beside the
    old one, which jobs still running keep reading (never deleted here: remove old packs by hand). A complete pack
    is used without taking the lock, so read-only folders and other users' packs work."""
    fingerprint, entries = _listing(folder)
    prefix = os.path.join(folder, PACKED_DIR, fingerprint, "musan")
    if _is_complete(prefix):
        return prefix
    how = (f"pack it where you can write: python tools/preprocess_audio.py --input {folder} --output-prefix NOISE "
           "--valid-fraction 0 --min-seconds 0 --max-segment-seconds 0, then set data.noise_dir=NOISE")
    try:
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        fd = os.open(prefix + ".preprocess.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise PermissionError(f"data.noise_dir={folder!r}: cannot pack it into {prefix} ({e.strerror}); {how}") \
            from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # no locks on this file system: packing twice writes the same files
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        if not _is_complete(prefix):
            log(f"packing the noise of {folder} ({len(entries)} files) into {prefix}")
            inputs = prefix + ".inputs.jsonl"  # exactly the noise files, named by their path below the folder
            with open(inputs, "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"path": path, "id": uid}) + "\n" for path, uid in entries)
            # The preprocessing tool's own writer, in a process of its own: it installs its signal handlers and
            # worker pool there, not in a training process (and data/ does not import megatron_speech.preprocess,
            # which imports data/).
            workers = 0 if len(entries) < 64 else min(8, len(os.sched_getaffinity(0)))
            with stop_signals_blocked():  # a helper process: Slurm's USR1/TERM is the training process's to act on
                proc = subprocess.run([sys.executable, "-c", _PACK_CODE, inputs, prefix, str(workers)],
                                      capture_output=True, text=True)
            for line in proc.stdout.splitlines():
                log(line)
            if proc.returncode:  # ValueError: the drivers report a user's data problem by its message (exit 2)
                raise ValueError(f"data.noise_dir={folder!r}: packing it into {prefix} failed (exit "
                                 f"{proc.returncode}): {proc.stderr.strip()[-2000:]}; {how}")
    finally:
        os.close(fd)
    return prefix


def _kinds_present(folder: str) -> list[str]:
    """The kinds whose folder exists below a MUSAN folder."""
    return [k for k in NOISE_KINDS if os.path.isdir(os.path.join(folder, FOLDER_OF_KIND[k]))]


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
