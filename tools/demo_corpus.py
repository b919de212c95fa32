"""The embedded demo corpus: offline speech synthesized with espeak-ng and flite, plus real recorded Asterisk
prompts and music when those Debian packages are installed (docs/design.md §8).

Layout under the output directory (every manifest "path" is relative to the directory of its manifest):

    README.md                                    what is inside, how it was made, sizes, credits and licences
    pretrain/manifest.jsonl                      unlabeled, multilingual: path id language speaker source_engine ...
    phonemes/{train,valid,test}.jsonl            + phonemes text voice; held-out sentences AND held-out voices
    speaker/{train,valid,test}.jsonl             speaker identification, split per utterance
    arousal_proxy/{train,valid,test}.jsonl       prosody-style label low/neutral/high made from pitch/rate/amplitude
    <set>/audio/<language>/<id>.<wav|flac|ogg|mp3>
    musan/{noise,music,speech}/*.wav             MUSAN layout: sox noise + babble, music on hold, single talkers

Sample rates, formats and channel counts are mixed on purpose (22.05 kHz espeak-ng, 16 kHz flite, 8 kHz
Asterisk, some resampled to 44.1/48 kHz, some flac/ogg/mp3, some stereo) so the preprocessing path is exercised.
Everything is deterministic for a seed: all random choices are made in the parent while planning, and each job
carries its own noise seed, so the output does not depend on the number of worker processes. What this code writes
(manifests, README, wav/flac, MUSAN) is byte-identical; the ogg and mp3 files come from third-party lossy
encoders (libvorbis through `sox -R`, LAME through libsndfile) fed byte-identical PCM, which decode to the same
audio but whose bytes are not promised (tests/unit/test_demo_corpus.py checks exactly that).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
import xml.sax.saxutils
import zlib
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# Executable -> Debian package. All three are needed; nothing else is downloaded.
REQUIRED_TOOLS = {"espeak-ng": "espeak-ng", "flite": "flite", "sox": "sox"}
INSTALL_HINT = "apt-get install espeak-ng flite sox"
ASTERISK_SOUNDS_DIR = Path("/usr/share/asterisk/sounds")
ASTERISK_MOH_DIR = Path("/usr/share/asterisk/moh")
ASTERISK_TRANSCRIPT = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
ASTERISK_PACKAGES = "asterisk-core-sounds-en-wav asterisk-core-sounds-ru-wav asterisk-core-sounds-it-wav"

LABELED_SETS = ("phonemes", "speaker", "arousal_proxy")
SPLITS = ("train", "valid", "test")
OWNED_PATHS = ("README.md", "pretrain", *LABELED_SETS, "musan")  # removed before a rebuild, nothing else is

# ISO 639-1 language -> espeak-ng voice (the accent fixes the phonemes; the variant does not).
ESPEAK_VOICES = {"en": "en-us", "es": "es", "fr": "fr-fr", "it": "it", "ru": "ru", "de": "de", "pt": "pt-br",
                 "nl": "nl"}
MALE_VARIANTS = tuple(f"m{i}" for i in range(1, 9))
FEMALE_VARIANTS = tuple(f"f{i}" for i in range(1, 6))
VARIANTS = MALE_VARIANTS + FEMALE_VARIANTS
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
AROUSAL_LANGUAGES = ("en", "es", "de")

NOISE_FLOOR_RMS = 1e-4  # -80 dBFS: espeak-ng/flite leave exact digital zeros between words (docs/design.md §8)
MUSAN_RATE = 16000

# Sentences are subject + verb + object + adverbial, drawn without replacement (8**4 = 4096 per language).
# Agreement is not always perfect; it only has to be pronounceable.
LEXICON: dict[str, tuple[tuple[str, ...], ...]] = {
    "en": (("The old man", "My sister", "A young doctor", "The teacher", "Our neighbour", "The little girl",
            "A tired farmer", "His brother"),
           ("reads", "buys", "paints", "finds", "carries", "sells", "cleans", "watches"),
           ("a red book", "the green bicycle", "an old letter", "the small boat", "a warm coat", "the heavy box",
            "some fresh bread", "the silver key"),
           ("every morning", "near the river", "after dinner", "in the garden", "before the storm", "on Sunday",
            "with great care", "at the station")),
    "es": (("El viejo", "Mi hermana", "Un médico joven", "La maestra", "Nuestro vecino", "La niña",
            "Un campesino cansado", "Su hermano"),
           ("lee", "compra", "pinta", "encuentra", "lleva", "vende", "limpia", "mira"),
           ("un libro rojo", "la bicicleta verde", "una carta antigua", "el barco pequeño", "un abrigo caliente",
            "la caja pesada", "el pan fresco", "la llave de plata"),
           ("cada mañana", "cerca del río", "después de la cena", "en el jardín", "antes de la tormenta",
            "el domingo", "con mucho cuidado", "en la estación")),
    "fr": (("Le vieil homme", "Ma sœur", "Un jeune médecin", "La maîtresse", "Notre voisin", "La petite fille",
            "Un paysan fatigué", "Son frère"),
           ("lit", "achète", "peint", "trouve", "porte", "vend", "nettoie", "regarde"),
           ("un livre rouge", "la bicyclette verte", "une vieille lettre", "le petit bateau", "un manteau chaud",
            "la boîte lourde", "du pain frais", "la clé d'argent"),
           ("chaque matin", "près de la rivière", "après le dîner", "dans le jardin", "avant l'orage",
            "le dimanche", "avec grand soin", "à la gare")),
    "it": (("Il vecchio", "Mia sorella", "Un giovane medico", "La maestra", "Il nostro vicino", "La bambina",
            "Un contadino stanco", "Suo fratello"),
           ("legge", "compra", "dipinge", "trova", "porta", "vende", "pulisce", "guarda"),
           ("un libro rosso", "la bicicletta verde", "una lettera antica", "la piccola barca", "un cappotto caldo",
            "la scatola pesante", "il pane fresco", "la chiave d'argento"),
           ("ogni mattina", "vicino al fiume", "dopo cena", "nel giardino", "prima del temporale", "la domenica",
            "con grande cura", "alla stazione")),
    "ru": (("Старик", "Моя сестра", "Молодой врач", "Учительница", "Наш сосед", "Маленькая девочка",
            "Усталый фермер", "Его брат"),
           ("читает", "покупает", "рисует", "находит", "несёт", "продаёт", "чистит", "берёт"),
           ("красную книгу", "зелёный велосипед", "старое письмо", "маленькую лодку", "тёплое пальто",
            "тяжёлую коробку", "свежий хлеб", "серебряный ключ"),
           ("каждое утро", "у реки", "после ужина", "в саду", "перед грозой", "в воскресенье", "очень осторожно",
            "на вокзале")),
    "de": (("Der alte Mann", "Meine Schwester", "Ein junger Arzt", "Die Lehrerin", "Unser Nachbar",
            "Das kleine Mädchen", "Ein müder Bauer", "Sein Bruder"),
           ("liest", "kauft", "malt", "findet", "trägt", "verkauft", "putzt", "betrachtet"),
           ("ein rotes Buch", "das grüne Fahrrad", "einen alten Brief", "das kleine Boot", "einen warmen Mantel",
            "die schwere Kiste", "frisches Brot", "den silbernen Schlüssel"),
           ("jeden Morgen", "am Fluss", "nach dem Abendessen", "im Garten", "vor dem Gewitter", "am Sonntag",
            "mit großer Sorgfalt", "am Bahnhof")),
    "pt": (("O velho", "Minha irmã", "Um jovem médico", "A professora", "Nosso vizinho", "A menina",
            "Um agricultor cansado", "Seu irmão"),
           ("lê", "compra", "pinta", "encontra", "carrega", "vende", "limpa", "olha"),
           ("um livro vermelho", "a bicicleta verde", "uma carta antiga", "o barco pequeno", "um casaco quente",
            "a caixa pesada", "o pão fresco", "a chave de prata"),
           ("toda manhã", "perto do rio", "depois do jantar", "no jardim", "antes da tempestade", "no domingo",
            "com muito cuidado", "na estação")),
    "nl": (("De oude man", "Mijn zus", "Een jonge dokter", "De lerares", "Onze buurman", "Het kleine meisje",
            "Een moeë boer", "Zijn broer"),
           ("leest", "koopt", "schildert", "vindt", "draagt", "verkoopt", "poetst", "bekijkt"),
           ("een rood boek", "de groene fiets", "een oude brief", "de kleine boot", "een warme jas",
            "de zware doos", "vers brood", "de zilveren sleutel"),
           ("elke ochtend", "bij de rivier", "na het eten", "in de tuin", "voor het onweer", "op zondag",
            "met veel zorg", "op het station")),
}

# Arousal proxy: prosody settings only (espeak-ng pitch -p 0..99, rate -s in words per minute, amplitude -a 0..200,
# SSML pitch range). A stand-in for emotion data, never called emotion. Amplitudes stay <= ESPEAK_MAX_AMPLITUDE:
# clipping would make "high" trivially detectable by its distortion.
AROUSAL_SETTINGS = {
    "low": {"pitch": (15, 30), "rate_wpm": (110, 140), "amplitude": (25, 40), "pitch_range": ("x-low", "low")},
    "neutral": {"pitch": (42, 58), "rate_wpm": (160, 190), "amplitude": (50, 65), "pitch_range": ("medium",)},
    "high": {"pitch": (70, 90), "rate_wpm": (220, 270), "amplitude": (75, 85), "pitch_range": ("high", "x-high")},
}
# espeak-ng's level is linear in -a; its default 100 already saturates int16 on some high-pitched sentences,
# 85 peaks below 0.97 on the word lists above (probe: 8 languages x 3 variants, pitch 50-85, 175-250 wpm).
ESPEAK_MAX_AMPLITUDE = 85
ESPEAK_AMPLITUDE = 70

# Counts at scale 1.0 (scaled, with a floor that keeps every split and speaker populated at tiny scales).
COUNTS = {
    "pretrain_espeak_per_language": (40, 2),
    "pretrain_flite": (60, 4),
    "pretrain_asterisk_per_speaker": (150, 3),
    "phoneme_sentences_per_language": (30, 3),
    "phoneme_voices_per_sentence": (2, 2),
    "speaker_utterances_per_speaker": (12, 4),
    "arousal_sentences_per_language": (20, 3),
    "noise_files_per_color": (10, 2),
    "babble_files": (16, 2),
    "speech_files": (40, 8),  # >= 7: the augmenter mixes up to 7 speech/ files into babble
}
MUSIC_CLIP_SECONDS = 30.0


class MissingToolsError(RuntimeError):
    """A required executable (Debian package) is not installed."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One utterance to render. All random choices are fixed here, in the parent, for determinism."""

    set_name: str
    split: str  # "" for pretrain
    id: str
    language: str
    speaker: str
    engine: str  # espeak-ng | flite | asterisk
    voice: str  # espeak-ng voice+variant, flite voice, or Asterisk speaker folder
    text: str | None = None
    source: str | None = None  # Asterisk input file
    pitch: int | None = None
    rate_wpm: int | None = None
    amplitude: int | None = None
    pitch_range: str | None = None  # SSML <prosody range=...>
    duration_stretch: float | None = None  # flite
    labels: tuple[tuple[str, str], ...] = ()
    fmt: str = "wav"  # wav | flac | ogg | mp3
    subtype: str = "PCM_16"  # wav/flac only
    channels: int = 1
    out_rate: int | None = None  # None keeps the engine's rate
    noise_seed: int = 0


