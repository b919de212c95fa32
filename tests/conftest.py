"""Shared fixtures. Helper functions live in tests/fixtures.py (inputs), tests/runs.py (training runs),
tests/audio_files.py (audio and preprocessing outputs), tests/hf_reference.py (transformers parity) and tests/dist.py
(N local ranks); no test module imports another."""

from __future__ import annotations

import pytest

from tests.fixtures import write_tone_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Synthetic tonal audio (learnable structure), a train and a valid split."""
    return write_tone_shards(tmp_path_factory.mktemp("shards"), 48, 8)
