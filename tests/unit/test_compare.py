"""evaluate --compare (tasks/compare.py): the paired bootstrap against scipy's, its properties, and the command on two
per-utterance files, with rates recomputed by jiwer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_speech.evaluate import main
from megatron_speech.tasks.compare import compare_runs, paired_bootstrap


def _counts(rng: np.random.Generator, n: int, rate_a: float, rate_b: float):
    units = rng.integers(3, 20, size=n).astype(np.float64)
    return rng.binomial(units.astype(int), rate_a).astype(float), rng.binomial(units.astype(int), rate_b).astype(
        float), units


def test_paired_bootstrap_matches_scipys():
    stats = pytest.importorskip("scipy.stats")
    ea, eb, u = _counts(np.random.default_rng(0), 300, 0.3, 0.24)

    def reduction(a, b, axis=-1):
        return (a.sum(axis) - b.sum(axis)) / a.sum(axis)

    theirs = stats.bootstrap((ea, eb), reduction, paired=True, vectorized=True, n_resamples=4000,
                             confidence_level=0.95, method="percentile", random_state=1).confidence_interval
    low, high = paired_bootstrap(ea, eb, u, 4000, seed=2, confidence=0.95)
    # two independent Monte Carlo estimates of the same percentiles (each seed moves them by ~0.003 here)
    assert low == pytest.approx(theirs.low, abs=0.01) and high == pytest.approx(theirs.high, abs=0.01)
    assert high - low > 0.05  # not degenerate


def test_bootstrap_properties():
    rng = np.random.default_rng(3)
    ea, eb, u = _counts(rng, 200, 0.3, 0.25)
    point = (ea.sum() - eb.sum()) / ea.sum()
    low, high = paired_bootstrap(ea, eb, u, 1000, 0, 0.95)
    assert low < point < high
    assert paired_bootstrap(ea, eb, u, 1000, 0, 0.95) == (low, high)  # seeded
    low4, high4 = paired_bootstrap(np.tile(ea, 4), np.tile(eb, 4), np.tile(u, 4), 1000, 0, 0.95)
    assert high4 - low4 < 0.7 * (high - low)  # ~1/2: the width shrinks as 1/sqrt(N)
    assert paired_bootstrap(ea, ea, u, 1000, 0, 0.95) == (0.0, 0.0)  # identical runs
    assert np.isnan(paired_bootstrap(np.zeros(5), np.ones(5), np.ones(5), 100, 0, 0.95)).all()  # A never errs


def _rows(hyps: dict[str, str], refs: dict[str, tuple[str, str]]) -> list[dict]:
    from megatron_speech.tasks.metrics import utterance_scores
    from megatron_speech.tasks.task import Task

    task = Task("asr", "text", tuple("abcdefghijklmnopqrstuvwxyz|"))
    return [{"id": uid, "set": "test.jsonl", "language": lang, "task": "asr", "reference": ref, "hypothesis": hyps[uid],
             **utterance_scores(task, list(hyps[uid].replace(" ", "|")), ref)} for uid, (lang, ref) in refs.items()]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_compare_command_per_language_and_refusals(tmp_path, capsys):
    jiwer = pytest.importorskip("jiwer")
    rng = np.random.default_rng(4)
    words = ["red", "green", "blue", "cyan", "black", "white"]
    refs, hyp_a, hyp_b = {}, {}, {}
    for k in range(40):
        ref = [str(rng.choice(words)) for _ in range(rng.integers(2, 7))]
        refs[f"u{k:02d}"] = ("de" if k % 2 else "fr", " ".join(ref))
        a = [w if rng.random() > 0.4 else str(rng.choice(words)) for w in ref]
        b = [w if rng.random() > 0.2 else str(rng.choice(words)) for w in ref]
        hyp_a[f"u{k:02d}"], hyp_b[f"u{k:02d}"] = " ".join(a), " ".join(b)
    run_a = tmp_path / "a"
    run_a.mkdir()
    _write(run_a / "hypotheses.jsonl", _rows(hyp_a, refs))  # an --output-dir
    file_b = _write(tmp_path / "b.jsonl", _rows(hyp_b, refs))  # a per-utterance file

    assert main(["--compare", str(run_a), file_b, "--metrics-json", str(tmp_path / "cmp.json")]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert set(result["groups"]) == {"overall", "language=de", "language=fr"}
    for group, lang in (("overall", None), ("language=de", "de"), ("language=fr", "fr")):
        ids = [u for u, (g, _) in refs.items() if lang in (None, g)]
        for metric, score in (("wer", jiwer.wer), ("cer", jiwer.cer)):
            wa = score([refs[u][1] for u in ids], [hyp_a[u] for u in ids])
            wb = score([refs[u][1] for u in ids], [hyp_b[u] for u in ids])
            got = result["groups"][group][metric]
            assert got["a"] == pytest.approx(wa) and got["b"] == pytest.approx(wb)
            assert got["relative_reduction"] == pytest.approx((wa - wb) / wa)
            assert got["interval"][0] < got["relative_reduction"] < got["interval"][1]
    assert "language=de" in out and "wer" in out

    rows = _rows(hyp_b, refs)
    _write(tmp_path / "short.jsonl", rows[:-3])
    assert main(["--compare", str(run_a), str(tmp_path / "short.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "3 only in A" in err and "u39" in err
    rows[0]["reference"] = "something else"
    _write(tmp_path / "other.jsonl", rows)
    assert main(["--compare", str(run_a), str(tmp_path / "other.jsonl")]) == 2
    assert "different references" in capsys.readouterr().err
    assert main(["--compare", str(run_a), str(tmp_path / "nothing")]) == 2
    assert "no per-utterance file" in capsys.readouterr().err


def test_identical_runs_compare_to_zero():
    refs = {"x": ("en", "a b c"), "y": ("en", "d e")}
    rows = _rows({"x": "a b", "y": "d f"}, refs)
    result = compare_runs(rows, rows, num_resamples=200)
    wer = result["groups"]["overall"]["wer"]
    assert wer["relative_reduction"] == 0.0 and wer["interval"] == [0.0, 0.0]