def _scaled(name: str, scale: float) -> int:
    base, floor = COUNTS[name]
    return max(floor, int(round(base * scale)))


def _rng(seed: int, name: str) -> np.random.Generator:
    """An independent stream per purpose, so adding or removing one part never shifts another's choices."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def check_tools() -> list[str]:
    """Debian packages of REQUIRED_TOOLS whose executables are not on PATH (empty when all are present)."""
    return [pkg for exe, pkg in REQUIRED_TOOLS.items() if shutil.which(exe) is None]


def _sox_has_ogg() -> bool:
    out = subprocess.run(["sox", "-h"], capture_output=True, text=True, check=False).stdout
    return " vorbis " in out or " ogg " in out


class _SentencePool:
    """Unique sentences of one language, handed out once each so that the sets never share a sentence."""

    def __init__(self, language: str, rng: np.random.Generator):
        self.language = language
        self._parts = LEXICON[language]
        self._order = rng.permutation(int(np.prod([len(p) for p in self._parts])))
        self._next = 0

    def take(self, n: int) -> list[str]:
        if self._next + n > len(self._order):
            raise ValueError(f"--scale too large: the {self.language} templates give {len(self._order)} unique "
                             f"sentences and {self._next + n} are needed; lower --scale")
        out = []
        for k in self._order[self._next:self._next + n]:
            words = []
            for part in self._parts:
                k, i = divmod(int(k), len(part))
                words.append(part[i])
            out.append(" ".join(words) + ".")
        self._next += n
        return out


def _pick_format(rng: np.random.Generator, native_rate: int, has_ogg: bool) -> dict:
    """Mixed containers, codecs, rates and channel counts, on purpose (the reader must handle them all)."""
    fmt = str(rng.choice(["wav", "flac", "ogg", "mp3"], p=[0.55, 0.2, 0.1, 0.15]))
    if fmt == "ogg" and not has_ogg:
        fmt = "flac"
    subtype = "PCM_16"
    out_rate = None
    if fmt == "wav":
        subtype = str(rng.choice(["PCM_16", "PCM_24", "FLOAT"], p=[0.8, 0.1, 0.1]))
    if fmt in ("wav", "flac") and rng.random() < 0.1:
        out_rate = int(rng.choice([44100, 48000]))
    if out_rate == native_rate:
        out_rate = None
    channels = 2 if rng.random() < 0.12 else 1
    return {"fmt": fmt, "subtype": subtype, "out_rate": out_rate, "channels": channels,
            "noise_seed": int(rng.integers(2**31))}


def _find_asterisk(sounds_dir: Path, transcript: Path) -> dict[str, list[tuple[str, str | None]]]:
    """Asterisk speaker folder (e.g. en_US_f_Allison) -> sorted [(prompt file, English transcript or None)].

    Tones, beeps and silences are dropped (bracketed transcripts, silence/), as are prompts under 1 s or over 30 s.
    """
    texts: dict[str, str] = {}
    if transcript.exists():
        with gzip.open(transcript, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, text = line.partition(":")
                if sep and not line.startswith(";"):
                    texts[key.strip()] = text.strip()
    found = {}
    for folder in sorted(glob.glob(str(sounds_dir / "??_??_[mf]_*"))):
        name = os.path.basename(folder)
        prompts = []
        for path in sorted(glob.glob(os.path.join(folder, "**", "*.wav"), recursive=True)):
            key = os.path.splitext(os.path.relpath(path, folder))[0]
            text = texts.get(key)
            if key.startswith("silence/") or (text is not None and text.startswith("[")):
                continue
            try:
                seconds = sf.info(path).duration
            except RuntimeError:
                continue
            if 1.0 <= seconds <= 30.0:
                prompts.append((path, text if name.startswith("en_") else None))
        if prompts:
            found[name] = prompts
    return found


def plan_jobs(scale: float, seed: int, asterisk: dict[str, list[tuple[str, str | None]]],
              has_ogg: bool = True) -> list[Job]:
    """Every utterance of every set, with all random choices made (deterministic for scale, seed, inputs)."""
    if not scale > 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    pools = {lang: _SentencePool(lang, _rng(seed, f"sentences/{lang}")) for lang in ESPEAK_VOICES}
    jobs: list[Job] = []
    counters: dict[str, int] = defaultdict(int)

    def add(rng, set_name, split, language, speaker, engine, voice, native_rate, **kw):
        n = counters[set_name]
        counters[set_name] += 1
        fmt = _pick_format(rng, native_rate, has_ogg)
        jobs.append(Job(set_name=set_name, split=split, id=f"{set_name}-{language}-{engine}-{n:05d}",
                        language=language, speaker=speaker, engine=engine, voice=voice, **fmt, **kw))

    def espeak(rng, set_name, split, lang, variant, text, pitch=(35, 65), rate=(140, 200), **kw):
        voice = f"{ESPEAK_VOICES[lang]}+{variant}"
        add(rng, set_name, split, lang, f"espeak-ng/{voice}", "espeak-ng", voice, 22050, text=text,
            pitch=int(rng.integers(*pitch, endpoint=True)), rate_wpm=int(rng.integers(*rate, endpoint=True)),
            amplitude=kw.pop("amplitude", ESPEAK_AMPLITUDE), **kw)

    # Phonemes first so that its held-out sentences do not depend on the other sets' sizes.
    # Held-out voices: one male and one female variant for valid, another pair for test, the rest for train.
    rng = _rng(seed, "phonemes")
    males, females = list(rng.permutation(MALE_VARIANTS)), list(rng.permutation(FEMALE_VARIANTS))
    split_variants = {"test": [males.pop(), females.pop()], "valid": [males.pop(), females.pop()]}
    split_variants["train"] = sorted(males + females)
    per_sentence = _scaled("phoneme_voices_per_sentence", scale)
    for lang in ESPEAK_VOICES:
        for split, sentences in _split_list(pools[lang].take(_scaled("phoneme_sentences_per_language", scale))):
            variants = split_variants[split]
            for text in sentences:
                for variant in rng.choice(variants, size=min(per_sentence, len(variants)), replace=False):
                    espeak(rng, "phonemes", split, lang, str(variant), text)

    # Speaker identification: every espeak-ng en-us variant, every flite voice, every Asterisk speaker; the
    # utterances of each speaker are split train/valid/test (closed set).
    rng = _rng(seed, "speaker")
    per_speaker = _scaled("speaker_utterances_per_speaker", scale)
    for variant in VARIANTS:
        for split, texts in _split_list(pools["en"].take(per_speaker)):
            for text in texts:
                espeak(rng, "speaker", split, "en", variant, text, pitch=(45, 55), rate=(160, 190))
    for voice in FLITE_VOICES:
        for split, texts in _split_list(pools["en"].take(per_speaker)):
            for text in texts:
                add(rng, "speaker", split, "en", f"flite/{voice}", "flite", voice, 16000, text=text)
    asterisk_left = {}
    for name, prompts in asterisk.items():
        order = _rng(seed, f"asterisk/{name}").permutation(len(prompts))
        chosen = [prompts[i] for i in order]
        if len(chosen) <= per_speaker:  # too few prompts to split: pre-training only
            asterisk_left[name] = chosen
            continue
        asterisk_left[name] = chosen[per_speaker:]  # the rest feeds pre-training, never a labeled utterance
        for split, items in _split_list(chosen[:per_speaker]):
            for path, text in items:
                add(rng, "speaker", split, name[:2], f"asterisk/{name}", "asterisk", name, 8000, text=text,
                    source=path)

    # Arousal proxy: each sentence in all three classes (balanced; the text cannot give the label away),
    # sentences held out between splits, random variants.
    rng = _rng(seed, "arousal_proxy")
    for lang in AROUSAL_LANGUAGES:
        for split, texts in _split_list(pools[lang].take(_scaled("arousal_sentences_per_language", scale))):
            for text in texts:
                for label, s in AROUSAL_SETTINGS.items():
                    espeak(rng, "arousal_proxy", split, lang, str(rng.choice(VARIANTS)), text, pitch=s["pitch"],
                           rate=s["rate_wpm"], amplitude=int(rng.integers(*s["amplitude"], endpoint=True)),
                           pitch_range=str(rng.choice(s["pitch_range"])), labels=(("arousal_proxy", label),))

    # Unlabeled pre-training: multilingual espeak-ng (2-4 sentences, wide pitch/rate), flite, Asterisk prompts.
    rng = _rng(seed, "pretrain")
    for lang in ESPEAK_VOICES:
        for _ in range(_scaled("pretrain_espeak_per_language", scale)):
            text = " ".join(pools[lang].take(int(rng.integers(2, 5))))
            espeak(rng, "pretrain", "", lang, str(rng.choice(VARIANTS)), text, pitch=(20, 80), rate=(120, 240),
                   amplitude=int(rng.integers(40, ESPEAK_MAX_AMPLITUDE, endpoint=True)))
    for _ in range(_scaled("pretrain_flite", scale)):
        voice = str(rng.choice(FLITE_VOICES))
        add(rng, "pretrain", "", "en", f"flite/{voice}", "flite", voice, 16000,
            text=" ".join(pools["en"].take(int(rng.integers(2, 4)))),
            duration_stretch=round(float(rng.uniform(0.85, 1.25)), 2))
    for name, prompts in asterisk_left.items():
        for path, text in prompts[:_scaled("pretrain_asterisk_per_speaker", scale)]:
            add(rng, "pretrain", "", name[:2], f"asterisk/{name}", "asterisk", name, 8000, text=text, source=path)
    return jobs


def _split_list(items: list) -> list[tuple[str, list]]:
    """70/15/15 train/valid/test by position, at least one item in valid and test and two in train."""
    n = len(items)
    assert n >= 3, n
    n_test = max(1, int(round(0.15 * n)))
    n_valid = max(1, int(round(0.15 * n)))
    n_train = n - n_test - n_valid
    return [("train", items[:n_train]), ("valid", items[n_train:n_train + n_valid]),
            ("test", items[n_train + n_valid:])]


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-500:]}")
    return proc.stdout.decode("utf-8", errors="replace")


def _synthesize(job: Job, tmp: str) -> tuple[np.ndarray, int, str | None]:
    """Mono float32 samples [T], their rate in Hz, and (espeak-ng only) the phonemes of the same run."""
    if job.engine == "asterisk":
        samples, rate = sf.read(job.source, dtype="float32", always_2d=True)
        return samples.mean(axis=1), rate, None
    wav = os.path.join(tmp, "tts.wav")
    phonemes = None
    if job.engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", job.voice, "-p", str(job.pitch), "-s", str(job.rate_wpm), "-a", str(job.amplitude),
               "-w", wav, "-x", "--sep= "]  # -x prints the phonemes of this very run; -q would drop the audio
        text = job.text
        if job.pitch_range is not None:
            cmd.append("-m")
            text = f'<speak><prosody range="{job.pitch_range}">{xml.sax.saxutils.escape(text)}</prosody></speak>'
        out = _run([*cmd, text])
        # One line per clause; espeak-ng separates phonemes by one space and words by two.
        phonemes = "  ".join(line.strip() for line in out.splitlines() if line.strip())
    else:
        cmd = ["flite", "-voice", job.voice]
        if job.duration_stretch is not None:
            cmd += ["--setf", f"duration_stretch={job.duration_stretch}"]
        _run([*cmd, "-t", job.text, "-o", wav])
    samples, rate = sf.read(wav, dtype="float32", always_2d=True)
    return samples.mean(axis=1), rate, phonemes


def render(job: Job, set_dir: str) -> dict:
    """Synthesize (or read) one utterance, convert it as planned, write it under set_dir; its manifest row."""
    with tempfile.TemporaryDirectory(prefix="demo_corpus_") as tmp:
        samples, rate, phonemes = _synthesize(job, tmp)
        rng = np.random.default_rng(job.noise_seed)
        if job.out_rate is not None:
            samples = soxr.resample(samples, rate, job.out_rate, quality="HQ").astype(np.float32)
            rate = job.out_rate
        if job.channels == 2:  # a delayed, quieter copy: the channels differ, as in a real stereo recording
            delay = int(rng.integers(1, 24))
            right = np.concatenate([np.zeros(delay, np.float32), 0.8 * samples[:-delay]])
            samples = np.stack([samples, right], axis=1)  # [T, C]
        if job.engine != "asterisk":  # exact digital silence between words would be trivially predictable
            samples = samples + NOISE_FLOOR_RMS * rng.standard_normal(samples.shape).astype(np.float32)
        samples = np.clip(samples, -1.0, 1.0)
        rel = os.path.join("audio", job.language, f"{job.id}.{job.fmt}")
        path = os.path.join(set_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if job.fmt == "ogg":  # via sox -R: libsndfile gives each ogg stream a random serial number
            tmp_wav = os.path.join(tmp, "for_ogg.wav")
            sf.write(tmp_wav, samples, rate, subtype="PCM_16")
            _run(["sox", "-R", tmp_wav, path])
        elif job.fmt == "mp3":
            sf.write(path, samples, rate, format="MP3", subtype="MPEG_LAYER_III")
        else:
            sf.write(path, samples, rate, format=job.fmt.upper(), subtype=job.subtype)
            if job.subtype == "FLOAT":
                _zero_peak_timestamp(path)
    info = sf.info(path)
    row = {"path": rel, "id": job.id, "language": job.language, "speaker": job.speaker,
           "source_engine": job.engine, "voice": job.voice}
    if job.text is not None:
        row["text"] = job.text
    if phonemes is not None and job.set_name == "phonemes":
        row["phonemes"] = phonemes
    row.update(dict(job.labels))
    if job.set_name == "arousal_proxy":
        row.update({"espeak_pitch": job.pitch, "espeak_rate_wpm": job.rate_wpm, "espeak_amplitude": job.amplitude,
                    "espeak_pitch_range": job.pitch_range})
    # file_* rather than sample_rate/samples: the preprocessor copies labels to its output and writes its own
    # "samples" / "orig_sample_rate" for the 16 kHz shard (it refuses input keys that clash with those)
    row.update({"file_format": job.fmt, "file_sample_rate": info.samplerate, "file_channels": info.channels,
                "file_num_samples": info.frames})
    return row


def _zero_peak_timestamp(path: str) -> None:
    """libsndfile stamps the wall-clock time into the PEAK chunk of float WAVs; zero it so bytes are repeatable."""
    with open(path, "r+b") as f:
        data = f.read(4096)
        pos = 12  # after "RIFF" <size> "WAVE"
        while pos + 8 <= len(data):
            chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
            if chunk == b"PEAK":
                f.seek(pos + 12)  # chunk id, size, version; then the 4-byte timestamp
                f.write(bytes(4))
                return
            if chunk == b"data":
                return
            pos += 8 + size + (size & 1)


def _render_star(args: tuple[Job, str]) -> dict:
    return render(*args)


def _mono_16k(path: str) -> np.ndarray:
    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    # Resample before mixing: sources have different rates (sox refuses to mix them, docs/design.md §8).
    return mono if rate == MUSAN_RATE else soxr.resample(mono, rate, MUSAN_RATE).astype(np.float32)


def build_musan(out_dir: Path, pretrain_rows: list[dict], pretrain_dir: Path, scale: float, seed: int,
                moh_dir: Path) -> dict[str, list[dict]]:
    """DIR/musan/{noise,music,speech}: sox-synthesized colored noise and babble of 4-7 pre-training utterances
    (noise/), Asterisk music on hold or synthesized tones when it is not installed (music/), single pre-training
    utterances at 16 kHz (speech/). Rows of musan/<kind>/manifest.jsonl:
    path (relative to that folder), sample_rate, channels, samples, plus how the file was made."""
    musan = out_dir / "musan"
    rows: dict[str, list[dict]] = {"noise": [], "music": [], "speech": []}
    for kind in rows:
        (musan / kind).mkdir(parents=True, exist_ok=True)

    def write(kind: str, name: str, samples: np.ndarray, rate: int, **extra):
        sf.write(musan / kind / name, samples, rate, subtype="PCM_16")
        rows[kind].append({"path": name, "file_sample_rate": rate, "file_channels": 1, "file_num_samples": len(samples),
                           **extra})

    # Noise: one long sox synthesis per color (-R: repeatable), cut at random offsets into distinct clips.
    rng = _rng(seed, "musan/noise")
    n_noise = _scaled("noise_files_per_color", scale)
    with tempfile.TemporaryDirectory(prefix="demo_corpus_") as tmp:
        for color in ("white", "pink", "brown"):
            lengths_s = rng.uniform(5.0, 15.0, size=n_noise)
            total_s = float(lengths_s.sum()) + 20.0
            wav = os.path.join(tmp, f"{color}.wav")
            _run(["sox", "-R", "-n", "-r", str(MUSAN_RATE), "-b", "16", "-c", "1", wav, "synth", f"{total_s:.2f}",
                  f"{color}noise"])
            long = sf.read(wav, dtype="float32")[0]
            for i, seconds in enumerate(lengths_s):
                n = int(seconds * MUSAN_RATE)
                start = int(rng.integers(0, len(long) - n))
                clip = long[start:start + n] - long[start:start + n].mean()
                rms_dbfs = float(rng.uniform(-35.0, -15.0))
                clip = clip * (10 ** (rms_dbfs / 20) / max(float(np.sqrt(np.mean(clip**2))), 1e-9))
                write("noise", f"{color}-{i:03d}.wav", np.clip(clip, -1, 1), MUSAN_RATE, source="sox synth",
                      color=color, rms_dbfs=round(rms_dbfs, 1))

    # Music: real tracks cut into 30 s clips, kept at their own 8 kHz rate; otherwise synthesized note sequences.
    rng = _rng(seed, "musan/music")
    tracks = sorted(glob.glob(str(moh_dir / "*.wav")))
    if tracks:
        clips = []
        for track in tracks:
            info = sf.info(track)
            n = int(MUSIC_CLIP_SECONDS * info.samplerate)
            clips += [(track, start, n) for start in range(0, info.frames - n + 1, n)]
        keep = sorted(rng.choice(len(clips), size=max(2, int(round(len(clips) * scale))), replace=False))
        for i in keep:
            track, start, n = clips[i]
            samples, rate = sf.read(track, start=start, frames=n, dtype="float32", always_2d=True)
            name = Path(track).stem
            write("music", f"{name}-{start // n:03d}.wav", samples.mean(axis=1), rate,
                  source="asterisk-moh-opsound", track=name, start_seconds=start / rate)
    else:
        for i in range(max(2, int(round(12 * scale)))):
            write("music", f"tones-{i:03d}.wav", _synth_music(rng, MUSIC_CLIP_SECONDS), MUSAN_RATE,
                  source="synthesized tones (asterisk-moh-opsound-wav not installed)")

    # Speech: single talkers, as in MUSAN; the augmenter mixes 3-7 of them into babble at run time (Kaldi's recipe).
    rng = _rng(seed, "musan/speech")
    sources = sorted((r["id"], r["path"], r["language"]) for r in pretrain_rows)
    talkers = rng.choice(len(sources), size=min(len(sources), _scaled("speech_files", scale)), replace=False)
    for i, k in enumerate(sorted(talkers)):
        uid, path, language = sources[k]
        write("speech", f"speech-{i:03d}.wav", _mono_16k(str(pretrain_dir / path)), MUSAN_RATE, source="pretrain",
              talker=uid, language=language)

    # Babble: 4-7 pre-training utterances at equal loudness, each looped to the clip length from a random offset,
    # summed. Stored under noise/ as a background noise: under speech/ the augmenter would mix it again.
    for i in range(_scaled("babble_files", scale)):
        n = int(rng.uniform(8.0, 15.0) * MUSAN_RATE)
        picked = rng.choice(len(sources), size=min(len(sources), int(rng.integers(4, 8))), replace=False)
        mix = np.zeros(n, np.float32)
        for k in picked:
            voice = _mono_16k(str(pretrain_dir / sources[k][1]))
            voice = np.roll(np.resize(voice, n), int(rng.integers(n)))
            mix += voice / max(float(np.sqrt(np.mean(voice**2))), 1e-9)
        mix *= 0.5 / max(float(np.abs(mix).max()), 1e-9)
        write("noise", f"babble-{i:03d}.wav", mix, MUSAN_RATE, source="babble", num_talkers=len(picked),
              talkers=[sources[k][0] for k in picked])  # pre-training ids
    for kind, kind_rows in rows.items():
        with open(musan / kind / "manifest.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kind_rows)
    return rows


def _synth_music(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Notes of a pentatonic scale with harmonics and decay: a stand-in when no real music is installed."""
    rate = MUSAN_RATE
    out = np.zeros(int(seconds * rate), np.float32)
    t0 = 0
    while t0 < len(out):
        n = int(rng.uniform(0.15, 0.6) * rate)
        freq = 220.0 * 2 ** (int(rng.choice([0, 2, 4, 7, 9, 12, 14, 16])) / 12)
        t = np.arange(n) / rate
        note = sum(np.sin(2 * np.pi * freq * h * t) / h for h in (1, 2, 3)) * np.exp(-3.0 * t)
        out[t0:t0 + n] += 0.2 * note[:len(out) - t0].astype(np.float32)
        t0 += n
    return out


