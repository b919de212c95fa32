"""A checkpoint's manifest (every file with its size and SHA-256) and the checks run before torch reads a byte.

    <save_dir>/iter_0001000/manifest.json   {"format": 1, "files": {"__0_0.distcp": {"size": .., "sha256": ..}, ..}}

save_checkpoint writes it after every rank's shards are on disk and before `latest` moves, so a checkpoint that
`latest` names always has one. load_checkpoint (and the resume fallback) calls verify_checkpoint first:

1. the manifest exists and every file it lists has its size and checksum (truncated, flipped or missing files,
   a half-finished copy);
2. nothing in the checkpoint is a pickle that would run code when loaded: megatron-core's `torch_dist` format
   keeps its index (`.metadata`) as a plain pickle that torch reads with `pickle.load`, and its small objects
   (our RNG states, megatron's `_extra_state`) as pickles that torch reads with `weights_only=False`. Here
   `.metadata` goes through an unpickler that only builds torch.distributed.checkpoint's own metadata classes,
   and every small object and `*.pt` file through `torch.load(weights_only=True)`; a checkpoint that fails is
   refused, so the later unrestricted loads only ever see data that a restricted loader accepted.

The manifest detects damage, not tampering: whoever can rewrite a shard can rewrite the manifest. Distributed
checkpoints are for trusted sources; share models as safetensors (tools/convert_to_hf.py).

Collective when torch.distributed is initialized: the files are dealt out by size (largest first, to the rank
with the fewest bytes so far), so each rank reads about 1/N of the bytes, and the results are gathered so every
rank gets the same answer; also usable in a single process. A resume reads the checkpoint for verification once
(checkpointing.resume_step; the load that follows does not repeat it).

    python -m megatron_speech.checkpoint.integrity CKPT_DIR            verify (exit 1 with the problems)
    python -m megatron_speech.checkpoint.integrity CKPT_DIR --write    (re)write the manifest of files you trust
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_speech.compat.megatron_core import TORCH_DIST_METADATA_GLOBALS

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK_BYTES = 8 << 20


class CheckpointIntegrityError(ValueError):
    """A checkpoint is damaged, incomplete or unsafe to unpickle; the message lists every problem."""


# ------------------------------------------------------------------------------------------------------------
# Collectives that degrade to no-ops in a single process


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's obj on every rank."""
    if _rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    world = _rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------------------------
# Manifest


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.startswith(f".{MANIFEST}"))


def file_digest(file: Path) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex} of one file."""
    h = hashlib.sha256()
    size = 0
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def share_by_size(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Files dealt out to `world` ranks, largest first to the rank with the fewest bytes so far (deterministic:
    ties by name and rank), so that hashing takes about 1/world of the bytes on each rank. With fully parallel
    saves every rank wrote files of about the same size, and a plain name order would also do; a checkpoint
    written by one rank (or a few) is where this matters."""
    shares: list[list[str]] = [[] for _ in range(world)]
    loads = [0] * world
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        shares[rank].append(name)
        loads[rank] += sizes[name]
    return shares


