"""CTC decoding (tasks/decoding.py): beam search against brute-force labelling probabilities, against greedy where
the best path decides, and with a tiny KenLM word LM written here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from megatron_speech.tasks.decoding import (
    DEFAULT_BEAM_WIDTH,
    DEFAULT_LM_WEIGHT,
    DEFAULT_UNK_SCORE,
    DEFAULT_WORD_SCORE,
    DecoderSpec,
    build_decoder,
)
from megatron_speech.tasks.metrics import ctc_greedy
from megatron_speech.tasks.task import Task

pytest.importorskip("pyctcdecode")
PHONEMES = Task("phoneme", "phonemes", ("aa", "b", "tʃ"))
ASR = Task("asr", "text", ("a", "c", "e", "h", "t", "|"))  # ids: blank 0, a 1, c 2, e 3, h 4, t 5, | 6


def labelling_probabilities(probs: np.ndarray) -> dict[tuple[int, ...], float]:
    """Every labelling's probability, summed over all its CTC paths: the definition, by enumeration."""
    out: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(probs.shape[1]), repeat=probs.shape[0]):
        label = tuple(ctc_greedy(np.asarray(path), len(path)))
        out[label] = out.get(label, 0.0) + float(np.prod(probs[np.arange(len(path)), path]))
    return out


def test_defaults_are_pyctcdecodes():
    from pyctcdecode import constants

    assert (DEFAULT_BEAM_WIDTH, DEFAULT_LM_WEIGHT, DEFAULT_WORD_SCORE, DEFAULT_UNK_SCORE) == (
        constants.DEFAULT_BEAM_WIDTH, constants.DEFAULT_ALPHA, constants.DEFAULT_BETA,
        constants.DEFAULT_UNK_LOGP_OFFSET)


def test_beam_finds_the_most_probable_labelling_where_the_best_path_does_not():
    greedy, beam = build_decoder(PHONEMES, DecoderSpec()), build_decoder(PHONEMES, DecoderSpec("beam"))
    # best path: blank, blank (0.36); but "aa" has the paths aa-aa, aa-blank, blank-aa: 0.64
    probs = np.asarray([[0.6, 0.4, 1e-9, 1e-9]] * 2)
    assert greedy(torch.tensor(probs).log()[None], [2]) == [[]]
    assert beam(torch.tensor(probs).log()[None], [2]) == [["aa"]]

    rng = np.random.default_rng(0)
    beam_won = 0
    for _ in range(20):
        probs = rng.dirichlet(np.full(4, 0.7), size=4)  # [F=4, V=4]: 256 paths
        probs = np.clip(probs, 0.01, None)  # above pyctcdecode's token floor, exp(-5)
        probs /= probs.sum(1, keepdims=True)
        table = labelling_probabilities(probs)
        logits = torch.tensor(probs).log()[None]
        index = {label: i + 1 for i, label in enumerate(PHONEMES.labels)}
        got = tuple(index[t] for t in beam(logits, [4])[0])
        best_path = tuple(index[t] for t in greedy(logits, [4])[0])
        assert table[got] == pytest.approx(max(table.values()), rel=1e-9)
        assert table[got] >= table[best_path]
        beam_won += table[got] > table[best_path] * (1 + 1e-9)
    assert beam_won >= 2, beam_won  # the cases include some where the best path is not the best labelling


@pytest.mark.parametrize("task", [PHONEMES, ASR])
def test_beam_width_one_agrees_with_greedy_on_peaked_outputs(task):
    """Where one path holds almost all the probability, every decoder must return it."""
    rng = np.random.default_rng(1)
    greedy, beam = build_decoder(task, DecoderSpec()), build_decoder(task, DecoderSpec("beam", beam_width=1))
    frames = 40
    logits = torch.tensor(rng.normal(size=(6, frames, task.num_outputs)))
    winners = rng.integers(0, task.num_outputs, size=(6, frames))
    winners[:, ::3] = 0  # blanks between, so that repeats survive
    logits.scatter_(2, torch.tensor(winners)[..., None], 12.0)
    lengths = [frames, 31, 17, 5, 1, 0]
    for g, b in zip(greedy(logits, lengths), beam(logits, lengths), strict=True):
        if task.name == "asr":  # pyctcdecode collapses repeated / edge word gaps; the words must agree
            assert task.words(b) == task.words(g) and "|" not in (b[:1] + b[-1:])
        else:
            assert b == g


