"""Per-utterance crop and augmentation, run in the DataLoader workers (docs/design.md §2): random crop, speed
perturbation, additive MUSAN-style noise, per-utterance normalization.

Every random choice comes from the generator the caller passes, which the loader keys by (seed, step, micro_step,
dp_rank, utterance position) (common/rng.py): an utterance's audio is a pure function of that key, so it is
the same in any worker, with any number of workers, and after a resume. Each utterance first draws a fixed block
of uniforms (speed, crop offset, noise gate, noise kind), so turning one augmentation on or off does not move the
crop of another utterance, nor this utterance's crop when speed perturbation is off.

Noise (Kaldi's MUSAN recipe, egs/voxceleb/v2): a folder with noise/, music/ and speech/ (searched recursively),
packed into shards once and memory-mapped (data/noise.py). "noise": one noise/ clip at an SNR in data.noise_snr_db;
"music": one music/ clip in data.music_snr_db; "babble": 3-7 speech/ clips, each at its own SNR in
data.babble_snr_db, summed. A clip shorter than the crop is looped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import soxr

from megatron_speech.common.audio import SAMPLE_RATE

NOISE_KINDS = ("noise", "music", "babble")
FOLDER_OF_KIND = {"noise": "noise", "music": "music", "babble": "speech"}
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif")
# Extra source samples read around a speed-perturbed crop: soxr returns round(n / factor) samples, and
# ceil(T * factor) + 2 source samples always give at least T + 1.
SPEED_MARGIN = 2


def list_noise_files(noise_dir: str, kinds: Sequence[str]) -> dict[str, list[str]]:
    """Sorted audio files per noise kind under a MUSAN-layout `noise_dir` (the kind's folder, recursively).

    Raises FileNotFoundError / ValueError naming the folder when a configured kind has no files.
    """
    files: dict[str, list[str]] = {}
    for kind in kinds:
        if kind not in FOLDER_OF_KIND:
            raise ValueError(f"data.noise_types: unknown kind {kind!r}; expected some of {list(NOISE_KINDS)}")
        folder = os.path.join(noise_dir, FOLDER_OF_KIND[kind])
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"data.noise_dir={noise_dir!r} has no {FOLDER_OF_KIND[kind]}/ folder, needed "
                                    f"for {kind!r} noise (MUSAN layout: noise/, music/, speech/); remove "
                                    f"{kind!r} from data.noise_types to go without")
        found = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                       if name.lower().endswith(AUDIO_EXTENSIONS))
        if not found:
            raise ValueError(f"{folder} holds no audio file ({', '.join(AUDIO_EXTENSIONS)}), needed for {kind!r} "
                             "noise; remove it from data.noise_types to go without")
        files[kind] = found
    return files


def _segment(audio: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of num_samples of int16 `audio` (looped when shorter) as float32."""
    n = len(audio)
    if n >= num_samples:
        start = int(rng.integers(0, n - num_samples + 1))
        window = audio[start:start + num_samples]
    else:
        window = np.resize(np.roll(audio, -int(rng.integers(0, n))), num_samples)
    return window.astype(np.float32) / 32768.0


def noise_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """noise scaled so that 10 log10(P_signal / P_noise) = snr_db (power = mean square); silent noise stays 0."""
    p_signal = float(np.mean(np.square(signal, dtype=np.float64)))
    p_noise = float(np.mean(np.square(noise, dtype=np.float64)))
    if p_noise <= 0.0:
        return noise
    return np.float32(math.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))) * noise


def normalize(x: np.ndarray, eps: float) -> np.ndarray:
    """Zero mean, unit variance (biased variance + eps, as F.layer_norm over the whole utterance), float32."""
    x64 = x.astype(np.float64)
    mean = x64.mean()
    var = np.square(x64 - mean).mean()
    return ((x64 - mean) / math.sqrt(var + eps)).astype(np.float32)


