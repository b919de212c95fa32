"""Slurm signals every process of a job step: megatron's checkpoint-writer Manager, spawned by a process's first
save, must survive USR1/TERM whoever saves (the loop, convert_from_hf, a test), or every later save of that process
breaks (BrokenPipeError from the Manager's queue)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.fixtures import ROOT

SCRIPT = textwrap.dedent("""
    import sys, time
    from megatron_speech.checkpoint.model_io import save_model_only
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import single_rank_groups
    from tests.fixtures import tiny_config
    from tests.runs import slurm_signals_to_children

    cfg = tiny_config()
    model = build_model(cfg.model, pg_collection=single_rank_groups())
    save_model_only(sys.argv[1] + "/a", model, cfg)  # spawns the Manager
    with slurm_signals_to_children() as signalled:
        time.sleep(1.0)
    assert signalled, "no spawned helper was signalled: the test no longer reaches megatron's Manager"
    save_model_only(sys.argv[1] + "/b", model, cfg)  # through the same Manager
    print("second save ok")
""")


def test_a_save_after_slurm_signalled_the_writer_manager(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "second save ok" in proc.stdout, proc.stderr[-3000:]
    assert (tmp_path / "b" / "latest").exists()
