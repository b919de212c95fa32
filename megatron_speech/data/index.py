"""The binary utterance index of one preprocessed split: what every rank and DataLoader worker needs about each
utterance, memory-mapped from one file next to the manifest (docs/design.md §2; issue: data at the seed's scale).

    index = UtteranceIndex.open("data/en", "train")    # builds PREFIX_train.index from the manifest if needed
    index.lengths[i], index.shard[i], index.position[i], index.language[i], index.id(i)

Why not the manifest: a 10^8-utterance JSONL takes each rank 30-60 minutes of Python to parse (again at every
requeue) and ~1 KB per row while doing so; the parsed result pickled into every worker costs ~100 B per utterance
per process. The index is parsed once, then opened in milliseconds by every process; its pages are shared by all
processes of a node (page cache), so a worker's copy costs nothing but the pages it touches.
Why not megatron-core's own shard `.idx`: it holds lengths and byte pointers of one shard only; an utterance also
needs its id, its language and which shard of the prefix holds it, over all shards of a prefix.

File `PREFIX_{split}.index`: magic `MSPINDEX`, a little-endian uint64 header length, a JSON header (version, the
manifest's and each shard .idx's size and mtime it was built from, shard names, language names, array layout),
then 64-byte aligned arrays, one entry per manifest row in manifest order:
  lengths int32 (samples at 16 kHz; megatron's .idx caps a sequence at int32 too), shard int32 (into the shard
  names), position int32 (in that shard), pointer int64 (the utterance's byte offset in the shard's .bin, from
  megatron's .idx), language int16 (into the language names; -1 = no "language" label), id_offsets int64 [N + 1]
  and id_blob uint8 (UTF-8 ids).
Audio is read from the shard's .bin through numpy's memmap at that pointer rather than through megatron's
IndexedDataset: its reader closes the mapping when the dataset object goes, even while arrays still view it (a
segfault), and holds 3 file descriptors per shard (960k hours are ~27k shards of 4 GB: a worker that touched them
all would run out); a numpy view keeps its mapping alive, and a closed shard map costs nothing.
The JSONL manifest stays the source of truth: an index whose manifest or shards changed size or mtime is stale and
rebuilt. Building takes a file lock (`.index.lock`): one process builds, the others wait and then open its result;
the file is written to a temporary name and renamed, so a reader never sees half an index, also where the file
system has no working locks (then several processes may build the same bytes, and the last rename wins). Every
build has its own id: a DataLoader worker reopening the index by path checks that it is the rank's, so an index
rebuilt under a running job (its manifest edited) is an error, never another corpus read at the same positions.
Copying a dataset without keeping mtimes (`cp -a` and `rsync -a` keep them) makes its indexes stale: rebuilt once.

    python -m megatron_speech.data.index PREFIX [PREFIX ...]   # build or check ahead of a job
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import sys
import tempfile
import uuid
import warnings
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

MAGIC = b"MSPINDEX"
VERSION = 2
_ALIGN = 64
_ARRAYS = (("lengths", np.int32), ("shard", np.int32), ("position", np.int32), ("pointer", np.int64),
           ("language", np.int16), ("id_offsets", np.int64), ("id_blob", np.uint8))
_REQUIRED_KEYS = ("shard", "index", "id", "samples")
_INT32_MAX = 2**31 - 1


def manifest_path(prefix: str, split: str) -> str:
    """`PREFIX_{split}.manifest.jsonl`."""
    return f"{prefix}_{split}.manifest.jsonl"


def index_path(prefix: str, split: str) -> str:
    """`PREFIX_{split}.index`."""
    return f"{prefix}_{split}.index"


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _open_shard(path: str):
    # Imported here: opening an index (a DataLoader worker) needs no torch; building and reading audio do.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(path, mmap=True)


# --------------------------------------------------------------------------------------------------- building


def iter_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    """("FILE:LINE", value) of every non-blank line of a JSON-lines file; ValueError naming the line when one is
    not JSON."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None