class Augmenter:
    """Crop one utterance to exactly `num_samples` and augment it; each part switchable.

    speed_factors: factors drawn uniformly per utterance (1.0 = unchanged; > 1 = faster and shorter), applied by
    resampling with soxr (tempo and pitch change together, as Kaldi's/fairseq's speed perturbation). A factor is
    lowered, for that utterance only, to what its audio can supply: a crop never runs past the utterance.
    noise: a data/noise.py NoiseBank (clips per kind; None = no noise); noise_prob: chance per utterance;
    *_snr_db: (low, high) per kind; babble_num_speakers: (min, max) speech files per babble.
    normalize_eps: None = no normalization, else the variance epsilon of the per-utterance normalization.
    """

    def __init__(
        self,
        speed_factors: Sequence[float] = (),
        noise=None,
        noise_prob: float = 0.0,
        noise_snr_db: tuple[float, float] = (0.0, 15.0),
        music_snr_db: tuple[float, float] = (5.0, 15.0),
        babble_snr_db: tuple[float, float] = (13.0, 20.0),
        babble_num_speakers: tuple[int, int] = (3, 7),
        normalize_eps: float | None = 1e-5,
    ) -> None:
        if any(f <= 0 for f in speed_factors):
            raise ValueError(f"data.speed_perturb={list(speed_factors)}: factors must be > 0")
        self.speed_factors = [float(f) for f in speed_factors]
        self.noise = noise
        self.noise_kinds = [] if noise is None else list(noise.kinds)
        self.noise_prob = float(noise_prob) if self.noise_kinds else 0.0
        self.snr_db = {"noise": noise_snr_db, "music": music_snr_db, "babble": babble_snr_db}
        self.babble_num_speakers = babble_num_speakers
        self.normalize_eps = normalize_eps

    @property
    def max_speed(self) -> float:
        """The fastest speed factor (1.0 without speed perturbation): crops leave room for it."""
        return max([1.0, *self.speed_factors])

    @property
    def augments(self) -> bool:
        """Whether anything beyond cropping and normalization can change the audio."""
        return any(f != 1.0 for f in self.speed_factors) or self.noise_prob > 0

    def __call__(self, read: Callable[[int, int], np.ndarray], length: int, num_samples: int,
                 rng: np.random.Generator) -> np.ndarray:
        """Crop and augment one utterance: float32 [num_samples].

        read(offset, count): int16 samples [offset, offset + count) of the utterance (length samples in all,
        length >= num_samples).
        """
        assert length >= num_samples, (length, num_samples)
        u_speed, u_offset, u_gate, u_kind = rng.random(4)
        speed = self._speed(u_speed, length, num_samples)
        source = num_samples if speed == 1.0 else min(length, math.ceil(num_samples * speed) + SPEED_MARGIN)
        offset = min(int(u_offset * (length - source + 1)), length - source)
        x = read(offset, source).astype(np.float32) / 32768.0
        if speed != 1.0:
            # Audio "recorded" at 16 kHz * speed, played back at 16 kHz: speed times faster.
            x = soxr.resample(x, SAMPLE_RATE * speed, SAMPLE_RATE)
            assert len(x) >= num_samples, (len(x), num_samples, speed)
            x = np.ascontiguousarray(x[:num_samples], dtype=np.float32)
        if self.noise_prob > 0 and u_gate < self.noise_prob:
            x = self._add_noise(x, self.noise_kinds[int(u_kind * len(self.noise_kinds))], rng)
        if self.normalize_eps is not None:
            x = normalize(x, self.normalize_eps)
        return x

    def _speed(self, u: float, length: int, num_samples: int) -> float:
        if not self.speed_factors:
            return 1.0
        speed = self.speed_factors[int(u * len(self.speed_factors))]
        # Faster needs more source audio than the crop. The loader crops batches short enough for the fastest
        # factor; where the crop rule's minimum forbids that, cap at what this utterance holds.
        fastest = (length - SPEED_MARGIN) / num_samples
        if speed > fastest:
            speed = fastest if fastest > 1.0 else 1.0
        return speed

    def _add_noise(self, x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
        bank, count = self.noise, self.noise.count(kind)
        low, high = self.snr_db[kind]
        if kind != "babble":
            noise = _segment(bank.audio(kind, int(rng.integers(0, count))), len(x), rng)
            return x + noise_at_snr(x, noise, float(rng.uniform(low, high)))
        lo, hi = self.babble_num_speakers
        speakers = int(rng.integers(lo, hi + 1))
        babble = np.zeros_like(x)
        for i in rng.choice(count, size=speakers, replace=count < speakers):
            # Each speaker at its own SNR against the utterance, then summed (Kaldi's background noises).
            speech = _segment(bank.audio(kind, int(i)), len(x), rng)
            babble += noise_at_snr(x, speech, float(rng.uniform(low, high)))
        return x + babble
