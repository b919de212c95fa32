"""Comparing two evaluations of the same utterances: corpus error rates of run A and run B, the relative error
reduction of B over A, (A - B) / A (the headline: relative WER reduction), and its paired bootstrap interval.

    rows_a, rows_b = read_run(path_a), read_run(path_b)  # evaluate's per-utterance JSONL, or its --output-dir
    result = compare_runs(rows_a, rows_b, num_resamples=1000, seed=0, confidence=0.95)

Rows are matched by (set, id) and must cover the same utterances with the same references (else a ValueError
names what differs). Groups: overall, each set (when there are several) and each language (rows with a language
label). Paired bootstrap: resample a group's utterances with replacement, the same draw for both runs, and recompute
both corpus rates (sum of edits / sum of units) and the relative reduction; the interval is the percentile interval
of the resampled reductions (resamples where A has no errors, so no reduction is defined, are left out).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

# metric -> (errors, units) columns of the per-utterance rows, by task (metrics.utterance_scores writes them)
RATES = {"asr": {"wer": ("word_edits", "num_words"), "cer": ("unit_edits", "num_units")},
         "phoneme": {"per": ("unit_edits", "num_units")},
         "speaker": {"error": ("unit_edits", "num_units")},
         "emotion": {"error": ("unit_edits", "num_units")}}
HYPOTHESES = "hypotheses.jsonl"  # the per-utterance file in an evaluate --output-dir


def read_run(path: str) -> list[dict[str, Any]]:
    """The per-utterance rows of a run: a JSONL file, or a directory holding hypotheses.jsonl."""
    if os.path.isdir(path):
        path = os.path.join(path, HYPOTHESES)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no per-utterance file (write one with evaluate --output-dir DIR or "
                                "--output FILE)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    missing = [k for k in ("id", "task", "reference", "unit_edits", "num_units") if rows and k not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: {'empty' if not rows else f'rows lack {missing}'}; rerun evaluate with this "
                         "version to write per-utterance error counts")
    return rows


def _keyed(rows: list[dict[str, Any]], name: str) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row.get("set") or "", str(row["id"]))
        if key in out:
            raise ValueError(f"run {name}: utterance {key[1]!r} of set {key[0]!r} appears twice; ids must be unique")
        out[key] = row
    return out


def match_runs(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """Pairs (row of A, row of B) over the same utterances, in A's order; ValueError naming what differs."""
    tasks = {r["task"] for r in rows_a} | {r["task"] for r in rows_b}
    if len(tasks) != 1:
        raise ValueError(f"runs of different tasks ({sorted(tasks)}) cannot be compared")
    a, b = _keyed(rows_a, "A"), _keyed(rows_b, "B")
    only_a, only_b = [k for k in a if k not in b], [k for k in b if k not in a]
    if only_a or only_b:
        def show(keys):
            return ", ".join(f"{s}:{i}" if s else i for s, i in keys[:5]) + (" ..." if len(keys) > 5 else "")
        raise ValueError(f"the runs cover different utterances: {len(only_a)} only in A ({show(only_a)}), "
                         f"{len(only_b)} only in B ({show(only_b)}); evaluate both on the same manifest")
    differ = [k for k in a if a[k]["reference"] != b[k]["reference"] or a[k].get("language") != b[k].get("language")]
    if differ:
        s, i = differ[0]
        raise ValueError(f"{len(differ)} utterances have different references or languages in the two runs, e.g. "
                         f"{i!r}: {a[differ[0]]['reference']!r} vs {b[differ[0]]['reference']!r}")
    return [(a[k], b[k]) for k in a]


def paired_bootstrap(errors_a: np.ndarray, errors_b: np.ndarray, units: np.ndarray, num_resamples: int, seed: int,
                     confidence: float) -> tuple[float, float]:
    """Percentile interval of the relative reduction (rate_a - rate_b) / rate_a over resampled utterances.
    errors_a, errors_b, units: [N] per-utterance counts. (nan, nan) when no resample has a defined reduction."""
    rng = np.random.default_rng(seed)
    n = len(units)
    draws = []
    chunk = max(1, 2_000_000 // max(n, 1))  # indices [chunk, N] at a time: bounded memory on large test sets
    for start in range(0, num_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, num_resamples - start), n))
        ea, eb, u = errors_a[idx].sum(1), errors_b[idx].sum(1), units[idx].sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            draws.append(((ea - eb) / ea)[(ea > 0) & (u > 0)])  # the units cancel in the ratio of rates
    values = np.concatenate(draws)
    if not values.size:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def compare_runs(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], num_resamples: int = 1000,
                 seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """{"task", "num_utterances", "num_resamples", "confidence", "groups": {group: {metric: {"a", "b",
    "relative_reduction", "interval": [low, high]}, "num_utterances"}}}; groups "overall", "set=S", "language=L"."""
    pairs = match_runs(rows_a, rows_b)
    task = pairs[0][0]["task"]
    groups: dict[str, list[int]] = {"overall": list(range(len(pairs)))}
    sets = sorted({a.get("set") or "" for a, _ in pairs})
    for k, (a, _) in enumerate(pairs):
        if len(sets) > 1:
            groups.setdefault(f"set={a.get('set') or ''}", []).append(k)
        if a.get("language"):
            groups.setdefault(f"language={a['language']}", []).append(k)
    out: dict[str, Any] = {"task": task, "num_utterances": len(pairs), "num_resamples": num_resamples,
                           "confidence": confidence, "groups": {}}
    for group, members in groups.items():
        entry: dict[str, Any] = {"num_utterances": len(members)}
        for metric, (errors, units) in RATES[task].items():
            ea = np.asarray([pairs[k][0][errors] for k in members], dtype=np.float64)
            eb = np.asarray([pairs[k][1][errors] for k in members], dtype=np.float64)
            u = np.asarray([pairs[k][0][units] for k in members], dtype=np.float64)
            rate_a, rate_b = ea.sum() / max(u.sum(), 1.0), eb.sum() / max(u.sum(), 1.0)
            reduction = (rate_a - rate_b) / rate_a if rate_a > 0 else float("nan")
            low, high = paired_bootstrap(ea, eb, u, num_resamples, seed, confidence)
            entry[metric] = {"a": rate_a, "b": rate_b, "relative_reduction": reduction, "interval": [low, high]}
        out["groups"][group] = entry
    return out


def format_comparison(result: dict[str, Any]) -> list[str]:
    """Printable lines: one per group and metric."""
    pct = int(round(result["confidence"] * 100))
    lines = [f"{result['task']}: {result['num_utterances']} utterances, relative error reduction of B over A, "
             f"(A - B) / A, with a {pct}% paired bootstrap interval ({result['num_resamples']} resamples)",
             f"  {'group':<24} {'metric':<6} {'A':>8} {'B':>8} {'reduction':>10}  interval"]
    for group, entry in result["groups"].items():
        for metric in RATES[result["task"]]:
            m = entry[metric]
            low, high = m["interval"]
            lines.append(f"  {group:<24} {metric:<6} {m['a']:8.4f} {m['b']:8.4f} {m['relative_reduction']:+10.1%}"
                         f"  [{low:+.1%}, {high:+.1%}]  ({entry['num_utterances']} utterances)")
    return lines
