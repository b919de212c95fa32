"""Corpus importers of tools/preprocess_audio.py (megatron_speech/data/importers.py): CommonVoice, LibriSpeech, MLS,
header tables, and the layout detection in preprocess.list_inputs.

Each corpus is a miniature of the real layout in the corpus's own format (CommonVoice 48 kHz MP3, LibriSpeech
16 kHz FLAC, MLS's opus release), metadata files as the corpora write them; CommonVoice's and LibriSpeech's clips
speak their transcripts (espeak-ng, the demo corpus' engine), the others are generated tones.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from megatron_speech.preprocess import list_inputs, preprocess

CV_HEADER = ("client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
             "gender", "accents", "variant", "locale", "segment")


def _audio(path: Path, seed: int, rate: int = 16000, seconds: float = 0.8, fmt: str = "FLAC",
           subtype: str | None = None, text: str | None = None) -> None:
    """`text` spoken by espeak-ng (the demo corpus' engine) when given and installed, else a distinct tone plus
    faint noise (each seed its own, so no file is a duplicate of another); at `rate`, in `fmt`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if text and shutil.which("espeak-ng"):
        wav = path.with_suffix(".espeak.wav")
        subprocess.run(["espeak-ng", "-s", str(150 + 10 * (seed % 5)), "-w", str(wav), text], check=True)
        speech, native = sf.read(str(wav), dtype="float32")
        wav.unlink()
        sf.write(str(path), soxr.resample(speech, native, rate), rate, format=fmt, subtype=subtype)
        return
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * (150 + 41 * seed) * t) + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    sf.write(str(path), x.astype(np.float32), rate, format=fmt, subtype=subtype)


