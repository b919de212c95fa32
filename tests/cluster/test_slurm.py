"""launch/pretrain_xl_4x8.sbatch, unchanged, on a real 2-node Slurm cluster brought up on this host
(tests/slurm/cluster.sh: munged, slurmctld, two slurmd), scaled down to 2 nodes x 1 task with the tiny config:
a run to completion, then USR1 -> save -> exit 75 -> self-requeue -> resume, checked from the job's own log and
its checkpoints; and the same with DataLoader workers and the signal landing after an interval checkpoint (Slurm
signals every process of the step: the workers and megatron's checkpoint-writer Manager must survive it). The
jobs are submitted from an environment holding stale RANK/WORLD_SIZE/LOCAL_RANK, as a shell that ran torchrun
would. Skipped (with the reason) where the Slurm packages are missing, except in CI (CI set): there a
missing package is a failure, so the stage cannot silently vanish."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures import ROOT, write_tone_shards

pytestmark = pytest.mark.slow

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
SCRIPT = "launch/pretrain_xl_4x8.sbatch"
# Scaled down: 2 nodes x 1 task on CPUs. The script's own --gpus-per-node=8 stays (the test nodes have 8
# fake GPUs each), and so do --signal, --requeue, --open-mode, --exclusive.
SHAPE = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"]


# The daemons live in sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def _need(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the Slurm stage must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [b for b in BINARIES if shutil.which(b, path=SEARCH_PATH) is None]
    if missing:
        _need(f"no Slurm here ({', '.join(missing)} missing): "
              "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        _need("the test Slurm cluster needs root (SlurmUser=root, an /etc/hosts entry)")
    workdir = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(["bash", "tests/slurm/cluster.sh", "up", str(workdir)], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, PATH=SEARCH_PATH))
    try:
        assert up.returncode == 0, f"cluster bring-up failed:\n{up.stdout}\n{up.stderr}"
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
        # sbatch exports the submitting environment: the script must not let these override Slurm's
        env.update(RANK="5", WORLD_SIZE="9", LOCAL_RANK="3")
        for line in (workdir / "env").read_text().splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            env[key] = value
        env.update(PATH=SEARCH_PATH, PYTHON=sys.executable, OMP_NUM_THREADS="1", CONFIG="configs/tiny.yaml")
        yield workdir, env
    finally:
        down = subprocess.run(["bash", "tests/slurm/cluster.sh", "down", str(workdir)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, PATH=SEARCH_PATH))
        print(down.stdout, down.stderr)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Synthetic tonal audio, as tests/conftest.py's `shards`, fewer utterances."""
    return write_tone_shards(tmp_path_factory.mktemp("slurm_shards"), 32, 4)


def sbatch(env: dict, *args: str, wait: bool = False) -> tuple[int, str]:
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    job = proc.stdout.strip().split(";")[0].splitlines()[0] if proc.stdout.strip() else ""
    assert job.isdigit(), f"sbatch failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}"
    return proc.returncode, job


def train_steps(save_dir: Path) -> list[int]:
    path = save_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r["split"] == "train"]


def job_state(env: dict, job: str) -> str | None:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    found = re.search(r"JobState=(\S+)", out)
    return found.group(1) if found else None


def test_sbatch_runs_to_completion_on_two_nodes(cluster, shards):
    workdir, env = cluster
    save = workdir / "run_done"
    code, job = sbatch(dict(env, SAVE_DIR=str(save)), *SHAPE, f"--output={workdir}/done-%j.out", "--wait",
                       SCRIPT, f"data.prefix={shards}", "train.max_steps=6", "train.save_interval=3",
                       "train.eval_interval=0", "train.log_interval=1")
    log = (workdir / f"done-{job}.out").read_text()
    assert code == 0, log[-4000:]
    assert "dry run of configs/tiny.yaml: world size 2" in log and "\nok\n" in log, log[-4000:]
    assert re.search(r"^0: rank 0 of 2 on \S+ \(node 0,", log, re.M), log[-4000:]  # both ranks started,
    assert re.search(r"^1: rank 1 of 2 on \S+ \(node 1,", log, re.M), log[-4000:]  # one per node
    assert re.search(r"^0: .*stopping at step 6: reached train.max_steps=6 \(exit 0\)", log, re.M), log[-4000:]
    assert "training step exited 0: done" in log
    assert (save / "latest").read_text().strip() == "6"
    assert (save / "iter_0000006").is_dir() and (save / "iter_0000003").is_dir()
    assert train_steps(save) == [1, 2, 3, 4, 5, 6]