def _seconds(rows: list[dict]) -> float:
    return float(sum(r["file_num_samples"] / r["file_sample_rate"] for r in rows))


def summarize(manifests: dict[str, list[dict]], musan: dict[str, list[dict]]) -> list[dict]:
    """One entry per manifest: set, split, files, seconds, per-language seconds, engines, rates, formats."""
    out = []
    for key, rows in manifests.items():
        set_name, _, split = key.partition("/")
        langs: dict[str, float] = defaultdict(float)
        for r in rows:
            langs[r["language"]] += r["file_num_samples"] / r["file_sample_rate"]
        out.append({"set": set_name, "split": split or "-", "files": len(rows), "seconds": _seconds(rows),
                    "languages": dict(sorted(langs.items())),
                    "speakers": len({r["speaker"] for r in rows}),
                    "engines": sorted({r["source_engine"] for r in rows}),
                    "sample_rates": sorted({r["file_sample_rate"] for r in rows}),
                    "formats": sorted({r["file_format"] for r in rows}),
                    "channels": sorted({r["file_channels"] for r in rows})})
    for kind, rows in musan.items():
        out.append({"set": "musan", "split": kind, "files": len(rows), "seconds": _seconds(rows), "languages": {},
                    "speakers": 0, "engines": sorted({r["source"].split(" (")[0] for r in rows}),
                    "sample_rates": sorted({r["file_sample_rate"] for r in rows}), "formats": ["wav"],
                    "channels": [1]})
    return out