def _rows(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def _run(input_path: Path, prefix: Path) -> tuple[dict[str, dict], dict[str, str], dict]:
    """(kept rows by id, reject reasons by id, journal params) of a single-process run, everything in train."""
    preprocess(str(input_path), str(prefix), workers=0, valid_fraction=0.0, progress=False, log=lambda _: None)
    rejects = {r["id"]: r["reason"] for r in _rows(Path(f"{prefix}.rejects.jsonl")).values()}
    params = json.loads(Path(f"{prefix}.preprocess.json").read_text())["params"]
    return _rows(Path(f"{prefix}_train.manifest.jsonl")), rejects, params


def _commonvoice(lang_dir: Path) -> None:
    """cv-corpus-*/en: clips/*.mp3 (48 kHz), validated.tsv, other.tsv, times.txt."""
    def row(client, n, sentence, age="", gender="", accents=""):
        return [client, f"common_voice_en_{n}.mp3", f"s{n}", sentence, "", "2", "0", age, gender, accents, "", "en",
                ""]

    validated = [row("c0ffee", 1, 'He said "hi", then left.', "twenties", "male_masculine", "England English"),
                 row("c0ffee", 2, "It's a 'quoted' word."),
                 row("beef42", 3, "Third clip.", "forties", "female_feminine"),
                 row("beef42", 4, "This clip was never downloaded.")]
    other = [row("feed01", 5, "Not validated yet.")]
    lang_dir.mkdir(parents=True)
    for name, rows in (("validated.tsv", validated), ("other.tsv", other)):
        # CommonVoice's own writing: tab-separated, no quoting (the quotes above are text).
        lines = ["\t".join(CV_HEADER)] + ["\t".join(r) for r in rows]
        (lang_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (lang_dir / "times.txt").write_text("2024-03-15\n")
    sentences = {int(r[1].split("_")[-1][:-4]): r[3] for r in validated + other}
    for n in (1, 2, 3, 5):
        _audio(lang_dir / "clips" / f"common_voice_en_{n}.mp3", n, 48000, 1.0, "MP3", text=sentences[n])


def test_commonvoice_tsv_and_language_folder_carry_labels(tmp_path):
    en = tmp_path / "cv-corpus-17.0" / "en"
    _commonvoice(en)

    # The old failure: validated.tsv read as a fairseq TSV, its header line taken for the root folder and every
    # row rejected as missing. Now it is recognized by its header, and the clips are found in clips/.
    kind, items = list_inputs(str(en / "validated.tsv"))
    assert kind == "commonvoice"
    assert [(it.id, it.source, it.reject) for it in items] == [
        (f"common_voice_en_{n}", str(en / "clips" / f"common_voice_en_{n}.mp3"), None) for n in (1, 2, 3)] + [
        ("common_voice_en_4", str(en / "clips" / "common_voice_en_4.mp3"), ("missing", "no such file"))]

    kept, rejects, params = _run(en / "validated.tsv", tmp_path / "out" / "cv")
    assert params["input_kind"] == "commonvoice"
    assert rejects == {"common_voice_en_4": "missing"}
    assert set(kept) == {"common_voice_en_1", "common_voice_en_2", "common_voice_en_3"}
    first = kept["common_voice_en_1"]
    assert first["orig_sample_rate"] == 48000 and first["source"] == str(en / "clips" / "common_voice_en_1.mp3")
    labels = {k: v for k, v in first.items() if k not in ("shard", "index", "id", "source", "samples",
                                                            "orig_sample_rate", "orig_channels", "audio_hash",
                                                            "warnings")}
    assert labels == {"text": 'He said "hi", then left.', "speaker": "c0ffee", "language": "en",
                      "sentence_id": "s1", "up_votes": "2", "down_votes": "0", "age": "twenties",
                      "gender": "male_masculine", "accents": "England English"}
    assert kept["common_voice_en_2"]["text"] == "It's a 'quoted' word." and "gender" not in kept["common_voice_en_2"]

    # The language folder: validated.tsv's labels, every clip tried (the unvalidated one without labels, under its
    # clip id), the .tsv/.txt files neither tried as audio nor reported.
    kind, _ = list_inputs(str(en))
    assert kind == "commonvoice"
    kept, rejects, params = _run(en, tmp_path / "out" / "cvdir")
    assert params["input_kind"] == "commonvoice" and rejects == {"common_voice_en_4": "missing"}
    assert set(kept) == {"common_voice_en_1", "common_voice_en_2", "common_voice_en_3", "common_voice_en_5"}
    assert kept["common_voice_en_3"]["text"] == "Third clip." and kept["common_voice_en_3"]["gender"] == \
        "female_feminine"
    assert "text" not in kept["common_voice_en_5"] and "speaker" not in kept["common_voice_en_5"]


def test_librispeech_folder_labels_from_transcripts(tmp_path):
    root = tmp_path / "LibriSpeech"
    chapters = {("19", "198"): ["NORTHANGER ABBEY", "CHAPTER ONE"], ("26", "495"): ["NO ONE WHO HAD EVER SEEN"]}
    seed = 0
    for (spk, chap), texts in chapters.items():
        folder = root / "train-clean-100" / spk / chap
        lines = [f"{spk}-{chap}-{i:04d} {t}" for i, t in enumerate(texts)]
        for i in range(len(texts)):
            seed += 1
            _audio(folder / f"{spk}-{chap}-{i:04d}.flac", seed, text=texts[i].lower())
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    with open(root / "train-clean-100" / "19" / "198" / "19-198.trans.txt", "a") as f:
        f.write("19-198-0002 A LINE WHOSE AUDIO IS GONE\n")
    _audio(root / "train-clean-100" / "19" / "198" / "stray.wav", 50, fmt="WAV")
    for doc in ("SPEAKERS.TXT", "CHAPTERS.TXT", "README.TXT"):
        (root / doc).write_text(";ID |SEX| SUBSET\n")

    kept, rejects, params = _run(root, tmp_path / "out" / "ls")
    assert params["input_kind"] == "librispeech"
    assert rejects == {"19-198-0002": "missing"}  # no transcript or .TXT file tried as audio
    assert set(kept) == {"19-198-0000", "19-198-0001", "26-495-0000", "train-clean-100/19/198/stray.wav"}
    assert {k: kept["19-198-0001"][k] for k in ("text", "speaker", "chapter", "language")} == {
        "text": "CHAPTER ONE", "speaker": "19", "chapter": "198", "language": "en"}
    assert kept["26-495-0000"]["text"] == "NO ONE WHO HAD EVER SEEN" and kept["26-495-0000"]["speaker"] == "26"
    assert "text" not in kept["train-clean-100/19/198/stray.wav"]  # stray audio: tried, kept, unlabeled

    # A chapter folder given alone is the same layout (the chapter and speaker folders are part of the input).
    kind, items = list_inputs(str(root / "train-clean-100" / "26"))
    assert kind == "librispeech" and [it.id for it in items] == ["26-495-0000"]
    (root / "train-clean-100" / "26" / "495" / "26-495.trans.txt").write_text("26-495-0000 OK\n26-999-0001 BAD\n")
    with pytest.raises(ValueError, match=r"26-495.trans.txt:2: '26-999-0001' not 26-495-NNNN TEXT"):
        list_inputs(str(root))


def test_mls_split_folders_with_language_from_the_folder_name(tmp_path):
    lang = tmp_path / "mls_german_opus"
    utts = {"train": {"1844_1523_000001": "es war einmal", "1844_1523_000002": "ein könig"},
            "dev": {"3442_1140_000000": "guten tag"}}
    for n, (split, texts) in enumerate(utts.items()):
        (lang / split).mkdir(parents=True)
        (lang / split / "transcripts.txt").write_text("".join(f"{k}\t{t}\n" for k, t in texts.items()),
                                                      encoding="utf-8")
        (lang / split / "segments.txt").write_text("".join(f"{k}\thttp://x.mp3\t0.0\t1.0\n" for k in texts))
        for i, key in enumerate(texts):
            spk, book, _ = key.split("_")
            _audio(lang / split / "audio" / spk / book / f"{key}.opus", 10 * n + i, 48000, 0.8, "OGG", "OPUS")
    (lang / "metainfo.txt").write_text("SPEAKER | GENDER | PARTITION | MINUTES | BOOK ID | TITLE | CHAPTER\n")

    kept, rejects, params = _run(lang, tmp_path / "out" / "mls")
    assert params["input_kind"] == "mls" and rejects == {}
    assert set(kept) == {"1844_1523_000001", "1844_1523_000002", "3442_1140_000000"}
    assert {k: kept["1844_1523_000002"][k] for k in ("text", "speaker", "book", "language")} == {
        "text": "ein könig", "speaker": "1844", "book": "1523", "language": "de"}

    # Under a folder whose name does not say the language: no language label rather than a guess.
    moved = tmp_path / "corpora" / "german"
    moved.parent.mkdir()
    (lang / "train").rename(moved)
    kind, items = list_inputs(str(moved))
    assert kind == "mls" and [(it.id, it.labels.get("language")) for it in items] == [
        ("1844_1523_000001", None), ("1844_1523_000002", None)]
    # A transcripts.txt next to audio/ that is not MLS's leaves a plain folder (every file tried, as before).
    (moved / "transcripts.txt").write_text("my notes about this folder\n")
    kind, items = list_inputs(str(moved))
    assert kind == "directory" and "transcripts.txt" in [it.id for it in items]


def test_generic_csv_and_tsv_tables(tmp_path):
    corpus = tmp_path / "corpus"
    for i in range(3):
        _audio(corpus / "wavs" / f"a{i}.wav", 30 + i, fmt="WAV")
    csv_path = corpus / "metadata.csv"  # Hugging Face audiofolder style, quoted fields, an absolute path
    # The first alias present of each canonical label takes its name (Sentence -> text); a later one keeps its own.
    csv_path.write_text('\ufefffile_name,Sentence,Lang,speaker_id,transcript,notes\n'
                        'wavs/a0.wav,"Hello, ""world""",en,s1,raw text,\n'
                        f'{corpus / "wavs" / "a1.wav"},bonjour,fr,s2,,fine\n', encoding="utf-8")
    kind, items = list_inputs(str(csv_path))
    assert kind == "table"
    assert [(it.id, it.source, it.labels) for it in items] == [
        ("wavs/a0.wav", str(corpus / "wavs" / "a0.wav"),
         {"text": 'Hello, "world"', "language": "en", "speaker": "s1", "transcript": "raw text"}),
        (str(corpus / "wavs" / "a1.wav"), str(corpus / "wavs" / "a1.wav"),
         {"text": "bonjour", "language": "fr", "speaker": "s2", "notes": "fine"})]

    tsv_path = corpus / "list.tsv"  # tab-separated: no quoting, an id column names the utterance
    tsv_path.write_text('id\taudio\ttext\n'
                        'u2\twavs/a2.wav\t"quoted" as is\n')
    kept, rejects, params = _run(tsv_path, tmp_path / "out" / "tsv")
    assert params["input_kind"] == "table" and rejects == {}
    assert kept["u2"]["text"] == '"quoted" as is' and kept["u2"]["source"] == str(corpus / "wavs" / "a2.wav")

    tsv_path.write_text("audio\ttext\nwavs/a2.wav\tone\ttwo\n")
    with pytest.raises(ValueError, match=r"list.tsv:2: 3 fields for the 2 columns of the header"):
        list_inputs(str(tsv_path))
    tsv_path.write_text("path\tsamples\nwavs/a2.wav\t3\n")
    with pytest.raises(ValueError, match=r'list.tsv:1: column "samples" is written by the preprocessor'):
        list_inputs(str(tsv_path))


def test_layouts_are_told_apart_by_content_or_refused_clearly(tmp_path):
    (tmp_path / "audio").mkdir()
    _audio(tmp_path / "audio" / "x.wav", 3, fmt="WAV")
    # fairseq: line 1 an existing folder, line 2 relpath<TAB>frames, even though "audio" is also a path column name.
    fairseq = tmp_path / "train.tsv"
    fairseq.write_text("audio\nx.wav\t12800\n")
    assert list_inputs(str(fairseq))[0] == "tsv"
    # A one-column table headed "audio" (its rows have no frame count) is a table, its paths relative to its folder.
    single = tmp_path / "single.tsv"
    single.write_text("audio\naudio/x.wav\n")
    kind, items = list_inputs(str(single))
    assert kind == "table" and items[0].source == str(tmp_path / "audio" / "x.wav") and items[0].reject is None
    # fairseq-shaped but its root is gone: the error names the root line rather than rejecting every file.
    gone = tmp_path / "gone.tsv"
    gone.write_text("/no/such/root\nx.wav\t12800\n")
    with pytest.raises(ValueError, match=r"gone.tsv:1: a fairseq TSV manifest .* root folder '/no/such/root'"):
        list_inputs(str(gone))
    # Neither: the error names the file, its first line and the accepted layouts.
    notes = tmp_path / "notes.tsv"
    notes.write_text("speaker\tsentence\nalice\thello\n")
    with pytest.raises(ValueError, match=r"notes.tsv'?: cannot tell its layout from its first line "
                                         r"'speaker\\tsentence'. Accepted: a JSONL file .* fairseq TSV .* "
                                         r"header names the audio column \(one of path, .*LibriSpeech"):
        list_inputs(str(notes))
