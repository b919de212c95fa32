"""Launchers without a cluster: the sbatch scripts' decisions (requeue on 75 and only then, the restart limit,
signal forwarding, container flags) against stand-in `srun`/`scontrol`/`python` executables; `--dry-run`; the
Dockerfile lint; launch/local.sh for real with 2 CPU processes. The real-Slurm run is tests/cluster/test_slurm.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_speech.config import load_config
from megatron_speech.dry_run import format_plan, make_plan, model_state_bytes, parameter_counts, split_args
from tests.fixtures import ROOT, write_split

SCRIPTS = ["launch/pretrain_xl_4x8.sbatch", "launch/finetune.sbatch", "launch/preprocess.sbatch", "launch/local.sh",
           "launch/common.sh", "tests/slurm/cluster.sh"]


# ------------------------------------------------------------------------------------------------------------
# Static checks


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (Debian package `shellcheck`)")
    out = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_sbatch_directives():
    text = (ROOT / "launch/pretrain_xl_4x8.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert directives["nodes"] == "4" and directives["ntasks-per-node"] == "8" and directives["gpus-per-node"] == "8"
    assert directives["signal"] == "USR1@300" and "requeue" in directives and directives["open-mode"] == "append"
    # every directive precedes the first command (sbatch stops reading them there)
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    # What it must and must not install, whatever the linter says.
    assert 'pip install --no-deps "megatron-core==0.16.1"' in text
    commands = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    pip_lines = " ".join(re.findall(r"pip install[^\n&]*", commands))
    for forbidden in ("apex", "transformer-engine", "transformer_engine", "torch==", " torch "):
        assert forbidden not in pip_lines, forbidden
    assert "/opt/torch-version.txt" in text  # the build proves the container's torch is untouched
    hadolint = _hadolint()
    if hadolint:
        out = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    else:  # a minimal syntax check: known instructions, ARG/FROM first, no dangling continuation
        instructions = {"FROM", "ARG", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "SHELL", "CMD", "ENTRYPOINT",
                        "LABEL", "USER", "EXPOSE", "VOLUME", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}
        lines, continued = [], False
        for line in text.splitlines():
            if not continued and line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.split()[0])
            continued = line.rstrip().endswith("\\")
        assert not continued and set(lines) <= instructions, lines
        assert lines[0] in ("ARG", "FROM") and "FROM" in lines
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ------------------------------------------------------------------------------------------------------------
# The sbatch scripts' logic, with stand-ins for srun, scontrol and python


FAKE_SRUN = """#!/usr/bin/env bash
# srun [options] command...: record the options, then become the command (as one task would)
opts=()
while [[ $# -gt 0 && $1 == -* ]]; do opts+=("$1"); shift; done
echo "srun ${opts[*]} :: $*" >> "$FAKE_LOG"
export SLURM_PROCID=0 SLURM_NODEID=0 SLURM_LOCALID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
if [[ $1 == show && $2 == hostnames ]]; then echo node-a; echo node-b; fi
"""
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$FAKE_LOG"
echo "env RANK=${RANK-unset} WORLD_SIZE=${WORLD_SIZE-unset} LOCAL_RANK=${LOCAL_RANK-unset}" >> "$FAKE_LOG"
if [[ $* == *megatron_speech.dry_run* || $* == *--dry-run* ]]; then exit "${FAKE_DRY_RC:-0}"; fi
if [[ -n ${FAKE_WAIT_SIGNAL:-} ]]; then
    trap 'echo "python got USR1" >> "$FAKE_LOG"; exit 75' USR1
    trap 'echo "python got TERM" >> "$FAKE_LOG"; exit 143' TERM
    echo "python waiting" >> "$FAKE_LOG"
    for _ in $(seq 300); do sleep 0.1; done
    exit 1
fi
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "CONTAINER_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), PYTHON=str(bin_dir / "python"),
               SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4242", SLURM_NTASKS="32", SLURM_CPUS_PER_TASK="8",
               SLURM_JOB_NODELIST="node-[a-b]")
    return env, log


def run_sbatch(env, script="launch/pretrain_xl_4x8.sbatch", *args, **extra):
    proc = subprocess.run(["bash", script, *args], cwd=ROOT, env=dict(env, **extra), capture_output=True,
                          text=True, timeout=60)
    return proc


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_done_runs_dry_run_then_training_once(fakes):
    env, log = fakes
    proc = run_sbatch(env, "launch/pretrain_xl_4x8.sbatch", "data.prefix=/d/en", SAVE_DIR="/shared/runs/x")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls(log)
    dry = [c for c in lines if c.startswith("python") and "dry_run" in c]
    train = [c for c in lines if c.startswith("python") and "megatron_speech.pretrain" in c]
    assert dry == ["python -m megatron_speech.dry_run --config configs/xl.yaml "
                   "train.save_dir=/shared/runs/x data.prefix=/d/en --world-size 32"]
    assert train == ["python -m megatron_speech.pretrain --config configs/xl.yaml train.save_dir=/shared/runs/x "
                     "data.prefix=/d/en"]
    step = next(c for c in lines if c.startswith("srun") and "ms-task" in c)
    assert "--label" in step and "--kill-on-bad-exit=0" in step and "--wait=60" in step
    assert "--cpus-per-task=8" in step and "--container" not in step
    assert not any("requeue" in c for c in lines)
    assert "MASTER_ADDR=node-a" in proc.stdout and "exited 0: done" in proc.stdout


def test_preempted_requeues(fakes):
    env, log = fakes
    proc = run_sbatch(env, FAKE_RC="75", SLURM_RESTART_COUNT="3", MAX_REQUEUES="4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scontrol requeue 4242" in calls(log)
    assert "exited 75 (preempted, checkpoint saved): requeueing (restart 4 of at most 4)" in proc.stdout


def test_preempted_at_the_restart_limit_is_not_requeued(fakes):
    env, log = fakes
    proc = run_sbatch(env, FAKE_RC="75", SLURM_RESTART_COUNT="4", MAX_REQUEUES="4")
    assert proc.returncode == 75
    assert not any("requeue" in c for c in calls(log)) and "not requeuing" in proc.stdout


def test_peer_failure_requeues_a_few_times(fakes):
    env, log = fakes
    proc = run_sbatch(env, FAKE_RC="4", SLURM_RESTART_COUNT="1")
    assert proc.returncode == 0 and "scontrol requeue 4242" in calls(log), proc.stdout
    assert "requeueing (restart 2 of at most 2)" in proc.stdout
    proc = run_sbatch(env, FAKE_RC="4", SLURM_RESTART_COUNT="2")
    assert proc.returncode == 4 and calls(log).count("scontrol requeue 4242") == 1, proc.stdout


# The launcher's decision table (launch/common.sh): srun's exit code -> requeue or not. 128 + N is a rank killed
# by signal N before Python could act: NCCL's watchdog abort on a dead or hung peer (134), srun --wait's SIGKILL
# or the OOM killer (137), a SIGTERM during start-up (143), a segfault (139): the bounded failure requeue of 4.
@pytest.mark.parametrize("code,requeued,says", [
    (0, False, "exited 0: done"),
    (75, True, "exited 75 (preempted, checkpoint saved): requeueing (restart 1 of at most 20)"),
    (3, False, "exited 3: diverged"),
    (4, True, "exited 4 (a peer rank died or hung; resuming from the last checkpoint): requeueing (restart 1 of at "
              "most 2)"),
    (5, False, "exited 5: a checkpoint save failed"),
    (134, True, "exited 134 (a rank was killed by SIGABRT: NCCL's watchdog abort"),
    (137, True, "exited 137 (a rank was killed by SIGKILL"),
    (143, True, "exited 143 (a rank was killed by SIGTERM"),
    (139, True, "exited 139 (a rank was killed by SIGSEGV"),
    (1, False, "failed with exit code 1; not requeuing"),
    (2, False, "failed with exit code 2; not requeuing"),
])
def test_exit_code_decisions(fakes, code, requeued, says):
    env, log = fakes
    proc = run_sbatch(env, FAKE_RC=str(code))
    assert says in proc.stdout, proc.stdout + proc.stderr
    assert ("scontrol requeue 4242" in calls(log)) == requeued, proc.stdout
    assert proc.returncode == (0 if requeued else code), proc.stdout  # requeued: Slurm restarts the job


@pytest.mark.parametrize("code", [134, 137, 143])
def test_a_rank_killed_by_a_signal_is_requeued_only_a_few_times(fakes, code):
    env, log = fakes
    proc = run_sbatch(env, FAKE_RC=str(code), SLURM_RESTART_COUNT="1")
    assert proc.returncode == 0 and "requeueing (restart 2 of at most 2)" in proc.stdout, proc.stdout
    proc = run_sbatch(env, FAKE_RC=str(code), SLURM_RESTART_COUNT="2")
    assert proc.returncode == code and "not requeuing" in proc.stdout, proc.stdout
    assert calls(log).count("scontrol requeue 4242") == 1


def test_stale_launcher_variables_do_not_reach_the_tasks(fakes):
    """sbatch exports the submitting shell's environment: a RANK left there by torchrun or by hand would give every
    task the same rank (the driver trusts RANK when set)."""
    env, log = fakes
    proc = run_sbatch(env, RANK="5", WORLD_SIZE="9", LOCAL_RANK="3", LOCAL_WORLD_SIZE="9", GROUP_RANK="1",
                      TORCHELASTIC_RUN_ID="old")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = [c for c in calls(log) if c.startswith("env ")]
    assert seen and all(c == "env RANK=unset WORLD_SIZE=unset LOCAL_RANK=unset" for c in seen), seen


def test_master_port_outside_the_ephemeral_range(monkeypatch):
    """The srun path derives MASTER_PORT from the job id; Linux's ephemeral ports (32768-60999) may be held by
    any outgoing connection on the node."""
    from megatron_speech.parallel import initialize

    # env_from_slurm writes these into os.environ itself: registered with monkeypatch first, so that they are
    # restored (absent) after the test and cannot reach later tests' subprocesses
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.setenv(key, "")
    ports = set()
    for job in (0, 1, 12_767, 12_768, 13_000, 19_999, 20_000, 31_999, 987_654_321):
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("SLURM_PROCID", "0")
        monkeypatch.setenv("SLURM_JOB_ID", str(job))
        monkeypatch.setenv("MASTER_ADDR", "node-a")
        initialize.env_from_slurm()
        port = int(os.environ["MASTER_PORT"])
        assert 1024 < port < 32_768, (job, port)
        ports.add(port)
    assert len(ports) >= 7  # and different jobs mostly different ones
    monkeypatch.setenv("MASTER_PORT", "29400")  # a port set by the user is kept
    monkeypatch.delenv("RANK")
    initialize.env_from_slurm()
    assert os.environ["MASTER_PORT"] == "29400"


def test_failed_dry_run_starts_nothing(fakes):
    env, log = fakes
    proc = run_sbatch(env, FAKE_DRY_RC="2")
    assert proc.returncode == 2
    assert not any("megatron_speech.pretrain" in c for c in calls(log)), calls(log)


def _signal_the_batch_shell(env: dict, log, sig: int) -> tuple[str, subprocess.Popen]:
    """Run the sbatch script with a training step that waits, send the batch shell `sig`; (output, process)."""
    proc = subprocess.Popen(["bash", "launch/pretrain_xl_4x8.sbatch"], cwd=ROOT, env=dict(env, FAKE_WAIT_SIGNAL="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while "python waiting" not in calls(log):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    return out, proc


def test_usr1_to_the_batch_shell_reaches_the_training(fakes):
    """`--signal=B:USR1@N` / `scancel --batch --signal=USR1`: the batch shell forwards it to the step."""
    env, log = fakes
    out, proc = _signal_the_batch_shell(env, log, signal.SIGUSR1)
    assert "python got USR1" in calls(log), out
    assert "scontrol requeue 4242" in calls(log) and proc.returncode == 0, out


def test_term_to_the_batch_shell_leaves_the_decision_to_slurm(fakes):
    """scancel / Slurm's own preemption TERM the batch shell too: a rank's 143 then is not a failure to requeue."""
    env, log = fakes
    out, proc = _signal_the_batch_shell(env, log, signal.SIGTERM)
    assert "python got TERM" in calls(log), out
    assert "after TERM to the job: Slurm ends or requeues it" in out, out
    assert not any("requeue" in c for c in calls(log)) and proc.returncode == 143, out


def test_container_flags(fakes):
    env, log = fakes
    proc = run_sbatch(env, CONTAINER_IMAGE="/shared/img.sqsh", CONTAINER_MOUNTS="/shared:/shared")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sruns = [c for c in calls(log) if c.startswith("srun")]
    assert len(sruns) == 2  # the dry run and the training both run in the container
    for c in sruns:
        assert "--container-image=/shared/img.sqsh" in c and "--container-mounts=/shared:/shared" in c
        assert f"--container-workdir={ROOT}" in c and "--no-container-mount-home" in c
        # one named container: the training step reuses the dry run's instead of importing the image again
        assert "--container-name=megatron-speech-4242" in c


def test_finetune_sbatch(fakes):
    env, log = fakes
    proc = run_sbatch(env, "launch/finetune.sbatch", "optim.lr=1e-4")
    assert proc.returncode != 0 and "TASK" in proc.stderr
    proc = run_sbatch(env, "launch/finetune.sbatch", "optim.lr=1e-4", TASK="phoneme")
    assert proc.returncode != 0 and "PRETRAINED" in proc.stderr
    proc = run_sbatch(env, "launch/finetune.sbatch", "optim.lr=1e-4", TASK="phoneme", PRETRAINED="/ckpt",
                      FAKE_RC="75")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c for c in calls(log) if c.startswith("python")] == [
        "python -m megatron_speech.finetune --config configs/finetune/phoneme.yaml pretrained=/ckpt optim.lr=1e-4"]
    assert "scontrol requeue 4242" in calls(log)


# ------------------------------------------------------------------------------------------------------------
# Dry run


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch_shards")
    rng = np.random.default_rng(0)
    utterances = [(f"u{i}", (rng.standard_normal(int(rng.uniform(2, 4) * 16_000)) * 3000).astype(np.int16),
                   {"language": "xx"}) for i in range(16)]
    prefix = str(root / "noise")
    write_split(prefix, "train", utterances[:12])
    write_split(prefix, "valid", utterances[12:])
    return prefix


def test_split_args():
    assert split_args(["--config", "c.yaml", "--dry-run", "--world-size", "8", "a.b=1"]) == (
        ["--config", "c.yaml", "a.b=1"], True, 8)
    assert split_args(["--world-size=4", "--dry-run"]) == ([], True, 4)
    for bad in (["--world-size", "4"], ["--dry-run", "--world-size", "0"], ["--dry-run", "--world-size", "x"],
                ["--dry-run", "--world-size"]):
        with pytest.raises(ValueError):
            split_args(bad)


def test_xl_plan_on_4x8(shards):
    cfg = load_config(str(ROOT / "configs/xl.yaml"), [f"data.prefix={shards}", "data.noise_dir="])
    plan = make_plan(cfg, 32, env={})
    assert not plan.problems and (plan.tp, plan.dp) == (1, 32)
    assert plan.params_total == plan.params_per_gpu and abs(plan.params_total - 317.4e6) < 0.1e6
    # megatron's distributed optimizer, fp16 weights, fp32 grads: 2 + 4 + 12 / DP bytes per parameter (+ EMA)
    assert plan.state == model_state_bytes(plan.params_total, "fp16", 32, True, True)
    assert sum(plan.state.values()) == pytest.approx(plan.params_total * (2 + 4 + 12 / 32 + 4))
    assert plan.max_crop_frames == 999 and plan.max_crop_batch == 3
    assert 2 < sum(plan.activations_max_crop.values()) / 2**30 < 8  # Korthikanti-style estimate, fp16
    # at TP=2 + SP the transformer's matmul weights and every activation are split
    tp2 = make_plan(load_config(str(ROOT / "configs/xl.yaml"), [
        f"data.prefix={shards}", "data.noise_dir=", "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true"]), 32,
        env={})
    assert tp2.dp == 16 and tp2.params_per_gpu == sum(parameter_counts(cfg.model, 2).values())
    assert sum(tp2.activations_max_crop.values()) < 0.6 * sum(plan.activations_max_crop.values())


@pytest.mark.parametrize("change,world,expected", [
    ({"tensor_model_parallel_size": 2}, 3, "must divide the world size 3"),
    ({"tensor_model_parallel_size": 3}, 24, "must divide model.num_attention_heads=16"),
    ({"prefix": ["/nonexistent/prefix"]}, 32, "no shards /nonexistent/prefix_train_NNNNN"),
    ({"prefix": []}, 32, "data.prefix is empty"),
    ({"noise_dir": "/nonexistent/musan"}, 32, "data.noise_dir='/nonexistent/musan' is neither a MUSAN folder"),
])
def test_plan_names_the_problem(change, world, expected, shards):
    cfg = load_config(str(ROOT / "configs/xl.yaml"), [f"data.prefix={shards}"])
    for key, value in change.items():  # set after loading: load_config itself refuses a TP of 3 for 16 heads
        setattr(cfg.data if key in ("prefix", "noise_dir") else cfg.parallel, key, value)
    plan = make_plan(cfg, world, env={})
    assert any(expected in p for p in plan.problems), plan.problems
    assert "PROBLEMS" in format_plan(plan)


def test_dry_run_cli_through_the_driver(shards):
    env = dict(os.environ, SLURM_NTASKS="32")
    env.pop("WORLD_SIZE", None)
    out = subprocess.run([sys.executable, "-m", "megatron_speech.pretrain", "--config", "configs/xl.yaml",
                          "--dry-run", f"data.prefix={shards}", "data.noise_dir="], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "world size 32 (SLURM_NTASKS)" in out.stdout and "32 GPUs = TP 1 x DP 32" in out.stdout
    assert "119 GFLOP per audio-second" in out.stdout and out.stdout.rstrip().endswith("ok")


def test_dry_run_module_imports_no_torch(shards):
    code = textwrap.dedent(f"""
        import sys
        from megatron_speech import dry_run
        rc = dry_run.main(["--config", "configs/tiny.yaml", "--world-size", "2", "data.prefix={shards}"])
        assert rc == 0, rc
        # a problem: exit status 2 and the key named
        assert dry_run.main(["--config", "configs/xl.yaml", "--world-size", "6",
                             "parallel.tensor_model_parallel_size=4", "data.prefix={shards}"]) == 2
        assert "torch" not in sys.modules, "the dry run imported torch"
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 GPUs = TP 1 x DP 2" in out.stdout and "must divide the world size 6" in out.stdout


# ------------------------------------------------------------------------------------------------------------
# launch/local.sh for real


def test_local_sh_usage():
    out = subprocess.run(["bash", "launch/local.sh"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "NPROC CONFIG" in out.stdout
    out = subprocess.run(["bash", "launch/local.sh", "two", "configs/tiny.yaml"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 2 and "NPROC must be a positive integer" in out.stderr


@pytest.mark.slow
def test_local_sh_trains_with_two_processes(tmp_path, shards):
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", "launch/local.sh", "2", "configs/tiny.yaml", f"data.prefix={shards}",
                          "train.max_steps=3", f"train.save_dir={tmp_path}", "train.eval_interval=0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 GPUs = TP 1 x DP 2" in out.stdout and "world 2 = TP 1 x DP 2" in out.stdout
    assert (tmp_path / "latest").read_text().strip() == "3"
