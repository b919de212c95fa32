"""The preprocessor's journal and summary: what a run has written so far (for resume), its fingerprint (inputs and
parameters), the summary it prints, and the binary indexes written last."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_speech.common.audio import SAMPLE_RATE
from megatron_speech.data.inputs import _OUTPUT_NAME, InputItem
from megatron_speech.data.parts import SPLITS
from megatron_speech.preprocess.shards import _fsync_dir

# --------------------------------------------------------------------------------------------------- the run


@dataclass
class Summary:
    """What a run did. Counts cover the whole job (resumed parts included); speed covers this session."""

    num_inputs: int
    num_train: int = 0
    num_valid: int = 0
    kept_samples: int = 0
    decoded_seconds: float = 0.0
    rejects: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    train_shards: int = 0
    valid_shards: int = 0
    num_cut_inputs: int = 0
    """Long unlabeled inputs cut into segments."""
    num_segments: int = 0
    """Segments those were cut into (kept or rejected; num_train + num_valid count the kept ones)."""
    part: tuple[int, int] | None = None
    resumed_at: int = 0
    session_decoded_seconds: float = 0.0
    wall_seconds: float = 0.0
    workers: int = 1

    @property
    def num_kept(self) -> int:
        return self.num_train + self.num_valid

    @property
    def kept_hours(self) -> float:
        return self.kept_samples / SAMPLE_RATE / 3600

    def real_time_factor(self) -> float:
        """Seconds of input audio decoded per wall-clock second in this session."""
        return self.session_decoded_seconds / max(self.wall_seconds, 1e-9)

    def format(self, prefix: str = "PREFIX") -> str:
        rejects = sum(self.rejects.values())
        of_part = f" (part {self.part[0]} of {self.part[1]})" if self.part else ""
        lines = [
            f"{self.num_inputs} files in{of_part}: {self.num_kept} kept ({self.num_train} train, {self.num_valid} "
            f"valid), {self.kept_hours:.3f} h at 16 kHz in {self.train_shards} train + {self.valid_shards} valid "
            "shards",
            f"{rejects} rejected" + (": " + ", ".join(f"{r} {n}" for r, n in sorted(self.rejects.items()))
                                     + f" (see {prefix}.rejects.jsonl)" if rejects else ""),
        ]
        if self.num_cut_inputs:
            files = "file" if self.num_cut_inputs == 1 else "files"
            lines.insert(1, f"{self.num_cut_inputs} long unlabeled {files} cut into {self.num_segments} segments "
                         "(each a kept utterance or a reject)")
        if self.warnings:
            lines.append("warnings on kept files: " + ", ".join(f"{w} {n}" for w, n in sorted(self.warnings.items())))
        if self.resumed_at:
            lines.append(f"resumed at file {self.resumed_at}")
        if self.session_decoded_seconds == 0:
            return "\n".join(lines)
        rtf = self.real_time_factor()
        lines.append(f"{self.session_decoded_seconds / 3600:.3f} h decoded in {self.wall_seconds:.1f} s: {rtf:.0f}x "
                     f"real time ({rtf / max(self.workers, 1):.0f}x per worker, {self.workers} workers)")
        return "\n".join(lines)


def _fingerprint(kind: str, items: list[InputItem], params: dict) -> str:
    h = hashlib.sha256(json.dumps([kind, params], sort_keys=True).encode())
    for it in items:
        h.update(json.dumps([it.source, it.id, it.labels, it.size, it.mtime_ns, it.reject],
                            sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path)


def _existing_outputs(prefix: str) -> list[str]:
    folder = os.path.dirname(os.path.abspath(prefix))
    base = os.path.basename(prefix)
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n.startswith(base) and _OUTPUT_NAME.fullmatch(n[len(base):]))


def _write_indexes(prefix: str, log: Callable[[str], None]) -> None:
    """The binary utterance index of each split (data/index.py), so that no trainer parses the manifests: built
    after the journal says complete (a crash in between leaves it to the trainer, which builds a missing one)."""
    from megatron_speech.data.index import ensure_index

    for split in SPLITS:
        ensure_index(prefix, split, log)


def _stats(s: Summary) -> dict:
    return {"num_train": s.num_train, "num_valid": s.num_valid, "kept_samples": s.kept_samples,
            "decoded_seconds": s.decoded_seconds, "rejects": dict(sorted(s.rejects.items())),
            "warnings": dict(sorted(s.warnings.items())), "num_cut_inputs": s.num_cut_inputs,
            "num_segments": s.num_segments}


def _fill_summary(summary: Summary, journal: dict) -> None:
    st = journal["stats"]
    summary.num_cut_inputs, summary.num_segments = st.get("num_cut_inputs", 0), st.get("num_segments", 0)
    summary.num_train, summary.num_valid = st.get("num_train", 0), st.get("num_valid", 0)
    summary.kept_samples, summary.decoded_seconds = st.get("kept_samples", 0), st.get("decoded_seconds", 0.0)
    summary.rejects, summary.warnings = dict(st.get("rejects", {})), dict(st.get("warnings", {}))
    splits = journal["splits"]
    summary.train_shards, summary.valid_shards = (len(splits[s]["shards"]) if splits[s] else 0 for s in SPLITS)


def _check_complete(prefix: str, journal: dict) -> None:
    folder = os.path.dirname(os.path.abspath(prefix))
    expected = [f"{prefix}_{s}.manifest.jsonl" for s in SPLITS] + [prefix + ".rejects.jsonl"]
    for s in SPLITS:
        for shard in journal["splits"][s]["shards"]:
            expected += [os.path.join(folder, shard["name"] + ext) for ext in (".bin", ".idx")]
    missing = [p for p in expected if not os.path.exists(p)]
    if missing:
        raise ValueError(f"{prefix} was completed, but {missing[0]} (and {len(missing) - 1} more) is gone since; "
                         f"delete {prefix}_* and {prefix}.* and run again")


def _load_journal(path: str, prefix: str, params: dict, fingerprint: str) -> dict | None:
    """The journal of an earlier run of the same job, None for a fresh start; ValueError when they differ."""
    if not os.path.exists(path):
        # A leftover journal temp file only means a crash before the first journal was in place.
        # Nor do a lock file (noise packing takes one before it starts) or an index built by a trainer.
        found = [n for n in _existing_outputs(prefix)
                 if not re.search(r"\.preprocess\.(json\.tmp|lock)$|\.index(\.lock|\.tmp\.\w+)?$", n)]
        if found:
            raise ValueError(f"{found[0]} (and {len(found) - 1} more) exist at --output-prefix {prefix} without "
                             f"{os.path.basename(path)}: not the outputs of a resumable run of this tool; delete "
                             "them or choose another --output-prefix")
        return None
    with open(path, encoding="utf-8") as f:
        journal = json.load(f)
    if journal.get("fingerprint") == fingerprint:
        return journal
    old = journal.get("params", {})
    changed = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in params.items() if old.get(k) != v]
    why = "; ".join(changed) if changed else \
        "the input files changed (a file added, removed, renamed, resized or modified, or a label edited)"
    state = "finished" if journal.get("complete") else "was interrupted"
    raise ValueError(f"{prefix} holds the outputs of another run, which {state} ({why}). To resume it, rerun with "
                     f"its arguments and inputs; to start over, delete {prefix}_* and {prefix}.* first; or choose "
                     "another --output-prefix")