def build_index(prefix: str, split: str, out_path: str | None = None) -> str:
    """Parse the manifest of `prefix`/`split`, check every row against its shard, and write the index.

    Raises FileNotFoundError naming a missing manifest or shard file, ValueError naming the manifest line of a
    malformed row or one that disagrees with its shard. Returns the index path.
    """
    manifest = manifest_path(prefix, split)
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest {manifest} not found: run tools/preprocess_audio.py --output-prefix "
                                f"{prefix} (it writes PREFIX_train/valid.manifest.jsonl next to the shards)")
    folder = os.path.dirname(os.path.abspath(manifest))
    manifest_stamp = _stamp(manifest)
    shard_names: list[str] = []
    shard_stamps: list[list[int]] = []  # taken before reading: a shard rewritten meanwhile reads as stale
    shard_code: dict[str, int] = {}
    stored: list[tuple[np.ndarray, np.ndarray]] = []  # per shard: sequence lengths and byte pointers
    language_code: dict[str, int] = {}
    # Typed growing arrays (not per-row dicts): ~30 bytes per row while parsing.
    lengths, shard, position, pointer, language = array("i"), array("i"), array("i"), array("q"), array("h")
    id_offsets, id_blob = array("q", [0]), bytearray()
    for where, row in iter_jsonl(manifest):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in _REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing} (needs {list(_REQUIRED_KEYS)})")
        for key in ("index", "samples"):
            value = row[key]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _INT32_MAX:
                raise ValueError(f"{where}: {key}={value!r} must be an integer in [0, 2^31)")
        name = row["shard"]
        code = shard_code.get(name)
        if code is None:
            code = shard_code[name] = len(shard_names)
            shard_names.append(name)
            path = os.path.join(folder, name)
            shard_stamps.append(_stamp(path + ".idx") if os.path.isfile(path + ".idx") else [])
            stored.append(_shard_table(path, where))
        held, pointers = stored[code]
        index, samples = row["index"], row["samples"]
        if index >= len(held):
            raise ValueError(f"{where}: index {index} points outside shard {os.path.join(folder, name)}.idx, "
                             f"which holds {len(held)} utterances (manifest and shards out of sync?)")
        if int(held[index]) != samples:
            raise ValueError(f"{where}: samples={samples} but utterance {index} of shard "
                             f"{os.path.join(folder, name)}.idx holds {int(held[index])} samples (manifest and "
                             "shards out of sync?)")
        lang = row.get("language")
        if lang is None:
            language.append(-1)
        else:
            lang = str(lang)
            c = language_code.get(lang)
            if c is None:
                if len(language_code) == 32767:
                    raise ValueError(f"{where}: more than 32767 distinct language labels are not supported")
                c = language_code[lang] = len(language_code)
            language.append(c)
        lengths.append(samples)
        shard.append(code)
        position.append(index)
        pointer.append(int(pointers[index]))
        id_blob += str(row["id"]).encode()
        id_offsets.append(len(id_blob))
    on_disk = {os.path.abspath(p[:-4]) for p in glob.glob(glob.escape(f"{prefix}_{split}_") + "*.idx")}
    unused = sorted(on_disk - {os.path.abspath(os.path.join(folder, n)) for n in shard_names})
    header = {
        "version": VERSION, "build_id": uuid.uuid4().hex, "prefix": os.path.basename(prefix), "split": split,
        "num": len(lengths), "manifest": manifest_stamp,
        "shards": [[n, *stamp] for n, stamp in zip(shard_names, shard_stamps, strict=True)],
        "languages": list(language_code), "unused_shards": unused,
    }
    arrays = {"lengths": lengths, "shard": shard, "position": position, "pointer": pointer, "language": language,
              "id_offsets": id_offsets, "id_blob": id_blob}
    out = out_path or index_path(prefix, split)
    _write(out, header, {k: np.frombuffer(v, dtype=d) if len(v) else np.zeros(0, d) for (k, d), v in
                         zip(_ARRAYS, (arrays[k] for k, _ in _ARRAYS), strict=True)})
    return out