def test_worker_processes_decode_as_this_one(tmp_path):
    pytest.importorskip("kenlm")
    logits = torch.cat([_teh_cat(), torch.randn(3, 7, ASR.num_outputs) * 3])
    lengths = [7, 7, 0, 4]
    spec = DecoderSpec("beam", beam_width=8, lm=_arpa(tmp_path / "tiny.arpa"))
    alone, pooled = build_decoder(ASR, spec), build_decoder(ASR, DecoderSpec(**{**spec.__dict__, "num_workers": 2}))
    try:
        assert pooled(logits, lengths) == alone(logits, lengths) and pooled._pool is not None
        assert pooled(logits, lengths)[0] == list("the|cat")  # the LM travelled to the workers
    finally:
        pooled.close()


def _arpa(path) -> str:
    # log10 probabilities: "the cat" likely, "teh" unknown
    path.write_text("\n".join([
        "\\data\\", "ngram 1=5", "ngram 2=3", "", "\\1-grams:",
        "-1.0\t<unk>\t0", "-99\t<s>\t-0.3", "-1.0\t</s>\t0", "-0.5\tthe\t-0.3", "-0.7\tcat\t-0.3", "",
        "\\2-grams:", "-0.1\t<s> the", "-0.1\tthe cat", "-0.1\tcat </s>", "", "\\end\\", ""]))
    return str(path)


def _teh_cat() -> torch.Tensor:
    """Logits [1, F, V] that spell "teh cat" slightly more than "the cat": frames 2 and 3 hesitate between e and h."""
    rows = [{5: 0.9}, {3: 0.55, 4: 0.45}, {4: 0.55, 3: 0.45}, {6: 0.9}, {2: 0.9}, {1: 0.9}, {5: 0.9}]
    probs = np.full((len(rows), ASR.num_outputs), 1e-3)
    for f, row in enumerate(rows):
        for i, p in row.items():
            probs[f, i] = p
    probs /= probs.sum(1, keepdims=True)
    return torch.tensor(np.log(probs))[None]


def test_an_lm_fixes_what_the_acoustics_got_wrong_and_weight_zero_is_no_lm(tmp_path):
    pytest.importorskip("kenlm")
    lm = _arpa(tmp_path / "tiny.arpa")
    logits = _teh_cat()

    def words(spec: DecoderSpec) -> str:
        return " ".join(ASR.words(build_decoder(ASR, spec)(logits, [logits.shape[1]])[0]))

    assert words(DecoderSpec()) == "teh cat"
    assert words(DecoderSpec("beam")) == "teh cat"
    assert words(DecoderSpec("beam", lm=lm)) == "the cat"
    # weight 0: neither the LM nor its lexicon penalty acts
    assert words(DecoderSpec("beam", lm=lm, lm_weight=0.0, word_score=0.0, unk_score=0.0)) == "teh cat"


def test_bad_requests_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no word delimiter"):
        build_decoder(PHONEMES, DecoderSpec("beam", lm=str(tmp_path / "x.arpa")))
    with pytest.raises(FileNotFoundError, match="missing.arpa"):
        build_decoder(ASR, DecoderSpec("beam", lm=str(tmp_path / "missing.arpa")))
    with pytest.raises(ValueError, match="needs --decoder beam"):
        build_decoder(ASR, DecoderSpec(lm="x.arpa"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kenlm" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'megatron-speech\[lm\]'"):
        build_decoder(ASR, DecoderSpec("beam", lm=_arpa(tmp_path / "tiny.arpa")))


def test_the_cli_module_imports_neither_the_decoder_nor_torch():
    """evaluate --help / --compare stay fast, and tasks/ is importable where pyctcdecode and kenlm are not."""
    import subprocess
    import sys

    code = ("import sys, megatron_speech.evaluate, megatron_speech.tasks.compare; "
            "assert not {'pyctcdecode', 'kenlm', 'torch'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
