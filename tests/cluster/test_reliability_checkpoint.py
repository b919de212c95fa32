"""Reliability drills 3 and 4: damaged and unsafe checkpoints.

Two spawned ranks write real checkpoints (model, distributed optimizer, EMA, RNG) and check that a damaged one is
refused on *both* ranks with the same message (no rank left waiting in a collective) and that resuming falls back
to the previous one. Then, in this process, every kind of damage is named by the manifest check, and crafted
pickles that would run code (in `.metadata`, in `common.pt`, in a small object inside a shard) are refused
before anything unpickles them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_speech.checkpoint import integrity
from megatron_speech.checkpoint.checkpointing import checkpoint_dir, resume_step
from megatron_speech.checkpoint.integrity import MANIFEST, CheckpointIntegrityError, verify_checkpoint
from tests.dist import run_ranks


def _write_damage_and_resume(rank: int, world: int, save_dir: str):
    import torch.distributed as dist

    from megatron_speech.checkpoint.checkpointing import load_checkpoint, save_checkpoint
    from tests.runs import setup_training, train_one_step

    cfg, model, ddp, opt, sched, ema, dp_rank, dp = setup_training(1)  # TP=1, DP=2: both ranks write shards
    for step in (1, 2, 3, 4):
        train_one_step(cfg, ddp, opt, sched, ema, step, dp_rank, dp)
        if step % 2 == 0:
            save_checkpoint(save_dir, step, ddp, opt, sched, ema, {"consumed": step}, keep_last=2)
    started = time.perf_counter()
    load_checkpoint(checkpoint_dir(save_dir, 4), ddp, opt, sched, ema)  # intact: loads (verification included)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    assert verify_checkpoint(checkpoint_dir(save_dir, 4)) == []
    verify_seconds = time.perf_counter() - started
    if rank == 0:
        shutil.copytree(checkpoint_dir(save_dir, 4), Path(save_dir) / "pristine")
        _flip_byte(_largest_shard(checkpoint_dir(save_dir, 4)))
    dist.barrier()
    try:
        load_checkpoint(checkpoint_dir(save_dir, 4), ddp, opt, sched, ema)
        refused = None
    except CheckpointIntegrityError as e:
        refused = str(e)
    fallback = resume_step(save_dir)
    trainer = load_checkpoint(checkpoint_dir(save_dir, fallback), ddp, opt, sched, ema)
    return refused, fallback, trainer["consumed"], verify_seconds, load_seconds


def _largest_shard(path: Path) -> Path:
    return max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x40
    file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    results = run_ranks(_write_damage_and_resume, 2, str(root))
    return root, results


def test_a_damaged_checkpoint_is_refused_on_every_rank_and_resume_falls_back(written):
    root, results = written
    (refused0, fallback0, consumed0, verify_s, load_s), (refused1, fallback1, consumed1, _, _) = results
    assert refused0 and refused0 == refused1  # the same decision and words on both ranks, no hang
    shard = _largest_shard(checkpoint_dir(root, 4)).name
    assert "refusing to load it" in refused0 and f"{shard}: SHA-256 differs from the manifest" in refused0
    assert fallback0 == fallback1 == 2 and consumed0 == consumed1 == 2
    size_mb = sum(p.stat().st_size for p in checkpoint_dir(root, 2).iterdir()) / 1e6
    print(f"\nFIGURE verify: a {size_mb:.1f} MB checkpoint verifies in {1000 * verify_s:.0f} ms on 2 ranks "
          f"(whole load {1000 * load_s:.0f} ms)")


@pytest.fixture
def ckpt(written, tmp_path) -> Path:
    """A private copy of an intact checkpoint (model, distributed optimizer, EMA, RNG) to damage."""
    root, _ = written
    path = tmp_path / "iter_0000004"
    shutil.copytree(root / "pristine", path)
    return path


def test_manifest_lists_every_file_with_size_and_checksum(ckpt):
    import hashlib

    manifest = json.loads((ckpt / MANIFEST).read_text())
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest["files"]) == files and ".metadata" in files and "common.pt" in files
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(ckpt) == []


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _append(f: Path):
    f.write_bytes(f.read_bytes() + b"\0" * 7)


DAMAGE = {
    "truncated shard": (lambda c: _truncate(_largest_shard(c)), "bytes, the manifest says"),
    "flipped bit": (lambda c: _flip_byte(_largest_shard(c)), "SHA-256 differs"),
    "grown file": (lambda c: _append(c / "common.pt"), "common.pt:"),
    "missing shard": (lambda c: _largest_shard(c).unlink(), "missing"),
    "damaged index": (lambda c: _flip_byte(c / ".metadata"), ".metadata: SHA-256 differs"),
    "missing manifest": (lambda c: (c / MANIFEST).unlink(), f"has no {MANIFEST}: an incomplete copy"),
    "garbled manifest": (lambda c: (c / MANIFEST).write_text("{"), "unreadable"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_every_kind_of_damage_is_named(ckpt, kind):
    damage, expected = DAMAGE[kind]
    damage(ckpt)
    problems = verify_checkpoint(ckpt)
    assert len(problems) == 1 and expected in problems[0], problems
    with pytest.raises(CheckpointIntegrityError, match="refusing to load it"):
        integrity.check_checkpoint(ckpt)
    assert integrity.main([str(ckpt)]) == 1  # the operator's check after copying a checkpoint


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, ckpt):
    save_dir = tmp_path / "run"
    for step in (2, 4, 6):
        shutil.copytree(ckpt, checkpoint_dir(save_dir, step))
    (save_dir / "latest").write_text("6\n")
    assert resume_step(save_dir) == 6
    _flip_byte(_largest_shard(checkpoint_dir(save_dir, 6)))
    shutil.rmtree(checkpoint_dir(save_dir, 4))  # pruned, or lost
    assert resume_step(save_dir) == 2
    shutil.copytree(checkpoint_dir(save_dir, 2), checkpoint_dir(save_dir, 8))  # newer than latest: never trusted
    assert resume_step(save_dir) == 2
    _truncate(_largest_shard(checkpoint_dir(save_dir, 2)))
    with pytest.raises(CheckpointIntegrityError, match="no checkpoint .* at or before step 6 is intact") as e:
        resume_step(save_dir)
    assert "iter_0000006" in str(e.value) and "iter_0000002" in str(e.value)


def _resume_counting_reads(rank: int, world: int, save_dir: str):
    from megatron_speech.checkpoint.checkpointing import load_checkpoint
    from tests.runs import setup_training

    cfg, model, ddp, opt, sched, ema, _, _ = setup_training(1)  # TP=1, DP=2: the layout that wrote it
    hashed = []
    digest = integrity.file_digest

    def counting(file):
        hashed.append((Path(file).name, Path(file).stat().st_size))
        return digest(file)

    integrity.file_digest = counting
    step = resume_step(save_dir)
    trainer = load_checkpoint(checkpoint_dir(save_dir, step), ddp, opt, sched, ema)
    return hashed, trainer["consumed"]


def test_a_resume_reads_each_file_once_for_its_checksum_shared_over_the_ranks(tmp_path, ckpt):
    save_dir = tmp_path / "run"
    shutil.copytree(ckpt, checkpoint_dir(save_dir, 4))
    (save_dir / "latest").write_text("4\n")
    results = run_ranks(_resume_counting_reads, 2, str(save_dir))
    assert [consumed for _, consumed in results] == [4, 4]
    hashed = [entry for part, _ in results for entry in part]
    files = [name for name in json.loads((ckpt / MANIFEST).read_text())["files"]]
    # every file hashed once in all (resume_step verified it; the load did not repeat that), and the bytes split
    assert sorted(name for name, _ in hashed) == sorted(files)
    per_rank = [sum(size for _, size in part) for part, _ in results]
    assert min(per_rank) >= 0.3 * sum(per_rank), per_rank


# ------------------------------------------------------------------------------------------ 4. unsafe pickles


class RunsCode:
    """What a hostile pickle does: calls os.system on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rewrite_manifest(ckpt: Path) -> None:
    # Whoever can write a checkpoint can write its manifest: the checksums prove integrity, not origin.
    integrity.write_manifest_file(ckpt, integrity.compute_manifest(ckpt))


