"""Long recordings cut into segments (megatron_speech/preprocess/segment.py, preprocess's max_segment_seconds) and
preprocessing in parts (--part I/N): bounded segments cut at pauses whose audio adds up bit-exactly to the uncut
decode, labeled inputs never cut, byte-identical resume after a crash between two segments of one input, and parts
whose union is the single run. Every recording is synthesized here: speech-like bursts separated by pauses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_speech import preprocess as pp
from megatron_speech.preprocess import is_valid, preprocess
from tests.audio_files import RATE, TOOL, load_shard, read_jsonl, write_flac
from tests.fixtures import output_bytes


@pytest.fixture(scope="module")
def ten_minutes(tmp_path_factory) -> Path:
    """A 10-minute recording and a 2-second one, in a folder."""
    root = tmp_path_factory.mktemp("long") / "in"
    write_flac(root / "talk.flac", 600, 1)
    write_flac(root / "short.flac", 2, 3)
    return root


def rows_of(prefix: Path) -> list[dict]:
    return read_jsonl(Path(f"{prefix}_train.manifest.jsonl")) + read_jsonl(Path(f"{prefix}_valid.manifest.jsonl"))


def audio_of(prefix: Path, row: dict, cache: dict) -> np.ndarray:
    key = (str(prefix), row["shard"])
    if key not in cache:  # keep each IndexedDataset alive while its views are in use
        cache[key] = load_shard(prefix.parent, row["shard"])
    return np.array(cache[key].get(row["index"]))


def frame_rms(x: np.ndarray, frame: int = 400) -> np.ndarray:
    x = x[: len(x) // frame * frame].astype(np.float64).reshape(-1, frame)
    return np.sqrt((x * x).mean(axis=1))


def test_long_recording_becomes_bounded_segments_cut_at_pauses(tmp_path, ten_minutes):
    cut = tmp_path / "cut" / "c"
    summary = preprocess(str(ten_minutes), str(cut), workers=0, valid_fraction=0.0, progress=False)  # defaults
    rows = rows_of(cut)
    short = [r for r in rows if r["id"] == "short.flac"]
    assert len(short) == 1 and "parent" not in short[0]  # not longer than the maximum: as before
    segs = sorted((r for r in rows if r["id"] != "short.flac"), key=lambda r: r.get("offset", -1))
    lengths = [r["samples"] for r in segs]
    assert sum(lengths) == 600 * RATE and max(lengths) <= 30 * RATE and min(lengths) >= 0.5 * RATE
    assert min(lengths[:-1]) >= 20 * RATE  # each cut within the last third of the maximum length
    assert all(r["parent"] == "talk.flac" and r["id"] == f"talk.flac@{r['offset']}" for r in segs)
    assert list(segs[0])[: len(pp.OUTPUT_KEYS) + 2] == [*pp.OUTPUT_KEYS, "parent", "offset"]
    assert segs[0]["offset"] == 0 and all(a["offset"] + a["samples"] == b["offset"] for a, b in zip(segs, segs[1:]))
    assert summary.num_cut_inputs == 1 and summary.num_segments == len(segs) == summary.num_kept - 1
    assert "1 long unlabeled file cut into" in summary.format()

    # Off: one utterance per input. The segments' audio, concatenated, is its audio bit for bit.
    whole = tmp_path / "whole" / "c"
    preprocess(str(ten_minutes), str(whole), workers=0, valid_fraction=0.0, progress=False, max_segment_seconds=0)
    uncut = {r["id"]: r for r in rows_of(whole)}
    assert set(uncut) == {"talk.flac", "short.flac"}
    assert all("parent" not in r and "offset" not in r for r in uncut.values())
    cache: dict = {}
    audio = np.concatenate([audio_of(cut, r, cache) for r in segs])
    reference = audio_of(whole, uncut["talk.flac"], cache)
    assert audio.dtype == np.int16 and np.array_equal(audio, reference)
    assert all(r["audio_hash"] == pp._audio_hash(audio_of(cut, r, cache)) for r in segs)
    # Cuts land in pauses: the 25 ms around each cut is quieter than the median frame (and than most frames).
    rms = frame_rms(reference)
    for r in segs[1:]:
        c = r["offset"]
        at_cut = frame_rms(reference[c - 200: c + 200])[0]
        assert at_cut < np.median(rms) and at_cut < np.quantile(rms, 0.25), (c, at_cut)


def test_labeled_input_is_never_cut_and_segments_share_their_parents_split(tmp_path, ten_minutes):
    manifest = tmp_path / "list.jsonl"
    # The same recording twice: with a transcript (never cut), and with a language only (cut; its segments are
    # not duplicates of the uncut one: duplicates are found per utterance).
    entries = [{"path": str(ten_minutes / "talk.flac"), "id": "a", "text": "a transcript of the whole talk"},
               {"path": str(ten_minutes / "talk.flac"), "id": "b", "language": "en"},
               {"path": str(ten_minutes / "short.flac"), "id": "s", "speaker": "s1"}]
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    seed = next(s for s in range(100) if is_valid("b", s, 0.5) and not (is_valid("a", s, 0.5) or is_valid("s", s, 0.5)))
    out = tmp_path / "out" / "m"
    preprocess(str(manifest), str(out), workers=0, valid_fraction=0.5, seed=seed, progress=False)
    train = read_jsonl(Path(f"{out}_train.manifest.jsonl"))
    valid = read_jsonl(Path(f"{out}_valid.manifest.jsonl"))
    assert [(r["id"], r["samples"], r["text"]) for r in train if r["id"] == "a"] == [
        ("a", 600 * RATE, "a transcript of the whole talk")]
    assert all(r["parent"] == "b" and r["language"] == "en" for r in valid) and len(valid) >= 20  # all in valid
    assert not any(r.get("parent") for r in train)
    # A manifest key the preprocessor writes for segments is refused, naming the entry.
    manifest.write_text(json.dumps({"path": str(ten_minutes / "short.flac"), "offset": 3}) + "\n")
    with pytest.raises(ValueError, match=r"short.flac has the key 'offset'"):
        preprocess(str(manifest), str(tmp_path / "out" / "bad"), workers=0, progress=False)
    with pytest.raises(ValueError, match=r"--max-segment-seconds=0.8 must be 0 \(never cut\) or at least twice"):
        preprocess(str(manifest), str(tmp_path / "out" / "bad"), workers=0, max_segment_seconds=0.8)


def test_cut_offsets_bounds_and_tail():
    from megatron_speech.preprocess.segment import cut_offsets

    rng = np.random.default_rng(0)
    for _ in range(300):
        min_len = int(rng.integers(1, 3000))
        max_len = int(rng.integers(2 * min_len, 12 * min_len + 2))
        n = int(rng.integers(1, 8 * max_len))
        x = (rng.standard_normal(n) * 1000).astype(np.int16)
        offsets = cut_offsets(x, max_len, min_len)
        lengths = np.diff([*offsets, n])
        assert offsets[0] == 0 and lengths.sum() == n, (n, max_len, min_len)
        if n > max_len:  # every segment, the last one included, within [min, max]
            assert lengths.max() <= max_len and lengths.min() >= min_len, (n, max_len, min_len, lengths)
        else:
            assert offsets == [0]
    # One sample too long: two segments, the tail not shorter than the minimum.
    assert np.diff([*cut_offsets(np.ones(1001, np.int16), 1000, 300), 1001]).min() >= 300
    assert cut_offsets(np.ones(5000, np.int16), 0, 10) == [0]
    with pytest.raises(ValueError, match="at least twice"):
        cut_offsets(np.ones(5000, np.int16), 1000, 600)


def test_crash_between_two_segments_then_rerun_gives_identical_bytes(tmp_path, monkeypatch):
    """Shards smaller than a segment: a shard closes between two segments of one input. A crash right after any
    such close (the journal is written only once the input is complete) resumes to the same bytes."""
    src = tmp_path / "in"
    for i, seconds in enumerate((1.5, 75, 2, 65, 1)):
        write_flac(src / f"f{i}.flac", seconds, 10 + i)
    args = {"workers": 0, "valid_fraction": 0.3, "shard_size_gb": 0.0005, "min_seconds": 0.5, "seed": 1,
            "progress": False}
    full = tmp_path / "full" / "c"
    summary = preprocess(str(src), str(full), **args)
    assert summary.num_cut_inputs == 2 and summary.train_shards + summary.valid_shards >= 6

    original, calls = pp._Split.close_shard, []

    def crash_at(n: int):
        def close_shard(self):
            original(self)
            calls.append(n)
            if len(calls) == n:
                raise RuntimeError("crash")
        return close_shard

    for n in (2, 4, 7):  # closes 2, 3, 6, 7 fall between two segments of one input; 4 between two inputs
        calls.clear()
        out = tmp_path / f"crash{n}" / "c"
        monkeypatch.setattr(pp._Split, "close_shard", crash_at(n))
        with pytest.raises(RuntimeError, match="crash"):
            preprocess(str(src), str(out), **args)
        monkeypatch.setattr(pp._Split, "close_shard", original)
        assert not json.loads(Path(f"{out}.preprocess.json").read_text())["complete"]
        again = preprocess(str(src), str(out), **args)
        assert again.num_kept == summary.num_kept and again.num_segments == summary.num_segments
        names = sorted(p.name for p in full.parent.iterdir())
        assert names == sorted(p.name for p in out.parent.iterdir())
        for name in names:
            assert output_bytes(full.parent / name) == output_bytes(out.parent / name), (n, name)


def test_parts_together_hold_every_input_once(tmp_path):
    src = tmp_path / "in"
    for i in range(10):
        write_flac(src / f"u{i}.flac", 0.6 + 0.1 * i, 30 + i)
    write_flac(src / "long.flac", 70, 40)
    (src / "junk.txt").write_text("not audio")
    args = {"workers": 0, "valid_fraction": 0.3, "seed": 2, "progress": False}
    single = tmp_path / "single" / "c"
    preprocess(str(src), str(single), **args)
    base = tmp_path / "parts" / "c"
    summaries = [preprocess(str(src), str(base), part=(i, 2), **args) for i in range(2)]
    assert sum(s.num_inputs for s in summaries) == 12 and all(s.num_inputs for s in summaries)

    def by_id(prefix: Path) -> dict[str, tuple[str, str]]:  # id -> (split, audio_hash)
        return {r["id"]: (split, r["audio_hash"])
                for split in ("train", "valid") for r in read_jsonl(Path(f"{prefix}_{split}.manifest.jsonl"))}

    parts = [by_id(pp.part_prefix(str(base), i)) for i in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert {**parts[0], **parts[1]} == by_id(single)  # same utterances, same splits, same audio
    rejects = [r["id"] for i in range(2) for r in read_jsonl(Path(f"{pp.part_prefix(str(base), i)}.rejects.jsonl"))]
    assert rejects == ["junk.txt"]
    assert pp.parts_status(str(base), 2) == ([pp.part_prefix(str(base), 0), pp.part_prefix(str(base), 1)], [])
    # Another part count next to these is refused; so is an index out of range, by the CLI.
    with pytest.raises(ValueError, match=r"is part 0 of 2, this run splits the inputs into 3"):
        preprocess(str(src), str(base), part=(2, 3), **args)
    cli = subprocess.run([sys.executable, str(TOOL), "--input", str(src), "--output-prefix", str(base), "--part",
                          "2/2"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "expected I/N with 0 <= I < N" in cli.stderr


def _usr1_at_third(path: str, min_samples: int) -> pp.Kept | pp.Rejected:
    if path.endswith("u03.flac"):  # Slurm's warning signal reaches every process of the step: a worker too
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getppid(), signal.SIGUSR1)
    return pp.decode_file(path, min_samples)


def test_usr1_stops_at_a_file_boundary_and_the_workers_survive_it(tmp_path):
    """launch/preprocess.sbatch's --signal=USR1@300: the run saves and stops (the task then requeues itself), the
    workers ignore the signal (by default it would kill them: their files "crashed")."""
    src = tmp_path / "in"
    for i in range(6):
        write_flac(src / f"u{i:02d}.flac", 0.6, 50 + i)
    write_flac(src / "u10_long.flac", 40, 60)
    args = {"valid_fraction": 0.3, "shard_size_gb": 0.0005, "progress": False}
    ref = tmp_path / "ref" / "c"
    preprocess(str(src), str(ref), workers=0, **args)
    out = tmp_path / "out" / "c"
    with pytest.raises(pp.PreprocessInterrupted, match=r"stopped by SIGUSR1 after file \d of 7"):
        preprocess(str(src), str(out), workers=2, process_fn=_usr1_at_third, **args)
    summary = preprocess(str(src), str(out), workers=0, **args)
    assert 1 <= summary.resumed_at <= 4 and summary.num_cut_inputs == 1 and not summary.rejects
    for p in ref.parent.iterdir():
        assert output_bytes(p) == output_bytes(out.parent / p.name), p.name
