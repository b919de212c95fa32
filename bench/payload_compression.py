"""FLAC payloads instead of int16 in the shards? Bytes per audio-hour, and what decoding costs a loader worker.

    python bench/payload_compression.py                      # ~1.5 min (one core)
    python bench/payload_compression.py --quick              # a few seconds (tests/e2e/test_bench.py runs it)
    python bench/payload_compression.py --audio-dir DIR      # also the ratio over your own audio files
    python bench/payload_compression.py --json out.json      # the figures as JSON as well

Self-contained and offline: it generates its audio in a temp folder (espeak-ng, flite and sox, the demo corpus's
tools; Asterisk's recorded prompts and music on hold when installed) and prints two tables.

1. Size: utterances of 5-20 s per kind of audio, each encoded alone as FLAC (soundfile/libsndfile, 16 kHz mono,
   PCM_16, header included: what one uint8 IndexedDataset sequence per utterance would hold) at FLAC levels 0, 5
   (libsndfile's default) and 8; MB per audio-hour and the ratio to int16 (115.2 MB/h). Kinds: "tts" = espeak-ng and
   flite speech with the demo corpus's -80 dBFS floor (synthetic speech compresses unusually well); "tts+pink" /
   "tts+white" = the same under sox pink / white noise at 10-20 dB SNR (real-world-like; white is the pessimistic
   end); "music" = sox-synthesized plucked chords with reverb; "asterisk-speech" / "asterisk-music" = real
   recordings (Asterisk prompts, music on hold), 8 kHz upsampled: their empty upper band flatters FLAC.
2. Loader cost per utterance, one process on one core (CPU seconds; OMP_NUM_THREADS=1), on "tts+pink" utterances
   of each length in --lengths, crop = min(--crop, what speed perturbation up to 1.1 leaves), as audio-seconds
   delivered per CPU-second:
     int16       what the loader does now: np.frombuffer over the mmap'd .bin (megatron-core's _MMapBinReader)
                 of a random crop, float32 / 32768, normalize (augment.normalize)
     flac_full   the utterance's FLAC bytes from a mmap'd uint8 .bin, soundfile.read(BytesIO) of all of it,
                 then the same crop, conversion and normalization
     flac_seek   the same bytes, SoundFile(BytesIO).seek(offset).read(count): decodes only from the FLAC frame
                 holding the offset (4,096 samples at levels 3-8)
     decode xRT  full decode alone, in x real time
     aug_int16 / aug_flac   the whole per-utterance work of a pre-training worker: augment.Augmenter with speed
                 perturbation [0.9, 1.0, 1.1] (soxr) and MUSAN-style noise (p = 0.5; noise, music, 3-7-talker
                 babble at the recipe's SNRs; generated clips), reading int16 vs FLAC-by-seek, on the same draws
     flac +%     how much FLAC (seek) adds to that augmented per-utterance time
   Both payloads are in the page cache: what is compared is CPU, not disk (FLAC reads fewer bytes from a cold disk).
   The per-batch work (masks, distractors, the transfer to the training process) is the same for both and left out.

Compare a worker's rate with one GPU's consumption (docs/performance.md section 2, XL at 45% MFU: ~1,176 audio-s/s
on an A100, ~3,727 on an H100/H200); a rank runs --workers (4 by default) such workers.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tools/ and bench/ are its packages

from megatron_speech.common.audio import SAMPLE_RATE  # noqa: E402
from megatron_speech.data.augment import SPEED_MARGIN, Augmenter, list_noise_files  # noqa: E402
from tools.demo_corpus import ESPEAK_VOICES, FLITE_VOICES, LEXICON, NOISE_FLOOR_RMS, VARIANTS  # noqa: E402

SR = SAMPLE_RATE
INT16_MB_PER_HOUR = 2 * SR * 3600 / 1e6  # 115.2
GPU_AUDIO_S_PER_S = {"A100": 1176.0, "H100": 3727.0}  # docs/performance.md section 2: XL, 15 s crops, 45% MFU
SPEEDS = (0.9, 1.0, 1.1)
ASTERISK = Path("/usr/share/asterisk")
TOOLS = ("espeak-ng", "flite", "sox")


# ---- audio ----------------------------------------------------------------------------------------------------

def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed: {proc.stderr.decode(errors='replace')[-300:]}")


def _read_16k(path: str) -> np.ndarray:
    """float32 mono at 16 kHz (soxr "HQ", as preprocessing)."""
    x, rate = sf.read(path, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    return x if rate == SR else soxr.resample(x, rate, SR, quality="HQ").astype(np.float32)


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def tts_clips(tmp: str, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` synthesized sentences (espeak-ng voices of every demo language and variant, flite voices)."""
    clips = []
    for i in range(count):
        lang = list(ESPEAK_VOICES)[i % len(ESPEAK_VOICES)]
        words = " ".join(part[int(rng.integers(len(part)))] for part in LEXICON[lang])
        wav = os.path.join(tmp, "tts.wav")
        if i % 3 == 2:
            _run(["flite", "-voice", FLITE_VOICES[i % len(FLITE_VOICES)], "-t", words, "-o", wav])
        else:
            voice = f"{ESPEAK_VOICES[lang]}+{VARIANTS[int(rng.integers(len(VARIANTS)))]}"
            pitch, rate = int(rng.integers(35, 66)), int(rng.integers(140, 201))
            _run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(rate), "-w", wav, words])
        clips.append(_read_16k(wav))
    return clips


