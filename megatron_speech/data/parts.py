"""Which split and which part of a Slurm-array run an input belongs to (a hash of its id), the part prefixes'
names, and whether every part of a run finished. The writer (megatron_speech/preprocess/) assigns inputs with it;
the training data (`data.prefix='PREFIX_part*'`, dataset.py) reads the parts back with it."""

from __future__ import annotations

import hashlib
import json

SPLITS = ("train", "valid")


def is_valid(uid: str, seed: int, valid_fraction: float) -> bool:
    """Whether utterance `uid` belongs to the valid split: a hash of (seed, id), not its position."""
    digest = hashlib.blake2b(f"{seed}\0{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < valid_fraction * 2.0**64


def part_of(uid: str, num_parts: int) -> int:
    """The part (0 .. num_parts - 1) input `uid` belongs to: a hash of its id alone (salted apart from is_valid's,
    so every part keeps the same valid share), stable when other inputs are added or reordered."""
    digest = hashlib.blake2b(uid.encode(), digest_size=8, person=b"ms-part").digest()
    return int.from_bytes(digest, "little") % num_parts


def part_prefix(output_prefix: str, index: int) -> str:
    """The outputs' prefix of part `index`: PREFIX_part0003."""
    return f"{output_prefix}_part{index:04d}"


def parts_status(output_prefix: str, num_parts: int) -> tuple[list[str], list[str]]:
    """(complete, missing) part prefixes of a `num_parts`-part run at output_prefix, by their journals."""
    complete, missing = [], []
    for i in range(num_parts):
        p = part_prefix(output_prefix, i)
        try:
            with open(p + ".preprocess.json", encoding="utf-8") as f:
                done = json.load(f).get("complete", False)
        except (OSError, ValueError):
            done = False
        (complete if done else missing).append(p)
    return complete, missing
