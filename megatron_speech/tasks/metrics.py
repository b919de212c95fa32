"""Scoring: greedy CTC decoding, edit distances, and per-batch statistic sums that add up over micro-batches and
ranks into PER / WER / CER / accuracy / unweighted accuracy. Beam search (evaluate only) is in decoding.py.

Statistics are flat float64 vectors (`stat_names(task)` gives the layout) so that one all-reduce sums them over
every rank; metrics are ratios of the global sums (a corpus-level PER, not an average of per-utterance PERs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein

from .task import Task, normalize_text

COMMON = ("loss_sum", "num_utterances", "num_frames", "num_samples", "num_infeasible")


def edit_distance(ref: Sequence[Any], hyp: Sequence[Any]) -> int:
    """Levenshtein distance (substitutions + deletions + insertions) between two strings or two sequences of
    hashables (phonemes, words), by rapidfuzz: the engine jiwer scores with, in C++."""
    return Levenshtein.distance(ref, hyp)


def ctc_greedy(ids: np.ndarray, length: int, blank: int = 0) -> list[int]:
    """Best path: argmax ids [F] of one utterance -> its first `length` frames with repeats merged and blanks
    removed."""
    ids = np.asarray(ids[:length])
    if ids.size == 0:
        return []
    keep = np.ones(ids.size, dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    return [int(i) for i in ids[keep] if i != blank]


def stat_names(task: Task) -> list[str]:
    """Layout of a statistics vector."""
    names = list(COMMON)
    if task.kind == "ctc":
        names += ["unit_edits", "num_units"] + (["word_edits", "num_words"] if task.name == "asr" else [])
    else:
        names += ["correct", "num_unknown"]
        names += [f"correct/{c}" for c in task.labels] + [f"total/{c}" for c in task.labels]
    return names


def decode(task: Task, logits: torch.Tensor, num_frames: Sequence[int]) -> list[Any]:
    """Predictions of a batch: CTC token lists (greedy) or class names."""
    pred = logits.detach().argmax(dim=-1).cpu().numpy()
    if task.kind == "ctc":
        return [task.tokens(ctc_greedy(pred[b], int(num_frames[b]))) for b in range(pred.shape[0])]
    return [task.labels[int(p)] for p in pred]


def utterance_scores(task: Task, prediction: Any, reference: Any) -> dict[str, int]:
    """One utterance's error counts: unit_edits and num_units (PER's phonemes; CER's characters of the normalized
    text, spaces included; a classification's one label, wrong = 1 edit), and for asr word_edits and num_words.
    Corpus rates are sums of these over utterances: enough to recompute any metric from per-utterance rows."""
    if task.kind != "ctc":
        return {"unit_edits": int(prediction != task.units(reference)[0]), "num_units": 1}
    if task.name == "asr":
        ref_text, hyp_text = normalize_text(str(reference)), " ".join(task.words(prediction))
        return {"unit_edits": edit_distance(ref_text, hyp_text), "num_units": len(ref_text),
                "word_edits": edit_distance(ref_text.split(), hyp_text.split()), "num_words": len(ref_text.split())}
    ref = task.units(reference)
    return {"unit_edits": edit_distance(ref, prediction), "num_units": len(ref)}


def score(task: Task, predictions: list[Any], references: list[Any]) -> dict[str, float]:
    """Task-specific sums (the stat_names entries after COMMON) for predictions against raw label values."""
    out: dict[str, float] = {}
    if task.kind == "ctc":
        for name in stat_names(task)[len(COMMON):]:
            out[name] = 0.0
        for hyp, value in zip(predictions, references, strict=True):
            for name, count in utterance_scores(task, hyp, value).items():
                out[name] += count
        return out
    index = {c: i for i, c in enumerate(task.labels)}
    correct = np.zeros(len(task.labels))
    total = np.zeros(len(task.labels))
    unknown = 0
    for pred, value in zip(predictions, references, strict=True):
        ref = task.units(value)[0]
        if ref not in index:
            unknown += 1  # can never be right; counted in accuracy, outside the per-class recalls
            continue
        total[index[ref]] += 1
        correct[index[ref]] += pred == ref
    out["correct"], out["num_unknown"] = float(correct.sum()), float(unknown)
    for c, label in enumerate(task.labels):
        out[f"correct/{label}"] = float(correct[c])
        out[f"total/{label}"] = float(total[c])
    return out


def metrics(task: Task, stats: dict[str, float]) -> dict[str, float]:
    """Global sums -> metrics: loss (per utterance) and the task's (PER; WER and CER; accuracy, unweighted
    accuracy = mean per-class recall over the classes present)."""
    n = max(stats["num_utterances"], 1.0)
    out = {"loss": stats["loss_sum"] / n, "num_utterances": stats["num_utterances"]}
    if stats.get("num_infeasible"):
        out["num_infeasible"] = stats["num_infeasible"]
    if task.kind == "ctc":
        rate = stats["unit_edits"] / max(stats["num_units"], 1.0)
        if task.name == "asr":
            out["wer"] = stats["word_edits"] / max(stats["num_words"], 1.0)
            out["cer"] = rate
        else:
            out["per"] = rate
        return out
    out["accuracy"] = stats["correct"] / n
    recalls = [stats[f"correct/{c}"] / stats[f"total/{c}"] for c in task.labels if stats[f"total/{c}"] > 0]
    out["unweighted_accuracy"] = float(np.mean(recalls)) if recalls else 0.0
    if stats.get("num_unknown"):
        out["num_unknown_label"] = stats["num_unknown"]
    return out


def primary_metric(task: Task) -> tuple[str, bool]:
    """(the metric a task is judged by, whether higher is better)."""
    return {"phoneme": ("per", False), "asr": ("wer", False), "speaker": ("accuracy", True),
            "emotion": ("accuracy", True)}[task.name]
