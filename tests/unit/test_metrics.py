"""Edit distances and corpus WER / CER (tasks/metrics.py) against a textbook Levenshtein and against jiwer."""

from __future__ import annotations

import random

import pytest

from megatron_speech.tasks import metrics
from megatron_speech.tasks.task import Task, normalize_text

WORDS = ["the", "cat", "sat", "on", "mat", "naïve", "café", "größe", "日本語", "don't", "a", "ø"]


def reference_levenshtein(ref, hyp) -> int:
    """Wagner-Fischer, the full table: the definition, independent of rapidfuzz's bit-parallel algorithm."""
    table = [[i + j if i * j == 0 else 0 for j in range(len(hyp) + 1)] for i in range(len(ref) + 1)]
    for i in range(1, len(ref) + 1):
        for j in range(1, len(hyp) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1,
                              table[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]))
    return table[-1][-1]


def _mutate(rng: random.Random, seq: list, alphabet: list) -> list:
    out = list(seq)
    for _ in range(rng.randint(0, 4)):
        op = rng.choice("sdi")
        k = rng.randrange(len(out) + (op == "i")) if out or op == "i" else None
        if k is None:
            continue
        if op == "s":
            out[k] = rng.choice(alphabet)
        elif op == "d":
            del out[k]
        else:
            out.insert(k, rng.choice(alphabet))
    return out


def test_edit_distance_equals_the_textbook_table():
    rng = random.Random(0)
    chars = list("abcé日 '")
    phonemes = ["aa", "b", "tʃ", "iː", "ŋ"]
    pairs = [("", ""), ("", "abc"), ("abc", ""), ([], ["p1"]), (["p1", "p2"], []), ("kitten", "sitting"),
             ("naïve café", "naive cafe"), ("日本語", "日本"), ("a" * 300, "a" * 290 + "b" * 20)]
    for _ in range(150):
        ref = "".join(rng.choice(chars) for _ in range(rng.randint(0, 40)))
        pairs.append((ref, "".join(_mutate(rng, list(ref), chars))))
        ref_units = [rng.choice(phonemes) for _ in range(rng.randint(0, 30))]
        pairs.append((ref_units, _mutate(rng, ref_units, phonemes)))
        ref_words = [rng.choice(WORDS) for _ in range(rng.randint(0, 12))]
        pairs.append((ref_words, _mutate(rng, ref_words, WORDS)))
    long_ref = [rng.choice(phonemes) for _ in range(300)]  # beyond one 64-bit word of the bit-parallel kernel
    pairs.append((long_ref, _mutate(rng, long_ref, phonemes)[::-1]))
    for ref, hyp in pairs:
        assert metrics.edit_distance(ref, hyp) == reference_levenshtein(ref, hyp), (ref, hyp)


def test_corpus_wer_and_cer_equal_jiwers():
    jiwer = pytest.importorskip("jiwer")
    rng = random.Random(1)
    task = Task("asr", "text", tuple(sorted(set("".join(WORDS)) | {"|"})))
    raw_refs, refs, hyps, predictions = [], [], [], []
    for _ in range(200):
        ref = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
        raw_ref = ref.upper() + rng.choice(["", ".", "?!"])  # normalized away
        hyp_words = _mutate(rng, normalize_text(ref).split(), WORDS)
        if rng.random() < 0.05:
            hyp_words = []  # an empty hypothesis
        # as the CTC head emits it: characters with "|" gaps, sometimes doubled or at the ends
        tokens = list(("||" if rng.random() < 0.2 else "|").join(hyp_words)) + (["|"] if rng.random() < 0.2 else [])
        raw_refs.append(raw_ref)
        refs.append(normalize_text(raw_ref))
        hyps.append(" ".join(task.words(tokens)))
        predictions.append(tokens)
    sums = metrics.score(task, predictions, raw_refs)
    stats = {**dict.fromkeys(metrics.COMMON, 0.0), "num_utterances": float(len(refs)), **sums}
    got = metrics.metrics(task, stats)
    assert got["wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert got["cer"] == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)


def test_per_sums_per_utterance_counts():
    task = Task("phoneme", "phonemes", ("aa", "b", "c"))
    preds, refs = [["aa", "b"], [], ["c", "c", "c"]], ["aa b c", "b", ["c"]]
    rows = [metrics.utterance_scores(task, p, r) for p, r in zip(preds, refs, strict=True)]
    assert [(r["unit_edits"], r["num_units"]) for r in rows] == [(1, 3), (1, 1), (2, 1)]
    assert metrics.score(task, preds, refs) == {"unit_edits": 4.0, "num_units": 5.0}