def compute_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the files now in `path` (rank 0's listing; each rank hashes a share). Collective; every
    rank returns the same manifest or raises the same OSError."""
    path = Path(path)
    rank, world = _rank_world()
    sizes: Any = None
    if rank == 0:
        try:
            sizes = {name: (path / name).stat().st_size for name in _files(path)}
        except OSError as e:  # a file gone between listing and stat: the same error on every rank
            sizes = f"rank 0: {e}"
    sizes = broadcast_from_rank0(sizes)
    if isinstance(sizes, str):
        raise OSError(f"cannot hash the files of {path}: {sizes}")
    files = sorted(sizes)
    entries, error = {}, None
    try:
        for name in share_by_size(sizes, world)[rank]:
            entries[name] = file_digest(path / name)
    except OSError as e:
        error = f"rank {rank}: {e}"
    gathered = _all_gather((entries, error))
    errors = [e for _, e in gathered if e]
    if errors:
        raise OSError(f"cannot hash the files of {path}: " + "; ".join(errors))
    merged: dict[str, Any] = {}
    for part, _ in gathered:
        merged.update(part)
    return {"format": FORMAT, "files": {name: merged[name] for name in files}}


def write_manifest_file(path: str | Path, manifest: dict[str, Any]) -> None:
    """Write `path`/manifest.json atomically (temp + fsync + rename). Local: call it on one rank."""
    path = Path(path)
    tmp = path / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)


# ------------------------------------------------------------------------------------------------------------
# Verification


def verify_checkpoint(path: str | Path) -> list[str]:
    """Every problem found in checkpoint `path` (empty: intact and free of code-running pickles). Collective;
    the same list on every rank. Reads nothing with an unrestricted unpickler."""
    path = Path(path)
    rank, world = _rank_world()
    manifest: Any = None
    if rank == 0:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
                manifest = f"{path / MANIFEST} is not a megatron-speech manifest"
        except FileNotFoundError:
            manifest = (f"{path} has no {MANIFEST}: an incomplete copy, or not written by save_checkpoint (if you "
                        f"trust these files: python -m megatron_speech.checkpoint.integrity {path} --write)")
        except (OSError, ValueError) as e:
            manifest = f"{path / MANIFEST} is unreadable: {e}"
    manifest = broadcast_from_rank0(manifest)
    if isinstance(manifest, str):
        return [manifest]
    sizes = {name: int(entry.get("size", 0)) if isinstance(entry, dict) else 0
             for name, entry in manifest["files"].items()}
    local = []
    for name in share_by_size(sizes, world)[rank]:
        expected = manifest["files"][name]
        try:
            size = (path / name).stat().st_size
            if size != expected["size"]:
                local.append(f"{name}: {size} bytes, the manifest says {expected['size']} (truncated or extended)")
            elif file_digest(path / name)["sha256"] != expected["sha256"]:
                local.append(f"{name}: SHA-256 differs from the manifest (the file's bytes changed)")
        except FileNotFoundError:
            local.append(f"{name}: missing")
        except OSError as e:
            local.append(f"{name}: unreadable ({e})")
    problems = sorted(p for part in _all_gather(local) for p in part)
    if problems:
        return problems
    # Only intact files are worth scanning; one rank suffices (small files, and `.metadata`).
    return broadcast_from_rank0(scan_for_code(path) if rank == 0 else None)


def check_checkpoint(path: str | Path) -> None:
    """verify_checkpoint, raising CheckpointIntegrityError with every problem. Collective."""
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointIntegrityError(f"checkpoint {path} is damaged or unsafe; refusing to load it:\n  - "
                                       + "\n  - ".join(problems))


# ------------------------------------------------------------------------------------------------------------
# No code in pickles


# What torch.distributed.checkpoint's `.metadata` pickle legitimately holds: its own dataclasses and enums, torch
# sizes, dtypes and layouts. Anything else (os.system, builtins.eval, subprocess...) is refused by name.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData", "LoadPlan", "ReadItem",
        "LoadItemType"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    **TORCH_DIST_METADATA_GLOBALS,
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a checkpoint index never needs")


def load_metadata(path: str | Path):
    """torch.distributed.checkpoint's Metadata of checkpoint `path`, read without running code."""
    with open(Path(path) / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


def scan_for_code(path: str | Path) -> list[str]:
    """Problems with the pickles of checkpoint `path`: `.metadata` must hold only checkpoint metadata, and every
    `*.pt` file and every small object stored inside the `.distcp` shards must load with weights_only=True."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)
    problems = []
    for pt in sorted(path.rglob("*.pt")):
        try:
            torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, or a RuntimeError wrapping one
            problems.append(f"{pt.relative_to(path)}: not loadable with weights_only=True ({_first_line(e)})")
    if not (path / ".metadata").exists():
        return problems
    try:
        metadata = load_metadata(path)
    except Exception as e:
        return [*problems, f".metadata: {_first_line(e)}"]
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        where = f"{info.relative_path} [{info.offset}:+{info.length}] ({index.fqn})"
        if getattr(info, "transform_descriptors", None):
            problems.append(f"{where}: stored with transforms {info.transform_descriptors}; cannot check it")
            continue
        try:
            with open(path / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as e:
            problems.append(f"{where}: not loadable with weights_only=True ({_first_line(e)})")
    return problems


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    # torch's weights_only errors put the offending global on a later line: keep the line that names it.
    named = [line for line in text if "GLOBAL" in line or "refers to" in line]
    return (named or text or [type(e).__name__])[0].strip()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or any(a not in ("--write",) for a in args[1:]):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    path = Path(args[0])
    if "--write" in args:
        write_manifest_file(path, compute_manifest(path))
        print(f"wrote {path / MANIFEST}")
    problems = verify_checkpoint(path)
    for p in problems:
        print(p)
    print(f"{path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
