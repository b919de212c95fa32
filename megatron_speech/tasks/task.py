"""A fine-tuning task: its head kind, the manifest key of its label, its output vocabulary, and how a label becomes
targets and outputs become text.

    task = Task.from_config(cfg.finetune)                 # needs cfg.finetune.labels (collect_labels fills them)
    task.target(row_label, uid)  -> int64 [N] (CTC: token ids, 1.. ; 0 is the blank) or [1] (class id)
    task.units(row_label)        -> reference units scored by the metric (phonemes, or characters)

| task    | head               | default label key | units (CTC) or classes                          | metrics      |
|---------|--------------------|-------------------|-------------------------------------------------|--------------|
| phoneme | CTC                | phonemes          | space-separated phonemes (word gaps dropped)    | PER          |
| asr     | CTC                | text              | characters of the normalized text, "|" for gaps | WER, CER     |
| speaker | mean-pool + linear | speaker           | the label's value as text                       | accuracy     |
| emotion | mean-pool + linear | emotion           | the label's value as text                       | accuracy, UA |

UA = unweighted accuracy, the mean of the per-class recalls.

The demo has no emotion data: it runs `emotion` on a prosody-style label, label_key=arousal_proxy, and every log
and metrics line carries the label key so the stand-in is never reported as emotion (docs/design.md §8).

Text normalization for asr (`normalize_text`): Unicode NFC, lower case, every character that is not a letter, a
digit or an apostrophe becomes a space, runs of spaces collapse. WER and CER are computed on normalized text.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = {"phoneme": "ctc", "asr": "ctc", "speaker": "classification", "emotion": "classification"}
DEFAULT_LABEL_KEYS = {"phoneme": "phonemes", "asr": "text", "speaker": "speaker", "emotion": "emotion"}
BLANK = "<blank>"  # CTC index 0 (exported to transformers as its pad token, "<pad>")
WORD_GAP = "|"  # asr's token between words (transformers' word_delimiter_token)


def normalize_text(text: str) -> str:
    """Lower case, letters / digits / apostrophes only, single spaces (see the module docstring)."""
    text = unicodedata.normalize("NFC", text).lower()
    kept = "".join(c if (c.isalpha() or c.isdigit() or c == "'") else " " for c in text)
    return " ".join(kept.split())


@dataclass(frozen=True)
class Task:
    """One task with its vocabulary (`labels`: CTC tokens after the blank, or class names, in output order)."""

    name: str
    label_key: str
    labels: tuple[str, ...]

    @classmethod
    def from_config(cls, ft) -> Task:
        """From a config.FinetuneConfig whose labels are known."""
        if ft.task not in KINDS:
            raise ValueError(f"finetune.task={ft.task!r}: pick one of {sorted(KINDS)}")
        if not ft.labels:
            raise ValueError("finetune.labels is empty: collect them from the training data first (collect_labels)")
        return cls(ft.task, ft.label_key or DEFAULT_LABEL_KEYS[ft.task], tuple(ft.labels))

    @property
    def kind(self) -> str:
        """"ctc" or "classification"."""
        return KINDS[self.name]

    @property
    def num_outputs(self) -> int:
        """Head outputs: the vocabulary plus the blank (CTC), or the classes."""
        return len(self.labels) + (1 if self.kind == "ctc" else 0)

    @property
    def describe(self) -> str:
        """`task (label_key)`, as logs and summaries name it: e.g. `emotion (arousal_proxy)`."""
        return f"{self.name} ({self.label_key})"

    # ---- labels -> units and targets ------------------------------------------------------------------------

    def units(self, value: Any) -> list[str]:
        """The reference units of a label value: phonemes, characters (asr; "|" between words), or [class]."""
        if self.name == "phoneme":
            return [str(v) for v in value] if isinstance(value, list) else str(value).split()
        if self.name == "asr":
            return list(normalize_text(str(value)).replace(" ", WORD_GAP))
        return [class_name(value)]

    def target(self, value: Any, uid: str, strict: bool = True) -> np.ndarray:
        """int64 targets of one label value. CTC: token ids (1-based; 0 is the blank); classification: [class id].
        strict (training): a unit outside the vocabulary is a ValueError naming the utterance; otherwise CTC drops
        it (the metric still counts it, as the model can never emit it) and an unknown class gives [-1]."""
        index = self._index
        units = self.units(value)
        unknown = [u for u in units if u not in index]
        if unknown and strict:
            raise ValueError(f"utterance {uid!r}: {self.label_key} {unknown[:5]} not in finetune.labels "
                             f"({len(self.labels)} entries); leave finetune.labels empty to collect them from "
                             "the training data, or add them")
        if self.kind == "ctc":
            return np.asarray([index[u] + 1 for u in units if u in index], dtype=np.int64)
        return np.asarray([index.get(units[0], -1)], dtype=np.int64)

    @property
    def _index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    # ---- outputs -> units ----------------------------------------------------------------------------------

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """CTC output ids (blank already removed, 1-based) -> tokens."""
        return [self.labels[i - 1] for i in ids]

    def words(self, units: list[str]) -> list[str]:
        """asr: characters (with "|" gaps) -> normalized words."""
        return "".join(units).replace(WORD_GAP, " ").split()


def class_name(value: Any) -> str:
    """A class label as text (manifest values may be numbers)."""
    return value if isinstance(value, str) else str(value)


def collect_labels(task_name: str, values: Iterable[Any]) -> list[str]:
    """The vocabulary of a task from the training labels: sorted distinct units (CTC) or classes."""
    probe = Task(task_name, DEFAULT_LABEL_KEYS[task_name], ())
    found: set[str] = set()
    for value in values:
        found.update(probe.units(value))
    if task_name == "asr":
        found.add(WORD_GAP)
    return sorted(found)