def _shard_table(shard_prefix: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(sequence lengths, byte pointers) of a shard, copied out of megatron's .idx (its mapping closes with it)."""
    for ext in (".idx", ".bin"):
        if not os.path.isfile(shard_prefix + ext):
            raise FileNotFoundError(f"{where} names shard {shard_prefix}, but {shard_prefix}{ext} does not "
                                    "exist: the shards and the manifest must stay together")
    dataset = _open_shard(shard_prefix)
    if dataset.index.dtype != np.int16:
        raise ValueError(f"shard {shard_prefix}.idx holds {np.dtype(dataset.index.dtype).name}, expected int16 "
                         "PCM (written by tools/preprocess_audio.py)")
    return np.array(dataset.index.sequence_lengths), np.array(dataset.index.sequence_pointers)


def _write(path: str, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    layout, offset = {}, 0
    for name, dtype in _ARRAYS:
        a = arrays[name]
        assert a.dtype == dtype, (name, a.dtype)
        offset += (-offset) % _ALIGN
        layout[name] = [offset, len(a)]
        offset += a.nbytes
    header = {**header, "arrays": layout}
    blob = json.dumps(header).encode()
    start = len(MAGIC) + 8 + len(blob)
    start += (-start) % _ALIGN
    # A unique temporary name (PIDs repeat across the containers of several nodes), renamed into place.
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp.", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
            for name, _ in _ARRAYS:
                f.seek(start + layout[name][0])
                f.write(np.ascontiguousarray(arrays[name]).data)  # no bytes copy of a 10 GB array
            f.truncate(start + offset)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------------- reading


def _read_header(path: str, f=None) -> tuple[dict[str, Any], int]:
    if f is None:
        with open(path, "rb") as g:
            return _read_header(path, g)
    if f.read(len(MAGIC)) != MAGIC:
        raise ValueError(f"{path} is not an utterance index (bad magic): delete it and it is rebuilt")
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
    start = len(MAGIC) + 8 + size
    return header, start + (-start) % _ALIGN


def _is_fresh(prefix: str, split: str) -> bool:
    """Whether the index exists, is of this version, and was built from the manifest and shards on disk now."""
    path = index_path(prefix, split)
    try:
        header, _ = _read_header(path)
        if header.get("version") != VERSION or header.get("manifest") != _stamp(manifest_path(prefix, split)):
            return False
        folder = os.path.dirname(os.path.abspath(path))
        return all([size, mtime] == _stamp(os.path.join(folder, name) + ".idx")
                   for name, size, mtime in header["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive flock on `path` (created), or nothing where the file system refuses locks."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield  # read-only folder: building will fail with a clear error below, or the index is fresh already
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # no locks here (e.g. Lustre without -o flock: ENOSYS): the atomic rename still holds
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        yield
    finally:
        os.close(fd)


def ensure_index(prefix: str, split: str, log=None) -> str:
    """The path of a fresh index of prefix/split, built first (under the lock) when missing or stale."""
    path = index_path(prefix, split)
    if _is_fresh(prefix, split):
        return path
    with _locked(path + ".lock"):
        if _is_fresh(prefix, split):  # another process built it while this one waited
            return path
        if log:
            log(f"building the utterance index {path} from {manifest_path(prefix, split)}")
        try:
            build_index(prefix, split)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise PermissionError(f"cannot write the utterance index {path} ({e.strerror}): build it where the "
                                  f"folder is writable with `python -m megatron_speech.data.index {prefix}`, "
                                  "then copy it next to the manifest (keeping mtimes: cp -a)") from None
    return path


def content_digest(path: str) -> str:
    """A digest of what the index says about the utterances, leaving out the file stamps it was checked against
    (sizes and mtimes), its build id and its prefix's name: indexes of equal manifests and shards, written at
    different times, digest equal."""
    import hashlib

    header, start = _read_header(path)
    base = header["prefix"]
    names = [n[len(base):] if n.startswith(base) else n for n, *_ in header["shards"]]  # PREFIX_train_00000
    header = {**header, "build_id": None, "prefix": None, "manifest": None, "shards": names, "unused_shards": None}
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    with open(path, "rb") as f:
        f.seek(start)
        h.update(f.read())
    return h.hexdigest()


class UtteranceIndex:
    """One split of one prefix, memory-mapped. Picklable: it travels as its path and is reopened on arrival."""

    def __init__(self, path: str, build_id: str | None = None) -> None:
        self.path = path
        with open(path, "rb") as f:  # header and mapping from one open file: a rename meanwhile cannot mix two
            header, start = _read_header(path, f)
            if build_id is not None and header.get("build_id") != build_id:
                raise RuntimeError(f"the utterance index {path} was rebuilt while this job ran (its manifest or "
                                   "shards changed): the job's processes would read different corpora; restart it")
            size = os.fstat(f.fileno()).st_size
            end = max((header["arrays"][n][0] + header["arrays"][n][1] * np.dtype(d).itemsize for n, d in _ARRAYS),
                      default=0)
            if size < start + end:
                raise ValueError(f"{path} is truncated ({size} bytes, its header needs {start + end}): delete it "
                                 "and it is rebuilt")
            raw = np.memmap(f, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self.header = header
        self.build_id: str = header["build_id"]
        self.num = int(header["num"])
        self.shard_names: list[str] = [s[0] for s in header["shards"]]
        self.language_names: list[str] = list(header["languages"])
        self.unused_shards: list[str] = list(header.get("unused_shards", []))
        for name, dtype in _ARRAYS:
            offset, count = header["arrays"][name]
            a = raw[start + offset:start + offset + count * np.dtype(dtype).itemsize].view(dtype)
            setattr(self, name, a)
        self.folder = os.path.dirname(os.path.abspath(path))

    @classmethod
    def open(cls, prefix: str, split: str, log=None) -> UtteranceIndex:
        """The index of prefix/split, (re)built from the manifest first when missing or stale."""
        return cls(ensure_index(prefix, split, log))

    def __len__(self) -> int:
        return self.num

    def id(self, i: int) -> str:
        return bytes(self.id_blob[self.id_offsets[i]:self.id_offsets[i + 1]]).decode()

    def shard_path(self, code: int) -> str:
        return os.path.join(self.folder, self.shard_names[code])

    def __reduce__(self):
        # A worker reopens the file by path and checks it is the same build as the rank's.
        return (UtteranceIndex, (self.path, self.build_id))


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\nusage: python -m megatron_speech.data.index PREFIX [PREFIX ...]")
        return 0 if argv else 2
    for prefix in argv:
        for split in ("train", "valid"):
            if os.path.isfile(manifest_path(prefix, split)):
                index = UtteranceIndex.open(prefix, split, log=lambda m: print(m, file=sys.stderr))
                hours = int(index.lengths.sum(dtype=np.int64)) / 16000 / 3600
                print(f"{index.path}: {len(index)} utterances, {hours:.2f} h, {len(index.shard_names)} shards, "
                      f"languages {index.language_names}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