def format_summary(summary: list[dict]) -> str:
    """A short table: files and hours per set and split, hours per language."""
    lines = [f"{'set':<14}{'split':<7}{'files':>6}{'hours':>8}  per language (hours)"]
    for s in summary:
        langs = " ".join(f"{k} {v / 3600:.3f}" for k, v in s["languages"].items())
        lines.append(f"{s['set']:<14}{s['split']:<7}{s['files']:>6}{s['seconds'] / 3600:>8.3f}  {langs}")
    total = sum(s["seconds"] for s in summary)
    lines.append(f"{'total':<21}{sum(s['files'] for s in summary):>6}{total / 3600:>8.3f}")
    return "\n".join(lines)


def build_demo_corpus(out_dir: str | os.PathLike, scale: float = 1.0, seed: int = 0, num_workers: int = 2,
                      asterisk_sounds_dir: str | os.PathLike = ASTERISK_SOUNDS_DIR,
                      asterisk_moh_dir: str | os.PathLike = ASTERISK_MOH_DIR,
                      log: Callable[[str], None] = print) -> list[dict]:
    """Build the demo corpus under out_dir (layout in the module docstring); returns summarize()'s entries.

    scale multiplies every count (1.0: about 2 hours of audio); seed fixes every random choice, so the same
    (scale, seed, installed packages) gives the same corpus whatever num_workers is: byte-identical manifests,
    README, wav/flac and MUSAN files, and ogg/mp3 files encoded from byte-identical PCM (the lossy encoders'
    bytes are theirs: equal decoded audio is what is promised). Raises
    MissingToolsError when espeak-ng, flite or sox is missing; optional Asterisk packages are skipped with a notice.
    """
    start = time.monotonic()
    missing = check_tools()
    if missing:
        raise MissingToolsError(f"missing required Debian package(s): {', '.join(missing)}; install them with: "
                                f"sudo {INSTALL_HINT}")
    out = Path(out_dir)
    sounds_dir, moh_dir = Path(asterisk_sounds_dir), Path(asterisk_moh_dir)
    asterisk = _find_asterisk(sounds_dir, ASTERISK_TRANSCRIPT)
    if not asterisk:
        log(f"notice: no Asterisk prompts in {sounds_dir}: real recorded speech skipped "
            f"(optional: apt-get install {ASTERISK_PACKAGES} asterisk-core-sounds-en)")
    elif not ASTERISK_TRANSCRIPT.exists():
        log("notice: asterisk-core-sounds-en (transcripts) not installed: Asterisk prompts get no text")
    if not glob.glob(str(moh_dir / "*.wav")):
        log(f"notice: no music in {moh_dir}: musan/music holds synthesized tones "
            "(optional: apt-get install asterisk-moh-opsound-wav)")
    has_ogg = _sox_has_ogg()
    if not has_ogg:
        log("notice: this sox has no ogg/vorbis handler: no .ogg files (apt-get install libsox-fmt-base)")

    jobs = plan_jobs(scale, seed, asterisk, has_ogg)
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED_PATHS:  # a rebuild never mixes with a previous build; other files are left alone
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    tasks = [(job, str(out / job.set_name)) for job in jobs]
    if num_workers > 1:
        # spawn, never fork: the caller may hold threads (torch, tqdm)
        with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_render_star, tasks, chunksize=8))
    else:
        rows = [_render_star(t) for t in tasks]

    manifests: dict[str, list[dict]] = {"pretrain": []}
    manifests.update({f"{s}/{split}": [] for s in LABELED_SETS for split in SPLITS})
    for job, row in zip(jobs, rows, strict=True):
        manifests[f"{job.set_name}/{job.split}" if job.split else "pretrain"].append(row)
    for key, key_rows in manifests.items():
        path = out / ("pretrain/manifest.jsonl" if key == "pretrain" else f"{key}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in key_rows)
    musan = build_musan(out, manifests["pretrain"], out / "pretrain", scale, seed, moh_dir)
    summary = summarize(manifests, musan)
    (out / "README.md").write_text(_readme(summary, scale, seed, asterisk, bool(glob.glob(str(moh_dir / "*.wav")))),
                                   encoding="utf-8")
    log(f"demo corpus in {out} (scale {scale}, seed {seed}) built in {time.monotonic() - start:.1f} s")
    return summary


def _package_versions(packages: list[str]) -> str:
    """'name version' of the installed Debian packages among `packages` (empty off Debian)."""
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", *packages],
                              capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return ""
    return ", ".join(line for line in proc.stdout.splitlines() if line.split()[1:])


def _readme(summary: list[dict], scale: float, seed: int, asterisk: dict, has_moh: bool) -> str:
    table = ["| set | split | files | hours | speakers | languages (hours) | engines | rates (Hz) | formats "
             "| channels |", "|---|---|---:|---:|---:|---|---|---|---|---|"]
    for s in summary:
        langs = ", ".join(f"{k} {v / 3600:.3f}" for k, v in s["languages"].items())
        table.append(f"| {s['set']} | {s['split']} | {s['files']} | {s['seconds'] / 3600:.3f} | {s['speakers']} | "
                     f"{langs} | {', '.join(s['engines'])} | {', '.join(map(str, s['sample_rates']))} | "
                     f"{', '.join(s['formats'])} | {', '.join(map(str, s['channels']))} |")
    total_h = sum(s["seconds"] for s in summary) / 3600
    espeak_langs = ", ".join(f"{k} ({v})" for k, v in ESPEAK_VOICES.items())
    asterisk_line = (", ".join(sorted(asterisk)) if asterisk else
                     f"not installed when this corpus was built (`apt-get install {ASTERISK_PACKAGES}`)")
    music_line = ("real music on hold from `asterisk-moh-opsound-wav`, cut into 30 s clips at its own 8 kHz"
                  if has_moh else
                  "**synthesized tones, not real music**: `asterisk-moh-opsound-wav` was not installed when this "
                  "corpus was built (install it and rebuild for real music)")
    arousal = "\n".join(f"  - `{k}`: pitch `-p` {v['pitch'][0]}-{v['pitch'][1]}, rate `-s` {v['rate_wpm'][0]}-"
                        f"{v['rate_wpm'][1]} wpm, amplitude `-a` {v['amplitude'][0]}-{v['amplitude'][1]}, "
                        f"SSML pitch range {'/'.join(v['pitch_range'])}" for k, v in AROUSAL_SETTINGS.items())
    return f"""# megatron-speech demo corpus

Built offline by `python tools/make_demo_corpus.py --out DIR --scale {scale} --seed {seed}`
(`tools/demo_corpus.py`). The same scale, seed and installed packages give byte-identical
manifests and wav/flac files; ogg/mp3 files are encoded from byte-identical audio and decode to the same audio.
Total: {sum(s['files'] for s in summary)} files, {total_h:.2f} hours.

Debian packages used: {_package_versions(["espeak-ng", "flite", "sox", *ASTERISK_PACKAGES.split(),
                                          "asterisk-core-sounds-en", "asterisk-moh-opsound-wav"]) or "unknown"}.

## Contents

{chr(10).join(table)}

## Layout and manifests

Every manifest is JSON Lines, one utterance per line; `path` is relative to the directory of the manifest.

- `pretrain/manifest.jsonl`: unlabeled, multilingual pre-training audio.
- `phonemes/{{train,valid,test}}.jsonl`: phoneme recognition. `phonemes` is what the same espeak-ng run printed
  (`espeak-ng -v VOICE -p P -s S -a A -w out.wav -x --sep=' ' "text"`): phonemes separated by one space,
  words (and clauses) by two; stress marks stay attached. Splits hold out sentences AND voices: valid and test
  each use one male and one female espeak-ng variant never used in train (phonemes depend on the accent, not on
  the variant or the speed).
- `speaker/{{train,valid,test}}.jsonl`: closed-set speaker identification; each speaker's utterances split
  70/15/15 (at least 2 train, 1 valid, 1 test). Speakers: the 13 espeak-ng en-us variants (+m1..+m8, +f1..+f5),
  the 4 flite voices, and the Asterisk voices.
- `arousal_proxy/{{train,valid,test}}.jsonl`: a prosody-style *arousal proxy*, **not emotion data**: the label
  `low` / `neutral` / `high` only says which espeak-ng prosody settings were used; each sentence appears in all
  three classes; splits hold out sentences.
{arousal}
- `<set>/audio/<language>/<id>.<ext>`: the audio.
- `musan/{{noise,music,speech}}/*.wav` (+ `manifest.jsonl` in each): MUSAN layout for augmentation.

Fields in every row: `path`, `id`, `language` (ISO 639-1), `speaker` (`espeak-ng/<voice>`, `flite/<voice>` or
`asterisk/<folder>`), `source_engine` (`espeak-ng`, `flite`, `asterisk`), `voice`, `format`, `sample_rate` (Hz),
`channels`, `samples` (per channel, as libsndfile reports them). Also `text` where known (not for the Russian and
Italian Asterisk prompts), `phonemes` (phoneme set), `arousal_proxy`, `espeak_pitch`, `espeak_rate_wpm`,
`espeak_amplitude`, `espeak_pitch_range` (arousal_proxy set).

## How it was made

- espeak-ng voices {espeak_langs}, variants +m1..+m8 and +f1..+f5, pitch and rate varied per utterance; sentences
  are subject + verb + object + adverbial from a small per-language word list, drawn without replacement, so no
  sentence is shared between sets or splits. Output 22050 Hz.
- flite voices {', '.join(FLITE_VOICES)} (16 kHz), English, `duration_stretch` varied in pre-training.
- Asterisk prompts (real recorded speech, 8 kHz telephone prompts, 1-30 s, no tones or silences): {asterisk_line}.
  A prompt is used either in the speaker set or in pre-training, never both.
- espeak-ng and flite leave exact digital silence between words: Gaussian noise at -80 dBFS RMS is added.
  espeak-ng amplitude `-a` stays <= {ESPEAK_MAX_AMPLITUDE} (its default 100 saturates on some sentences), so no
  synthesized file clips.
- Formats on purpose: ~55% wav (PCM_16, some PCM_24 or float), ~20% flac, ~10% ogg vorbis (via `sox -R`,
  which is repeatable), ~15% mp3; ~10% of wav/flac resampled to 44.1 or 48 kHz; ~12% stereo (a delayed,
  quieter copy in the right channel).
- musan/noise: white, pink and brown noise from `sox -R -n synth`, cut into 5-15 s clips at -35..-15 dBFS RMS.
- musan/music: {music_line}.
- musan/noise also holds babble (`babble-*.wav`): 4-7 pre-training utterances (`talkers`: their ids) resampled to
  16 kHz, equal loudness, each looped from a random offset, summed.
- musan/speech: single pre-training utterances (`talker`: the id) at 16 kHz mono, as in MUSAN, for augmenters that
  build babble themselves (megatron-speech's does, from 3-7 of them); pre-mixed babble is kept out of it.

## Credits and licences

- Asterisk core sounds (Debian `asterisk-core-sounds-*-wav`, transcripts in `asterisk-core-sounds-en`):
  English recorded by Allison Smith (CC-BY-SA-3.0, Digium); Italian recorded by Carlo Flora
  (CC-BY-SA-3.0); Russian provided by Maxim Topal, ivrvoice.ru (CC-BY-3.0). See
  `/usr/share/doc/asterisk-core-sounds-*/copyright`. Files derived from them here keep these licences.
- Music on hold (Debian `asterisk-moh-opsound-wav`): Paul Shuler (Macroform), Manolo Camp, Reno Project;
  CC-BY-SA-3.0 (`/usr/share/doc/asterisk-moh-opsound-wav/copyright`).
- espeak-ng (GPL-3.0-or-later; Jonathan Duddington, Reece H. Dunn and contributors) and flite (BSD-style
  licence; Carnegie Mellon University, University of Edinburgh) are only run as programs. Their licences cover
  the programs, not the speech they render from this project's own text (GPL-3 §2: output is covered only when
  its content is a covered work); the sentences and word lists were written for megatron-speech.
- sox (GPL/LGPL) synthesized the noise; numpy, soundfile (libsndfile) and soxr did the mixing and conversion.
"""
