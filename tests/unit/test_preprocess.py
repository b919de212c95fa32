"""tools/preprocess_audio.py and megatron_speech.preprocess: messy inputs, exact output, resume after SIGKILL.

Every audio file here is generated in the test (numpy + soundfile), plus the odd WAV files scipy's wheel ships.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from megatron_speech.preprocess import (
    OUTPUT_KEYS,
    REJECT_REASONS,
    Kept,
    PreprocessInterrupted,
    Rejected,
    decode_file,
    preprocess,
)
from tests.audio_files import TOOL, load_shard, read_jsonl, tone, write_audio
from tests.fixtures import ROOT, output_bytes


def _can_write(fmt: str, subtype: str, tmp: Path) -> bool:
    try:
        sf.write(str(tmp / f"probe.{fmt.lower()}"), np.zeros((4800, 1), np.float32), 48000, format=fmt, subtype=subtype)
        return True
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError):
        return False
    finally:
        for p in tmp.glob("probe.*"):
            p.unlink()


def make_messy_folder(root: Path) -> dict[str, set[str | None]]:
    """Writes a folder of good and broken audio; returns {relpath: allowed outcomes} (None = kept)."""
    expect: dict[str, set[str | None]] = {}
    kept = {None}
    good = [  # relpath, rate, channels, seconds, format, subtype
        ("speech/pcm16_8k_mono.wav", 8000, 1, 1.1, "WAV", "PCM_16"),
        ("speech/pcm24_22k_stereo.wav", 22050, 2, 0.9, "WAV", "PCM_24"),
        ("speech/deep/pcm32_44k_3ch.wav", 44100, 3, 0.7, "WAV", "PCM_32"),
        ("float_96k.wav", 96000, 1, 0.6, "WAV", "FLOAT"),
        ("double_12k_stereo.wav", 12000, 2, 0.8, "WAV", "DOUBLE"),
        ("u8_11k.wav", 11025, 1, 0.5, "WAV", "PCM_U8"),
        ("ulaw_8k.wav", 8000, 1, 0.5, "WAV", "ULAW"),
        ("a.flac", 32000, 2, 1.0, "FLAC", "PCM_16"),
        ("b24.flac", 48000, 1, 0.7, "FLAC", "PCM_24"),
        ("c.ogg", 44100, 2, 1.0, "OGG", "VORBIS"),
        ("d.opus", 48000, 1, 1.0, "OGG", "OPUS"),
        ("e.mp3", 44100, 2, 1.0, "MP3", "MPEG_LAYER_III"),
        ("f.aiff", 11025, 1, 0.6, "AIFF", "PCM_16"),
        ("g16k.rf64", 16000, 2, 0.6, "RF64", "PCM_24"),
        ("h.w64", 24000, 1, 0.5, "W64", "PCM_16"),
    ]
    for seed, (rel, rate, ch, sec, fmt, sub) in enumerate(good):
        if not _can_write(fmt, sub, root.parent):
            continue
        write_audio(root / rel, tone(sec, rate, ch, seed), rate, fmt, sub)
        expect[rel] = kept
    # Content decides, not the name: a WAV called .flac, and a file without an extension.
    write_audio(root / "really_a_wav.flac", tone(0.5, 16000, 1, 40), 16000, "WAV", "PCM_16")
    write_audio(root / "no_extension", tone(0.5, 22050, 1, 41), 22050, "FLAC", "PCM_16")
    os.rename(root / "no_extension", root / "noext")
    expect.update({"really_a_wav.flac": kept, "noext": kept})
    # Loud: a square wave at full scale is kept with a "clipped" warning.
    square = np.sign(tone(0.5, 16000, 1, 42)).astype(np.float32)
    write_audio(root / "clipped.wav", square, 16000, "WAV", "PCM_16")
    expect["clipped.wav"] = kept
    # A byte-identical copy: the later one (in sorted order) is the duplicate.
    shutil.copy(root / "speech/pcm16_8k_mono.wav", root / "speech/zz_copy.wav")
    expect["speech/zz_copy.wav"] = {"duplicate"}
    # Broken ones.
    whole = (root / "speech/pcm24_22k_stereo.wav").read_bytes()
    (root / "broken/half.wav").parent.mkdir()
    (root / "broken/half.wav").write_bytes(whole[: len(whole) // 2])
    (root / "broken/header_only.wav").write_bytes(whole[: whole.find(b"data") + 8])
    flac = (root / "a.flac").read_bytes()
    (root / "broken/half.flac").write_bytes(flac[: len(flac) // 2])
    (root / "broken/empty.wav").write_bytes(b"")
    (root / "broken/random.bin").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "broken/notes.txt").write_text("not audio\n" * 50)
    nan = tone(0.5, 16000, 1, 43)
    nan[1234, 0] = np.nan
    write_audio(root / "broken/nan.wav", nan, 16000, "WAV", "FLOAT")
    write_audio(root / "broken/silence.wav", np.zeros((16000, 2), np.float32), 44100, "WAV", "PCM_16")
    write_audio(root / "broken/dc.wav", np.full((8000, 1), 0.25, np.float32), 16000, "WAV", "PCM_16")
    write_audio(root / "broken/one_frame_96k.wav", np.full((1, 1), 0.5, np.float32), 96000, "WAV", "PCM_16")
    os.symlink(root / "nowhere.wav", root / "broken/dangling.wav")
    expect.update({
        "broken/half.wav": {"truncated"}, "broken/header_only.wav": {"truncated"},
        "broken/half.flac": {"truncated", "decode_error"}, "broken/empty.wav": {"empty"},
        "broken/random.bin": {"unreadable"}, "broken/notes.txt": {"unreadable"}, "broken/nan.wav": {"nan_or_inf"},
        "broken/silence.wav": {"silent"}, "broken/dc.wav": {"silent"}, "broken/one_frame_96k.wav": {"too_short"},
        "broken/dangling.wav": {"unreadable"},
    })
    # scipy's odd WAVs: RF64, big-endian, 1-64 bit, 1234 Hz, 3-5 channels, truncated, broken chunks.
    import scipy

    scipy_data = Path(scipy.__file__).parent / "io" / "tests" / "data"
    wavs = sorted(scipy_data.glob("*.wav"))
    assert len(wavs) >= 15, f"scipy's test WAVs not found under {scipy_data}"
    (root / "scipy").mkdir()
    for p in wavs:
        shutil.copy(p, root / "scipy" / p.name)
        if "early-eof-no-data" in p.name or "incomplete-chunk" in p.name or any(
                f"-5S-{b}bit" in p.name for b in (36, 45, 53, 64)):
            expect[f"scipy/{p.name}"] = {"unreadable"}
        elif "early-eof" in p.name:
            expect[f"scipy/{p.name}"] = {"truncated"}
        else:  # the little/big-endian and RF64 twins hold the same audio
            expect[f"scipy/{p.name}"] = {None, "duplicate"}
    return expect


def reference_int16(path: str) -> np.ndarray:
    """The decode the shards must hold: soundfile float32 → mean over channels → soxr HQ to 16 kHz → int16."""
    x, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if rate != 16000:
        mono = soxr.resample(mono, rate, 16000, quality="HQ")
    return np.clip(np.rint(mono * np.float32(32768)), -32768, 32767).astype(np.int16)


def test_messy_folder_every_file_accounted_for_and_audio_exact(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    expect = make_messy_folder(src)
    out = tmp_path / "out"
    summary = preprocess(str(src), str(out / "corpus"), workers=2, valid_fraction=0.3, shard_size_gb=0.0001,
                         min_seconds=0.0, seed=3, progress=False)
    train = read_jsonl(out / "corpus_train.manifest.jsonl")
    valid = read_jsonl(out / "corpus_valid.manifest.jsonl")
    rejects = read_jsonl(out / "corpus.rejects.jsonl")

    # Every input file is in exactly one of the three, with an allowed outcome.
    outcome = {}
    for r in train + valid:
        assert r["id"] not in outcome
        outcome[r["id"]] = None
    for r in rejects:
        assert r["id"] not in outcome and r["reason"] in REJECT_REASONS and r["detail"]
        outcome[r["id"]] = r["reason"]
    assert set(outcome) == set(expect)
    wrong = {k: (outcome[k], expect[k]) for k in expect if outcome[k] not in expect[k]}
    assert not wrong, wrong
    assert summary.num_kept == len(train) + len(valid) and sum(summary.rejects.values()) == len(rejects)
    assert train and valid and summary.train_shards >= 3

    # The manifests: exact keys first, shard order, and the audio equals a reference decode within rounding.
    shards = {}  # keep each IndexedDataset alive while its get() views (into its mmap) are in use
    for split, records in (("train", train), ("valid", valid)):
        expected_position = {}
        for r in records:
            assert list(r)[: len(OUTPUT_KEYS)] == list(OUTPUT_KEYS)
            assert r["shard"].startswith(f"corpus_{split}_") and len(r["shard"]) == len(f"corpus_{split}_00000")
            assert r["index"] == expected_position.get(r["shard"], 0)
            expected_position[r["shard"]] = r["index"] + 1
            info = sf.info(r["source"])
            assert (r["orig_sample_rate"], r["orig_channels"]) == (info.samplerate, info.channels)
            if r["shard"] not in shards:
                shards[r["shard"]] = load_shard(out, r["shard"])
            got = shards[r["shard"]].get(r["index"])
            assert got.dtype == np.int16 and len(got) == r["samples"]
            ref = reference_int16(r["source"])
            assert len(ref) == len(got), r["id"]
            assert np.abs(ref.astype(np.int32) - got).max() <= 1, r["id"]
        for name, n in expected_position.items():
            ds = shards[name]
            assert len(ds) == n and len(ds.document_indices) == n + 1  # one document per utterance
            assert (out / f"{name}.bin").stat().st_size <= 100_000 or n == 1
    assert next(r for r in train + valid if r["id"] == "clipped.wav")["warnings"] == ["clipped"]
    assert not list(out.glob("*.partial*")) and not list(out.glob("*.tmp"))


def _slow_decode(path: str, min_samples: int) -> Kept | Rejected:
    time.sleep(0.03)  # so that a SIGKILL surely lands mid-run
    return decode_file(path, min_samples)


RESUME_ARGS = {"valid_fraction": 0.25, "shard_size_gb": 0.00003, "min_seconds": 0.2, "seed": 5}


def _run_slow(input_path: str, prefix: str, checkpoint_seconds: str) -> None:
    """Entry point of the subprocess that gets SIGKILLed (the library, slowed down; same arguments as the CLI)."""
    preprocess(input_path, prefix, workers=2, progress=False, checkpoint_seconds=float(checkpoint_seconds),
               process_fn=_slow_decode, **RESUME_ARGS)


def _cli(input_path: Path, prefix: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, str(TOOL), "--input", str(input_path), "--output-prefix", str(prefix), "--workers", "2"]
    for k, v in RESUME_ARGS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _kill_after(input_path: Path, prefix: Path, wait_for: str, checkpoint_seconds: float) -> None:
    code = "import sys; from tests.unit.test_preprocess import _run_slow; _run_slow(*sys.argv[1:])"
    log = prefix.parent.parent / f"kill{checkpoint_seconds}.log"  # a file, not a pipe: orphaned workers inherit it
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, str(input_path), str(prefix), str(checkpoint_seconds)],
                                cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=err)
    target = Path(f"{prefix}{wait_for}")
    deadline = time.monotonic() + 60
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    message = log.read_text()
    log.unlink()
    assert not finished, f"the run ended before it could be killed:\n{message[-2000:]}"
    journal = json.loads(Path(f"{prefix}.preprocess.json").read_text())
    assert not journal["complete"] and not Path(f"{prefix}_train.manifest.jsonl").exists()


def test_sigkill_midway_then_rerun_gives_identical_bytes(tmp_path):
    src = tmp_path / "in"
    for i in range(44):
        rate = (8000, 16000, 22050, 44100, 48000)[i % 5]
        write_audio(src / f"spk{i % 3}" / f"utt{i:02d}.wav", tone(0.3 + 0.05 * (i % 7), rate, 1 + i % 2, i), rate,
               "WAV", ("PCM_16", "FLOAT")[i % 2])
    (src / "spk0" / "junk.txt").write_text("not audio")
    write_audio(src / "spk1" / "short.wav", tone(0.1, 16000, 1, 99), 16000, "WAV", "PCM_16")

    full = tmp_path / "a" / "full"  # the uninterrupted run, in this process (the resumed one runs the CLI)
    preprocess(str(src), str(full), workers=2, progress=False, **RESUME_ARGS)

    part = tmp_path / "b" / "part"
    _kill_after(src, part, "_train_00000.bin", checkpoint_seconds=60)  # checkpoints only when a shard closes
    _kill_after(src, part, "_train_00004.bin", checkpoint_seconds=0)  # a checkpoint after every file
    resumed = _cli(src, part)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at file" in resumed.stderr

    def normalized(path: Path, base: str) -> bytes:
        data = output_bytes(path)
        return data.replace(f'"{base}_'.encode(), b'"PREFIX_') if path.suffix in (".jsonl", ".json") else data

    names_a = sorted(p.name.replace("full", "PREFIX", 1) for p in full.parent.iterdir())
    names_b = sorted(p.name.replace("part", "PREFIX", 1) for p in part.parent.iterdir())
    assert names_a == names_b
    assert len([n for n in names_a if n.endswith(".bin")]) >= 8
    for p in full.parent.iterdir():
        q = part.parent / p.name.replace("full", "part", 1)
        assert normalized(p, "full") == normalized(q, "part"), p.name
    rejects = read_jsonl(Path(f"{full}.rejects.jsonl"))
    assert sorted(r["reason"] for r in rejects) == ["too_short", "unreadable"]
    # A rerun of a finished job does nothing; changed arguments are refused, naming what changed.
    messages = []
    again = preprocess(str(src), str(part), workers=0, log=messages.append, **RESUME_ARGS)
    assert "already complete" in messages[0] and again.num_kept == sum(1 for p in src.rglob("utt*.wav"))
    with pytest.raises(ValueError, match=r"seed: 5 then, 6 now"):
        preprocess(str(src), str(part), workers=0, **{**RESUME_ARGS, "seed": 6})


def test_manifest_inputs_carry_labels(tmp_path):
    audio = tmp_path / "corpus" / "audio"
    for i in range(4):
        write_audio(audio / f"x{i}.wav", tone(0.6, 22050, 1, 60 + i), 22050, "WAV", "PCM_16")
    write_audio(audio / "short.wav", tone(0.2, 16000, 1, 70), 16000, "WAV", "PCM_16")
    entries = [
        {"path": "audio/x0.wav", "id": "utt0", "language": "en", "speaker": "s1", "text": "hello there",
         "phonemes": "h @ l oU D e@", "emotion_proxy": {"arousal": 0.7}},
        {"path": str(audio / "x1.wav"), "language": "fr", "text": "ça va ʃ"},  # absolute path, id from the path
        {"path": "audio/x2.wav", "id": 17, "speaker": "s2"},
        {"path": "audio/x3.wav", "id": "utt0", "speaker": "s3"},  # repeated id
        {"path": "audio/gone.wav", "id": "gone"},
        {"path": "audio/short.wav", "id": "short"},
    ]
    manifest = tmp_path / "corpus" / "list.jsonl"
    manifest.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "m"
    summary = preprocess(str(manifest), str(out), workers=0, valid_fraction=0.0, min_seconds=0.5, progress=False)
    kept = {r["id"]: r for r in read_jsonl(Path(f"{out}_train.manifest.jsonl"))}
    assert read_jsonl(Path(f"{out}_valid.manifest.jsonl")) == [] and not glob.glob(f"{out}_valid_*")
    assert set(kept) == {"utt0", str(audio / "x1.wav"), "17"}
    assert kept["utt0"]["text"] == "hello there" and kept["utt0"]["phonemes"] == "h @ l oU D e@"
    assert kept["utt0"]["emotion_proxy"] == {"arousal": 0.7} and kept["utt0"]["speaker"] == "s1"
    assert kept[str(audio / "x1.wav")]["text"] == "ça va ʃ" and kept["17"]["speaker"] == "s2"
    assert kept["utt0"]["source"] == str(audio / "x0.wav") and kept["utt0"]["samples"] == 9600
    assert {r["id"]: r["reason"] for r in read_jsonl(Path(f"{out}.rejects.jsonl"))} == {
        "utt0": "duplicate_id", "gone": "missing", "short": "too_short"}
    assert summary.num_kept == 3

    # fairseq TSV: root line relative to the manifest's folder; .wrd/.phn sidecars become text/phonemes.
    tsv = tmp_path / "corpus" / "train.tsv"
    tsv.write_text("audio\nx0.wav\t13230\nx2.wav\t13230\n")
    (tmp_path / "corpus" / "train.wrd").write_text("HELLO THERE\nGOOD BYE\n")
    (tmp_path / "corpus" / "train.phn").write_text("h @ l oU\ng U d\n")
    out2 = tmp_path / "out" / "t"
    preprocess(str(tsv), str(out2), workers=0, valid_fraction=0.0, progress=False)
    recs = read_jsonl(Path(f"{out2}_train.manifest.jsonl"))
    assert [(r["id"], r["text"], r["phonemes"]) for r in recs] == [
        ("x0.wav", "HELLO THERE", "h @ l oU"), ("x2.wav", "GOOD BYE", "g U d")]

    # Malformed manifests are errors that name the file and line.
    bad = tmp_path / "corpus" / "bad.jsonl"
    bad.write_text('{"path": "audio/x0.wav"}\n{"path": "audio/x1.wav", "samples": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: key \"samples\" is written by the preprocessor"):
        preprocess(str(bad), str(tmp_path / "out" / "bad"), workers=0, progress=False)
    bad.write_text('{"path": "audio/x0.wav"}\n{"path": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        preprocess(str(bad), str(tmp_path / "out" / "bad"), workers=0, progress=False)
    (tmp_path / "corpus" / "train.wrd").write_text("ONLY ONE LINE\n")
    with pytest.raises(ValueError, match=r"train.wrd has 1 lines for the 2 audio lines"):
        preprocess(str(tsv), str(tmp_path / "out" / "bad"), workers=0, progress=False)


@pytest.mark.parametrize("fmt,subtype,ext", [("WAV", "PCM_16", "wav"), ("WAV", "PCM_24", "wav"),
                                             ("AIFF", "PCM_16", "aiff"), ("RF64", "PCM_16", "rf64"),
                                             ("W64", "PCM_16", "w64"), ("WAVEX", "FLOAT", "wav")])
def test_truncated_header_formats_are_rejected_not_kept_in_part(tmp_path, fmt, subtype, ext):
    whole = tmp_path / f"whole.{ext}"
    write_audio(whole, tone(1.0, 44100, 2, 7), 44100, fmt, subtype)
    assert isinstance(decode_file(str(whole), 0), Kept)
    data = whole.read_bytes()
    for frac in (0.3, 0.9):
        cut = tmp_path / f"cut{frac}.{ext}"
        cut.write_bytes(data[: int(len(data) * frac)])
        result = decode_file(str(cut), 0)
        assert isinstance(result, Rejected) and result.reason == "truncated", (frac, result)


def test_streamed_wav_with_unknown_size_is_not_truncated(tmp_path):
    path = tmp_path / "streamed.wav"
    write_audio(path, tone(0.5, 16000, 1, 8), 16000, "WAV", "PCM_16")
    data = bytearray(path.read_bytes())
    data[4:8] = b"\xff\xff\xff\xff"  # what ffmpeg writes to a pipe: RIFF and data sizes unknown
    i = data.find(b"data")
    data[i + 4: i + 8] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    result = decode_file(str(path), 0)
    assert isinstance(result, Kept) and len(result.samples) == 8000


def _crash_on_bomb(path: str, min_samples: int) -> Kept | Rejected:
    if path.endswith("bomb.wav"):
        os._exit(3)  # a decoder segfault, as far as the pool can tell
    return decode_file(path, min_samples)


def test_a_file_that_kills_its_worker_is_rejected_and_the_rest_kept(tmp_path):
    src = tmp_path / "in"
    for i in range(6):  # results above a pipe's 64 KB: the other worker is blocked writing when the pool breaks
        write_audio(src / f"u{i}.wav", tone(3.0, 8000, 1, 80 + i), 8000, "WAV", "PCM_16")
    write_audio(src / "u2bomb.wav", tone(0.5, 8000, 1, 90), 8000, "WAV", "PCM_16")
    out = tmp_path / "out" / "c"
    summary = preprocess(str(src), str(out), workers=2, valid_fraction=0.0, progress=False,
                         process_fn=_crash_on_bomb)
    assert summary.num_kept == 6 and summary.rejects == {"crashed": 1}
    assert [r["id"] for r in read_jsonl(Path(f"{out}_train.manifest.jsonl"))] == [f"u{i}.wav" for i in range(6)]


def _sigterm_at_third(path: str, min_samples: int) -> Kept | Rejected:
    if path.endswith("u03.wav"):
        os.kill(os.getpid(), signal.SIGTERM)  # as Slurm does at preemption; the run stops after this file
    return decode_file(path, min_samples)


def test_sigterm_saves_progress_and_a_rerun_finishes_identically(tmp_path):
    src = tmp_path / "in"
    for i in range(8):
        write_audio(src / f"u{i:02d}.wav", tone(0.6, 11025, 2, 100 + i), 11025, "WAV", "PCM_16")
    args = {"workers": 0, "valid_fraction": 0.3, "shard_size_gb": 0.00003, "progress": False}
    ref = tmp_path / "ref" / "c"
    preprocess(str(src), str(ref), **args)
    out = src / "out" / "c"  # inside the input folder: its own files must not become inputs on the rerun
    out.parent.mkdir()
    Path(f"{out}.preprocess.json.tmp").write_text("{")  # a crash while writing the very first journal
    with pytest.raises(PreprocessInterrupted, match="stopped by SIGTERM after file 4 of 8"):
        preprocess(str(src), str(out), process_fn=_sigterm_at_third, **args)
    summary = preprocess(str(src), str(out), **args)
    assert summary.resumed_at == 4 and summary.num_kept == 8
    for p in ref.parent.iterdir():
        assert output_bytes(p) == output_bytes(out.parent / p.name), p.name
