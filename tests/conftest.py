"""Shared fixtures, and how `make test` spreads the suite over processes (pytest-xdist, `--dist loadgroup`).

Helper functions live in tests/fixtures.py (inputs), tests/runs.py (training runs), tests/audio_files.py (audio and
preprocessing outputs), tests/hf_reference.py (transformers parity) and tests/dist.py (N local ranks); no test module
imports another.
"""

from __future__ import annotations

import pytest

from tests.fixtures import write_tone_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Synthetic tonal audio (learnable structure), a train and a valid split."""
    return write_tone_shards(tmp_path_factory.mktemp("shards"), 48, 8)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, a module whose tests share a module-scoped fixture (a corpus, a reference run, the Slurm cluster)
    runs on one worker, so that fixture is built once and never twice at the same time; the other tests are spread
    one by one. tryfirst: xdist reads the group marks in its own hook of this name."""
    if not hasattr(config, "workerinput"):
        return
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info else ()
        if any(d and d[-1].scope == "module" for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