def _signal_once_under_way(env: dict, job: str, save: Path, log, ready) -> None:
    """Send USR1 to the job's steps (as Slurm's --signal=USR1@N does) once ready() holds."""
    deadline = time.monotonic() + 180
    while not ready():
        state = job_state(env, job)
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} is {state} before the signal:\n{log()}"
        assert time.monotonic() < deadline, f"not ready after 180 s (steps {train_steps(save)}):\n{log()}"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)


def _until_requeued_run_ends(env: dict, job: str, log) -> str:
    deadline = time.monotonic() + 180
    while True:  # until the requeued run has finished (the job's record stays MinJobAge=4 s after it ends)
        state, text = job_state(env, job), log()
        if state in (None, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") and \
                re.search(r"training step (exited [03]\b|failed)", text.split("(restart 1)")[-1]):
            break
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") or \
                (state is None and "(restart 1)" not in text):
            break  # ended without a restart
        assert time.monotonic() < deadline, f"job {job} still {state} 180 s after USR1:\n{text[-5000:]}"
        time.sleep(0.5)
    assert state in (None, "COMPLETED"), text[-5000:]
    return text


def _logger(path: Path):
    return lambda: path.read_text() if path.exists() else ""


def test_usr1_saves_requeues_and_resumes(cluster, shards):
    workdir, env = cluster
    save = workdir / "run_requeue"
    total = 40  # far more steps than pass between the poll seeing step 2 and the signal landing
    _, job = sbatch(dict(env, SAVE_DIR=str(save)), *SHAPE, f"--output={workdir}/requeue-%j.out", SCRIPT,
                    f"data.prefix={shards}", f"train.max_steps={total}", "train.save_interval=1000",
                    "train.eval_interval=0", "train.log_interval=1")
    log = _logger(workdir / f"requeue-{job}.out")
    # training is under way: preempt it as Slurm's warning signal would
    _signal_once_under_way(env, job, save, log, lambda: len(train_steps(save)) >= 2)
    text = _until_requeued_run_ends(env, job, log)

    first, sep, second = text.partition("start (restart 1)")
    assert sep, f"the job never restarted:\n{text[-5000:]}"
    # First run: the signal reached both ranks' step, rank 0 saved at that step and the script requeued.
    stopped = re.search(r"^0: .*stopping at step (\d+): stop signal \(SIGUSR1\) \(exit 75\)", first, re.M)
    assert stopped, first[-4000:]
    step = int(stopped.group(1))
    assert 2 <= step < total
    assert f"saved {save}/iter_{step:07d}" in first
    assert re.search(r"srun: error: \S+: task 1: Exited with exit code 75", first), first[-3000:]
    assert "exited 75 (preempted, checkpoint saved): requeueing (restart 1 of at most 20)" in first
    # Second run: same job id, restart count 1, resumed from that very checkpoint, ran to the end.
    assert f"resumed from {save}/iter_{step:07d}" in second, second[-4000:]
    assert re.search(rf"^0: .*stopping at step {total}: reached train.max_steps={total} \(exit 0\)", second, re.M)
    assert "training step exited 0: done" in second
    assert "stop signal" not in second
    assert (save / "latest").read_text().strip() == str(total)
    # Checkpoint steps seen from the metrics: 1..step by the first run, step+1..total by the resumed one.
    assert train_steps(save) == list(range(1, total + 1))


def test_usr1_after_a_checkpoint_with_workers_saves_requeues_and_resumes(cluster, shards):
    """As at scale: DataLoader workers on (configs/xl.yaml has 4), and the warning signal lands after an interval
    checkpoint, when megatron's checkpoint-writer Manager process exists. Slurm signals every process of the step:
    a worker or the Manager dying of it used to end the job with exit 1, nothing saved, no requeue."""
    workdir, env = cluster
    save = workdir / "run_workers"
    total = 16  # the signal lands a step or two after the poll sees a step past the first checkpoint (3)
    _, job = sbatch(dict(env, SAVE_DIR=str(save)), *SHAPE, f"--output={workdir}/workers-%j.out", SCRIPT,
                    f"data.prefix={shards}", f"train.max_steps={total}", "train.save_interval=3",
                    "train.eval_interval=0", "train.log_interval=1", "data.num_workers=2")
    log = _logger(workdir / f"workers-{job}.out")

    def after_a_checkpoint() -> bool:  # `latest` exists (the writer's Manager too) and training went on past it
        latest = save / "latest"
        steps = train_steps(save)
        return latest.exists() and bool(steps) and steps[-1] > int(latest.read_text().strip() or 0)

    _signal_once_under_way(env, job, save, log, after_a_checkpoint)
    text = _until_requeued_run_ends(env, job, log)

    first, sep, second = text.partition("start (restart 1)")
    assert sep, f"the job never restarted:\n{text[-5000:]}"
    assert "killed by signal" not in text and "exited unexpectedly" not in text, text[-5000:]
    stopped = re.search(r"^0: .*stopping at step (\d+): stop signal \(SIGUSR1\) \(exit 75\)", first, re.M)
    assert stopped, first[-4000:]
    step = int(stopped.group(1))
    assert 3 <= step < total
    assert f"saved {save}/iter_{step:07d}" in first
    assert "exited 75 (preempted, checkpoint saved): requeueing (restart 1 of at most 20)" in first
    assert f"resumed from {save}/iter_{step:07d}" in second, second[-4000:]
    assert re.search(rf"^0: .*stopping at step {total}: reached train.max_steps={total} \(exit 0\)", second, re.M)
    assert "training step exited 0: done" in second and "stop signal" not in second
    assert (save / "latest").read_text().strip() == str(total)
    assert train_steps(save) == list(range(1, total + 1))  # every step logged once


def test_preprocess_array_two_parts_then_pretrain_reads_both(cluster, tmp_path):
    """launch/preprocess.sbatch as a 2-task array (one part each, long recordings cut into segments): together the
    parts hold every input exactly once, and a pre-training on `data.prefix='PREFIX_part*'` reads both."""
    from megatron_speech.data.dataset import Corpus
    from tests.audio_files import read_jsonl, tone, write_audio, write_flac

    workdir, env = cluster
    src = workdir / "prep_in"  # the demo corpus's shape in small: two speakers' tones, a long talk, a non-audio file
    for i in range(10):
        write_audio(src / f"spk{i % 2}" / f"u{i:02d}.wav", tone(1.5 + 0.2 * i, 22050, 1, i), 22050, "WAV", "PCM_16")
    write_flac(src / "talk.flac", 9, 5)
    (src / "notes.txt").write_text("not audio")
    inputs = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    prefix = workdir / "prep" / "corpus"
    code, job = sbatch(env, "--array=0-1", "--cpus-per-task=1", "--time=10", f"--output={workdir}/prep-%A_%a.out",
                       "--wait", "launch/preprocess.sbatch", "--input", str(src), "--output-prefix", str(prefix),
                       "--max-segment-seconds", "3", "--min-seconds", "1.5", "--valid-fraction", "0.3")
    logs = [(workdir / f"prep-{job}_{i}.out").read_text() for i in range(2)]
    assert code == 0, "\n".join(log[-3000:] for log in logs)
    for i, log in enumerate(logs):
        assert f"part {i} of 2 done" in log and f"--part {i}/2 --workers 1" in log, log[-3000:]
    assert any("all 2 parts complete" in log for log in logs)
    assert f"data.prefix='{prefix}_part*'" in logs[0]

    # Every input exactly once over both parts: kept whole (its id), cut (its segments' parent) or rejected.
    parts = [f"{prefix}_part{i:04d}" for i in range(2)]
    rows = [r for p in parts for s in ("train", "valid") for r in read_jsonl(Path(f"{p}_{s}.manifest.jsonl"))]
    rejected = [r["id"] for p in parts for r in read_jsonl(Path(f"{p}.rejects.jsonl"))]
    assert rejected == ["notes.txt"]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    per_part = [{r.get("parent", r["id"]) for s in ("train", "valid")
                 for r in read_jsonl(Path(f"{p}_{s}.manifest.jsonl"))} for p in parts]
    assert all(per_part) and not per_part[0] & per_part[1]  # a recording's segments stay in its part
    assert per_part[0] | per_part[1] | set(rejected) == inputs and not (per_part[0] | per_part[1]) & set(rejected)
    assert any(r["id"] == f"talk.flac@{r.get('offset')}" for r in rows) and max(r["samples"] for r in rows) <= 48_000

    # Pre-training reads both parts: every train utterance, and each part at its share of the audio.
    train = [r for p in parts for r in read_jsonl(Path(f"{p}_train.manifest.jsonl"))]
    corpus = Corpus(f"{prefix}_part*", "train")
    assert corpus.prefixes == parts and len(corpus) == len(train)
    assert int(corpus.lengths.sum()) == sum(r["samples"] for r in train)
    save = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "megatron_speech.pretrain", "--config", "configs/tiny.yaml",
                          f"data.prefix={prefix}_part*", f"train.save_dir={save}", "train.max_steps=2",
                          "train.eval_interval=0", "train.log_interval=1", "train.save_interval=1000"],
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout + run.stderr
    # the parts of one corpus are one mixing group (64 parts must not weigh 64^(1 - alpha) times one corpus)
    groups = re.findall(r"data: (\S+)\s+\S+ h\s+sampling weight \S+ \(natural ([\d.]+)\)", out)
    assert groups == [(Path(prefix).name, "1.0000")], out[-3000:]
    assert train_steps(save) == [1, 2]