def speech_stream(clips: list[np.ndarray], seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Continuous speech: sentences in random order, 0.1-0.5 s apart, random gain -6..0 dB, demo corpus floor."""
    n = int(seconds * SR)
    parts, total = [], 0
    while total < n:
        clip = clips[int(rng.integers(len(clips)))] * np.float32(10 ** (rng.uniform(-6, 0) / 20))
        gap = np.zeros(int(rng.uniform(0.1, 0.5) * SR), np.float32)
        parts += [clip, gap]
        total += len(clip) + len(gap)
    x = np.concatenate(parts)[:n]
    return x + np.float32(NOISE_FLOOR_RMS) * rng.standard_normal(n).astype(np.float32)


def sox_noise(tmp: str, color: str, seconds: float, seed: int) -> np.ndarray:
    wav = os.path.join(tmp, f"{color}.wav")
    _run(["sox", "-R", "-n", "-r", str(SR), "-b", "16", "-c", "1", wav, "synth", f"{seconds:.2f}", f"{color}noise"])
    x = sf.read(wav, dtype="float32")[0]
    return np.roll(x, seed * 7919)  # -R repeats the same noise; move it per call


def sox_music(tmp: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Plucked three-note chords over a sine bass, with reverb (sox synth), 0.4-1.2 s each."""
    notes = ["C", "D", "E", "G", "A"]
    parts, total = [], 0.0
    while total < seconds:
        dur = float(rng.uniform(0.4, 1.2))
        octave = int(rng.integers(3, 5))
        chord = [f"{notes[int(rng.integers(5))]}{octave + k // 2}" for k in range(3)]
        wav = os.path.join(tmp, "chord.wav")
        _run(["sox", "-R", "-n", "-r", str(SR), "-b", "16", "-c", "4", wav, "synth", f"{dur:.3f}",
              *[a for note in chord for a in ("pluck", note)], "sine", f"{notes[int(rng.integers(5))]}2",
              "reverb", "40", "gain", "-n", f"{rng.uniform(-12, -3):.1f}"])
        parts.append(sf.read(wav, dtype="float32", always_2d=True)[0].mean(axis=1))  # the four voices mixed
        total += dur
    return np.concatenate(parts)[:int(seconds * SR)]


def asterisk_stream(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray | None:
    """Real recordings (8 kHz, upsampled): English prompts one after another, or a stretch of music on hold."""
    if kind == "speech":
        files = sorted((ASTERISK / "sounds" / "en").rglob("*.wav"))
    else:
        files = sorted((ASTERISK / "moh").glob("*.wav"))
    if not files:
        return None
    n = int(seconds * SR)
    parts, total = [], 0
    while total < n:
        x = _read_16k(str(files[int(rng.integers(len(files)))]))
        if kind == "music" and len(x) > n:
            start = int(rng.integers(0, len(x) - n))
            x = x[start:start + n]
        parts.append(x)
        total += len(x)
    return np.concatenate(parts)[:n]


def at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    p_s, p_n = float(np.mean(speech.astype(np.float64) ** 2)), float(np.mean(noise.astype(np.float64) ** 2))
    return speech + noise[:len(speech)] * np.float32(np.sqrt(p_s / (p_n * 10 ** (snr_db / 10))))


def make_utterances(tmp: str, kinds: list[str], lengths: list[float], clips: list[np.ndarray],
                    rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """int16 utterances per kind, one per entry of `lengths` (seconds); kinds whose source is missing are left out."""
    out: dict[str, list[np.ndarray]] = {}
    for kind in kinds:
        utts = []
        for i, seconds in enumerate(lengths):
            if kind == "tts":
                x = speech_stream(clips, seconds, rng)
            elif kind in ("tts+pink", "tts+white"):
                x = at_snr(speech_stream(clips, seconds, rng), sox_noise(tmp, kind[4:], seconds + 1, i),
                           float(rng.uniform(10, 20)))
            elif kind == "music":
                x = sox_music(tmp, seconds, rng)
            elif kind.startswith("asterisk-"):
                x = asterisk_stream(kind.split("-")[1], seconds, rng)
                if x is None:
                    break
            else:
                raise ValueError(f"unknown kind {kind!r}")
            utts.append(_to_int16(x))
        if utts:
            out[kind] = utts
    return out


def audio_dir_utterances(folder: str, max_files: int) -> list[np.ndarray]:
    """Files of a folder as preprocessing would store them (mono, 16 kHz, int16), at most max_files."""
    from megatron_speech.preprocess import Kept, decode_file

    utts = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        kept = decode_file(str(path), 1)
        if isinstance(kept, Kept):
            utts.append(kept.samples)
            if len(utts) >= max_files:
                break
    return utts


# ---- size -----------------------------------------------------------------------------------------------------

def flac_bytes(x: np.ndarray, level: int | None = None) -> bytes:
    """One utterance as a FLAC stream; level = FLAC's 0-8 (None = libsndfile's default, 5)."""
    buf = io.BytesIO()
    sf.write(buf, x, SR, format="FLAC", subtype="PCM_16", compression_level=None if level is None else level / 8)
    return buf.getvalue()


def measure_sizes(utts: list[np.ndarray], levels: list[int]) -> dict:
    seconds = sum(len(u) for u in utts) / SR
    row = {"utterances": len(utts), "audio_s": round(seconds, 1)}
    for level in levels:
        cpu = time.process_time()
        size = sum(len(flac_bytes(u, level)) for u in utts)
        cpu = time.process_time() - cpu
        mb_h = size / 1e6 / (seconds / 3600)
        row[f"L{level}"] = {"mb_per_hour": round(mb_h, 1), "ratio": round(mb_h / INT16_MB_PER_HOUR, 3),
                            "encode_x_rt": round(seconds / max(cpu, 1e-9))}
    return row


# ---- loader cost ----------------------------------------------------------------------------------------------

class Shards:
    """Two .bin files as megatron-core mmaps them: int16 samples, and the same utterances' FLAC bytes (uint8)."""

    def __init__(self, folder: str, utts: list[np.ndarray], level: int | None) -> None:
        self.lengths = [len(u) for u in utts]
        payloads = [flac_bytes(u, level) for u in utts]
        self.sizes = [len(p) for p in payloads]
        self.pcm_ptr = np.concatenate([[0], np.cumsum([2 * n for n in self.lengths])])
        self.flac_ptr = np.concatenate([[0], np.cumsum(self.sizes)])
        pcm, flac = os.path.join(folder, "pcm.bin"), os.path.join(folder, "flac.bin")
        with open(pcm, "wb") as f:
            for u in utts:
                f.write(u.astype("<i2").tobytes())
        with open(flac, "wb") as f:
            for p in payloads:
                f.write(p)
        # as megatron.core.datasets.indexed_dataset._MMapBinReader
        self._files = [open(pcm, "rb"), open(flac, "rb")]
        self._pcm = memoryview(np.memmap(self._files[0], mode="r", order="C").data)
        self._flac = memoryview(np.memmap(self._files[1], mode="r", order="C").data)

    def read_int16(self, i: int, offset: int, count: int) -> np.ndarray:
        return np.frombuffer(self._pcm, dtype=np.int16, count=count, offset=int(self.pcm_ptr[i]) + 2 * offset)

    def payload(self, i: int) -> np.ndarray:
        return np.frombuffer(self._flac, dtype=np.uint8, count=self.sizes[i], offset=int(self.flac_ptr[i]))

    def read_flac_full(self, i: int, offset: int, count: int) -> np.ndarray:
        audio = sf.read(io.BytesIO(self.payload(i)), dtype="int16")[0]
        return audio[offset:offset + count]

    def read_flac_seek(self, i: int, offset: int, count: int) -> np.ndarray:
        with sf.SoundFile(io.BytesIO(self.payload(i))) as f:
            f.seek(offset)
            return f.read(count, dtype="int16")

    def close(self) -> None:
        self._pcm = self._flac = None
        for f in self._files:
            f.close()


def measure_loader(shards: Shards, augmented: Augmenter, crop_s: float, min_time: float, seed: int) -> dict:
    """Per-utterance CPU cost of each read path on the shards' utterances (all of one length).

    Paired and interleaved: each draw picks an utterance and a random key, and every case runs on that draw in turn
    with a generator made from the key (the same crop, speed and noise for int16 and FLAC), so the load of other
    processes falls on all cases alike. One warm-up draw is not counted; then draws until each case has had about
    min_time CPU seconds on average."""
    length = min(shards.lengths)
    num_samples = min(int(crop_s * SR), int((length - SPEED_MARGIN) / max(SPEEDS)))  # the loader's crop rule
    plain = Augmenter(normalize_eps=1e-5)  # crop + normalization only

    def decode(i: int, key: int) -> None:
        sf.read(io.BytesIO(shards.payload(i)), dtype="int16")

    def case(augmenter: Augmenter, read):
        def run(i: int, key: int) -> None:
            augmenter(lambda o, c: read(i, o, c), shards.lengths[i], num_samples, np.random.default_rng(key))
        return run

    cases = {"int16": case(plain, shards.read_int16), "flac_full": case(plain, shards.read_flac_full),
             "flac_seek": case(plain, shards.read_flac_seek), "decode": decode,
             "aug_int16": case(augmented, shards.read_int16), "aug_flac": case(augmented, shards.read_flac_seek)}
    cpu = dict.fromkeys(cases, 0.0)
    rng = np.random.default_rng(seed)
    draws = -1  # the first draw warms up
    while draws < 3 or sum(cpu.values()) < min_time * len(cases):
        i, key = int(rng.integers(len(shards.lengths))), int(rng.integers(2**63))
        for name, fn in cases.items():
            start = time.process_time()
            fn(i, key)
            if draws >= 0:
                cpu[name] += time.process_time() - start
        draws += 1
    t = {name: total / draws for name, total in cpu.items()}
    crop = num_samples / SR
    return {"utterance_s": round(length / SR, 2), "crop_s": round(crop, 3), "draws": draws,
            "audio_s_per_cpu_s": {k: round(crop / v) for k, v in t.items() if k != "decode"},
            "decode_x_rt": round(length / SR / t["decode"]),
            "ms_per_utterance": {k: round(1e3 * v, 3) for k, v in t.items()},
            "flac_adds_pct": round(100 * (t["aug_flac"] - t["aug_int16"]) / t["aug_int16"], 1)}


class MemoryNoise:
    """data/noise.py's NoiseBank interface (kinds, count, audio -> int16 clip) over clips in memory; the real one
    returns views into page-cached shards, the same cost per draw."""

    def __init__(self, clips: dict[str, list[np.ndarray]]) -> None:
        self.clips = clips
        self.kinds = list(clips)

    def count(self, kind: str) -> int:
        return len(self.clips[kind])

    def audio(self, kind: str, k: int) -> np.ndarray:
        return self.clips[kind][k]


def noise_clips(tmp: str, clips: list[np.ndarray], rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """MUSAN-like int16 clips per noise kind: sox white/pink/brown noise at -35..-15 dBFS, sox music, and 7 single
    talkers (the babble source)."""
    noise = []
    for color in ("white", "pink", "brown"):
        x = sox_noise(tmp, color, 12.0, 0)
        noise.append(x * np.float32(10 ** (rng.uniform(-35, -15) / 20) / np.sqrt(np.mean(x.astype(np.float64) ** 2))))
    return {"noise": [_to_int16(x) for x in noise], "music": [_to_int16(sox_music(tmp, 12.0, rng))],
            "babble": [_to_int16(speech_stream(clips, 8.0, rng)) for _ in range(7)]}


def recipe_augmenter(clips: dict[str, list[np.ndarray]], folder: str) -> Augmenter:
    """The pre-training recipe's Augmenter (speed 0.9/1.0/1.1, noise p = 0.5 at DataConfig's SNRs) with these clips,
    whichever noise interface the Augmenter has: a NoiseBank (`noise`) or MUSAN files (`noise_files`)."""
    if "noise" in inspect.signature(Augmenter.__init__).parameters:
        noise = MemoryNoise(clips)
    else:  # files in a MUSAN folder, decoded once per process on first use
        for kind, kind_clips in clips.items():
            sub = Path(folder) / ("speech" if kind == "babble" else kind)
            sub.mkdir(parents=True)
            for k, x in enumerate(kind_clips):
                sf.write(sub / f"{k}.wav", x, SR, subtype="PCM_16")
        noise = list_noise_files(folder, list(clips))
    return Augmenter(SPEEDS, noise, 0.5, (0.0, 15.0), (5.0, 15.0), (13.0, 20.0), (3, 7), normalize_eps=1e-5)


# ---- report ---------------------------------------------------------------------------------------------------

def format_tables(sizes: dict, loader: list[dict], levels: list[int], workers: int) -> str:
    lines = [f"FLAC size per audio-hour (int16 = {INT16_MB_PER_HOUR:.1f} MB/h; ratio = FLAC / int16)",
             f"{'kind':<16} {'audio s':>8} " + " ".join(f"{f'L{lv} MB/h':>9} {f'L{lv} ratio':>9}" for lv in levels)
             + f" {'L' + str(levels[-1]) + ' enc xRT':>11}"]
    for kind, row in sizes.items():
        lines.append(f"{kind:<16} {row['audio_s']:>8.0f} "
                     + " ".join(f"{row[f'L{lv}']['mb_per_hour']:>9.1f} {row[f'L{lv}']['ratio']:>9.3f}"
                                for lv in levels) + f" {row[f'L{levels[-1]}']['encode_x_rt']:>11}")
    if loader:
        lines += ["", "Loader, one process, one core: audio-seconds delivered per CPU-second (tts+pink; FLAC level 5)",
                  f"{'utt s':>6} {'crop s':>7} {'int16':>8} {'flac_full':>10} {'flac_seek':>10} {'decode xRT':>11} "
                  f"{'aug_int16':>10} {'aug_flac':>9} {'flac +%':>8}"]
        for r in loader:
            a = r["audio_s_per_cpu_s"]
            lines.append(f"{r['utterance_s']:>6.1f} {r['crop_s']:>7.2f} {a['int16']:>8} {a['flac_full']:>10} "
                         f"{a['flac_seek']:>10} {r['decode_x_rt']:>11} {a['aug_int16']:>10} {a['aug_flac']:>9} "
                         f"{r['flac_adds_pct']:>8.1f}")
        for name, key in (("int16", "aug_int16"), ("FLAC (seek)", "aug_flac")):
            rates = [r["audio_s_per_cpu_s"][key] for r in loader]
            lines.append(f"one augmenting worker, {name}: {min(rates):,}-{max(rates):,} audio-s/s = "
                         + ", ".join(f"{min(rates) / need:.1f}-{max(rates) / need:.1f}x one {gpu}"
                                     for gpu, need in GPU_AUDIO_S_PER_S.items()))
        lines.append("one GPU consumes (XL, 45% MFU, docs/performance.md section 2): "
                     + ", ".join(f"{gpu} ~{need:,.0f} audio-s/s" for gpu, need in GPU_AUDIO_S_PER_S.items())
                     + f"; a rank's {workers} workers share one GPU's need")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny counts and timings)")
    p.add_argument("--kinds", nargs="+", default=["tts", "tts+pink", "tts+white", "music", "asterisk-speech",
                                                   "asterisk-music"], help="kinds of audio for the size table")
    p.add_argument("--utterances", type=int, default=12, help="utterances of 5-20 s per kind (size table)")
    p.add_argument("--levels", type=int, nargs="+", default=[0, 5, 8], help="FLAC compression levels 0-8")
    p.add_argument("--lengths", type=float, nargs="+", default=[5, 10, 15, 20, 30],
                   help="utterance lengths in seconds (loader table)")
    p.add_argument("--per-length", type=int, default=4, help="distinct utterances per length (loader table)")
    p.add_argument("--crop", type=float, default=15.625, help="longest crop, seconds (data.max_sample_seconds)")
    p.add_argument("--min-time", type=float, default=2.0, help="CPU seconds per timed case and length")
    p.add_argument("--workers", type=int, default=4, help="loader workers per rank, for the per-worker need")
    p.add_argument("--no-loader", action="store_true", help="sizes only")
    p.add_argument("--audio-dir", default="", help="also size these audio files (decoded as preprocessing does)")
    p.add_argument("--max-files", type=int, default=200, help="at most this many files of --audio-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the figures here as well")
    args = p.parse_args(argv)
    if args.quick:
        args.utterances, args.lengths, args.per_length, args.min_time = 2, [5, 20], 2, 0.02
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"error: {', '.join(missing)} not installed (apt-get install espeak-ng flite sox)", file=sys.stderr)
        return 1

    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="payload_compression_") as tmp:
        clips = tts_clips(tmp, 8 if args.quick else 40, rng)
        lengths = [float(s) for s in rng.uniform(5, 20, size=args.utterances)]
        utts = make_utterances(tmp, args.kinds, lengths, clips, rng)
        if args.audio_dir:
            utts["audio-dir"] = audio_dir_utterances(args.audio_dir, args.max_files)
            if not utts["audio-dir"]:
                print(f"error: --audio-dir {args.audio_dir}: no file there decodes as audio", file=sys.stderr)
                return 1
        sizes = {kind: measure_sizes(u, args.levels) for kind, u in utts.items() if u}
        loader = []
        if not args.no_loader:
            augmented = recipe_augmenter(noise_clips(tmp, clips, rng), os.path.join(tmp, "musan"))
            for length in args.lengths:
                shard_dir = tempfile.mkdtemp(dir=tmp)
                shards = Shards(shard_dir, make_utterances(tmp, ["tts+pink"], [length] * args.per_length, clips,
                                                           rng)["tts+pink"], level=None)
                try:
                    loader.append(measure_loader(shards, augmented, args.crop, args.min_time, args.seed))
                finally:
                    shards.close()
    print(format_tables(sizes, loader, args.levels, args.workers))
    print(f"({time.perf_counter() - start:.1f} s wall; CPU times, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    if args.json:
        Path(args.json).write_text(json.dumps({"int16_mb_per_hour": INT16_MB_PER_HOUR, "sizes": sizes,
                                               "loader": loader, "gpu_audio_s_per_s": GPU_AUDIO_S_PER_S,
                                               "workers": args.workers}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