def _runs_in_plain_python(code: str, marker: Path) -> bool:
    """Control: the payload is real (an unrestricted load in a fresh interpreter creates the marker)."""
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=120)
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


def test_a_genuine_checkpoint_has_no_pickle_that_needs_more_than_weights_only(ckpt):
    # common.pt, our RNG states and megatron's _extra_state objects inside the shards: weights_only=True loads
    # them all, and the index holds only checkpoint metadata.
    assert integrity.scan_for_code(ckpt) == []


def test_an_index_pickle_that_runs_code_is_refused(ckpt, tmp_path):
    marker = tmp_path / "pwned_metadata"
    (ckpt / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    _rewrite_manifest(ckpt)
    assert _runs_in_plain_python(f"import pickle; pickle.load(open({str(ckpt / '.metadata')!r}, 'rb'))", marker)
    problems = verify_checkpoint(ckpt)
    assert not marker.exists()
    assert len(problems) == 1 and "refers to posix.system" in problems[0], problems


def test_a_common_state_that_runs_code_is_refused(ckpt, tmp_path):
    marker = tmp_path / "pwned_common"
    torch.save({"trainer": RunsCode(marker)}, ckpt / "common.pt")
    _rewrite_manifest(ckpt)
    problems = verify_checkpoint(ckpt)
    assert not marker.exists()
    assert len(problems) == 1 and problems[0].startswith("common.pt: not loadable with weights_only=True"), problems
    assert "posix.system" in problems[0]


def test_a_small_object_inside_a_shard_that_runs_code_is_refused(ckpt, tmp_path):
    """torch.distributed.checkpoint reads these (our RNG states) with torch.load(weights_only=False)."""
    marker = tmp_path / "pwned_object"
    blob = io.BytesIO()
    torch.save([RunsCode(marker)], blob)
    (ckpt / "evil.distcp").write_bytes(blob.getvalue())
    metadata = integrity.load_metadata(ckpt)
    index = next(i for i in metadata.storage_data if i.fqn.startswith("rng_state/"))
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], relative_path="evil.distcp",
                                                       offset=0, length=len(blob.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    _rewrite_manifest(ckpt)
    assert _runs_in_plain_python(
        f"import torch; torch.load(open({str(ckpt / 'evil.distcp')!r}, 'rb'), weights_only=False)", marker)
    problems = verify_checkpoint(ckpt)
    assert not marker.exists()
    assert len(problems) == 1 and problems[0].startswith(f"evil.distcp [0:+{len(blob.getvalue())}] ({index.fqn})")
    assert "not loadable with weights_only=True" in problems[0], problems
