"""Reliability drills that need the real driver under torchrun (2 CPU processes): a dead and a stuck rank, a disk
that fills during a save, a damaged latest checkpoint on automatic resume, and a preemption storm. Slow (each
torchrun start costs 6-8 s here), still run in CI. docs/reliability.md lists the figures these tests print
(`pytest -s tests/cluster/test_reliability*.py`: the lines starting with FIGURE)."""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from megatron_speech.checkpoint.checkpointing import checkpoint_dir, latest_step
from megatron_speech.checkpoint.integrity import MANIFEST, verify_checkpoint
from tests.fixtures import ROOT
from tests.runs import metrics, torchrun

pytestmark = pytest.mark.slow

def figure(name: str, text: str) -> None:
    print(f"\nFIGURE {name}: {text}")


class Launch(subprocess.Popen):
    """torchrun as tests/runs.torchrun starts it, but with its output in a file: a SIGKILLed worker's
    multiprocessing manager (megatron's checkpoint writer starts one) outlives it, holding any pipe open."""

    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def launch(tmp_path):
    tag = uuid.uuid4().hex
    started: list[Launch] = []

    def start(save_dir: Path, *overrides: str) -> Launch:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
               "megatron_speech.pretrain", "--config", "configs/tiny.yaml", f"train.save_dir={save_dir}", *overrides]
        log = tmp_path / f"torchrun_{len(started)}.log"
        with open(log, "w") as f:
            proc = Launch(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", RELIABILITY_TEST=tag),
                          stdout=f, stderr=subprocess.STDOUT, text=True)
        proc.log = log
        started.append(proc)
        return proc

    yield start
    for proc in started:
        _kill_tree(proc)
    for p in psutil.process_iter():  # orphans (the managers above) carry the tag in their environment
        try:
            if p.environ().get("RELIABILITY_TEST") == tag:
                p.kill()
        except psutil.Error:
            pass


def _workers(proc) -> dict[int, psutil.Process]:
    """torchrun's worker processes (its direct children) by global rank."""
    out = {}
    for child in psutil.Process(proc.pid).children():
        try:
            out[int(child.environ()["RANK"])] = child
        except (psutil.Error, KeyError):
            pass
    return out


def _wait(condition, proc, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited ({proc.returncode}) before {what}:\n{proc.output()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _latest(run: Path) -> int | None:
    try:
        return latest_step(run)
    except (ValueError, FileNotFoundError):
        return None


def _kill_tree(proc) -> None:
    try:
        parent = psutil.Process(proc.pid)
        tree = parent.children(recursive=True) + [parent]
    except psutil.Error:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass


def _assert_no_half_written_checkpoint(run: Path) -> None:
    latest = latest_step(run)
    assert not list(run.glob(".*.tmp")) and not list(run.glob(f"iter_*/.{MANIFEST}.tmp"))
    for ckpt in sorted(run.glob("iter_*")):
        step = int(ckpt.name[5:])
        assert step <= latest, f"{ckpt} is newer than latest={latest}: a half-written save was left behind"
        assert verify_checkpoint(ckpt) == [], ckpt


# ------------------------------------------------------------------------------------------ 1. dead / stuck rank


def test_a_killed_rank_makes_the_other_exit_with_a_message(tmp_path, shards, launch):
    run = tmp_path / "dead"
    proc = launch(run, f"data.prefix={shards}", "train.max_steps=1000", "train.eval_interval=0",
                  "train.save_interval=3", "train.log_interval=1", "train.collective_timeout_seconds=30")
    _wait(lambda: _latest(run) is not None and max(metrics(run), default=0) >= 5, proc, what="a checkpoint, step 5")
    workers = _workers(proc)
    workers[1].kill()  # SIGKILL: no handler, no goodbye
    killed = time.monotonic()
    survivor_gone = None
    while proc.poll() is None:
        if survivor_gone is None and _gone(workers[0]):
            survivor_gone = time.monotonic() - killed
        assert time.monotonic() - killed < 60, "the survivor hangs"
        time.sleep(0.02)
    took = time.monotonic() - killed
    out = proc.output()
    assert proc.returncode != 0
    line = next(line for line in out.splitlines() if "a collective failed after step" in line)
    assert "rank 0:" in line and "Rank(s) [1] did not check in" in line and "(exit 4)" in line, line
    latest = latest_step(run)
    assert f"A restart resumes from the checkpoint of step {latest}" in line, line
    assert "local_rank: 1" in out and "exitcode  : -9" in out  # torchrun's own report names the dead rank
    step = int(line.split("after step ")[1].split()[0])
    assert step >= 5
    figure("dead-rank", f"survivor exited {survivor_gone or took:.1f} s after SIGKILL of rank 1 (5 s of it is the "
                        f"check-in wait), torchrun returned after {took:.1f} s; failed after step {step}, "
                        f"last checkpoint step {latest}: {step - latest} steps lost")


def test_a_stuck_rank_times_out_instead_of_hanging(tmp_path, shards, launch):
    timeout = 10  # well above any legitimate wait of this run (it saves nothing before the stop)
    run = tmp_path / "stuck"
    proc = launch(run, f"data.prefix={shards}", "train.max_steps=1000", "train.eval_interval=0",
                  "train.save_interval=0", "train.log_interval=1", f"train.collective_timeout_seconds={timeout}")
    try:
        _wait(lambda: max(metrics(run), default=0) >= 3, proc, what="step 3")
        workers = _workers(proc)
        workers[1].suspend()  # SIGSTOP: alive, holds its sockets, answers nothing
        stopped = time.monotonic()
        while not _gone(workers[0]):
            assert time.monotonic() - stopped < timeout + 30, "the survivor did not time out"
            time.sleep(0.05)
        took = time.monotonic() - stopped
    finally:
        _kill_tree(proc)  # torchrun would SIGKILL the stopped rank itself, 30 s after the survivor's exit
    proc.wait(timeout=60)
    out = proc.output()
    line = next(line for line in out.splitlines() if "a collective failed after step" in line)
    assert "Timed out" in line and "Rank(s) [1] did not check in" in line and "(exit 4)" in line, line
    assert timeout <= took < timeout + 15, took
    figure("stuck-rank", f"survivor exited {took:.1f} s after SIGSTOP of rank 1 (collective timeout {timeout} s + "
                         "5 s check-in wait); no checkpoint yet: all steps since the start lost")


# ------------------------------------------------------------------------------------------ 2. disk full during save


def _limit_file_size(proc, limit: int | None) -> None:
    """RLIMIT_FSIZE on the workers (and so on the writer processes they fork at each save): a write past `limit`
    bytes fails in the kernel with EFBIG ("File too large"), as a full disk fails with ENOSPC. None: lift it."""
    for worker in _workers(proc).values():
        hard = worker.rlimit(psutil.RLIMIT_FSIZE)[1]
        worker.rlimit(psutil.RLIMIT_FSIZE, (hard if limit is None else limit, hard))


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_a_failed_save_keeps_latest_and_stops_or_continues(tmp_path, shards, launch, policy):
    run = tmp_path / policy
    total = 24
    proc = launch(run, f"data.prefix={shards}", f"train.max_steps={total}", "train.eval_interval=0",
                  "train.save_interval=4", "train.keep_last=2", "train.log_interval=1",
                  f"train.on_save_error={policy}")
    try:
        _wait(lambda: _latest(run) is not None, proc, what="the first checkpoint")
        _limit_file_size(proc, 64 << 10)  # shards are ~1.3 MB: the next save cannot write them
        limited = time.monotonic()
        if policy == "continue":
            _wait(lambda: any(r["split"] == "alarm" for r in _rows(run)), proc, what="the failed save")
            _limit_file_size(proc, None)  # space freed: a later save succeeds
        proc.wait(timeout=300)
        took = time.monotonic() - limited
        out = proc.output()
    finally:
        _kill_tree(proc)
    failures = [r for r in _rows(run) if r["split"] == "alarm"]
    assert failures and "checkpoint save failed" in failures[0]["message"], out[-3000:]
    message = failures[0]["message"]
    failed_step = failures[0]["step"]
    # torch's writer reports the refused write (EFBIG here, ENOSPC on a full disk) as a short write
    assert f"writing {checkpoint_dir(run, failed_step)} failed: rank" in message, message
    kept = int(re.search(r"latest still names step (\d+) \(\d+\.\d GiB free there\)", message)[1])
    assert kept < failed_step
    assert not checkpoint_dir(run, failed_step).exists()  # the partial directory is gone
    _assert_no_half_written_checkpoint(run)
    if policy == "stop":
        assert proc.returncode != 0 and "(exit 5)" in out, out[-3000:]
        assert latest_step(run) == kept and max(metrics(run)) == failed_step
        figure("disk-full-stop", f"save of step {failed_step} failed, run stopped with exit 5 {took:.1f} s after "
                                 f"the limit; latest = {kept}, intact: {failed_step - kept} steps to redo")
    else:
        assert proc.returncode == 0, out[-3000:]
        assert sorted(metrics(run)) == list(range(1, total + 1)) and latest_step(run) == total
        figure("disk-full-continue", f"save of step {failed_step} failed and training went on; the run finished "
                                     f"and saved step {total} once space was back: 0 steps lost")


def _rows(run: Path) -> list[dict]:
    import json

    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ------------------------------------------------------------------------------------------ 7. preemption storm


STORM_STEPS = 24


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shards):
    """The uninterrupted reference: 24 steps, checkpoints at 12 and 24."""
    run = tmp_path_factory.mktemp("straight") / "run"
    code, out = torchrun(2, run, *_storm_args(shards), f"train.max_steps={STORM_STEPS}")
    assert code == 0, out[-3000:]
    return run


def _storm_args(shards) -> list[str]:
    # DP=2 with 2 micro-batches per step and evaluations; the tiny preset's dropout (0.05) stays on: masks, the
    # micro-batch split and the eval batches must resume exactly too
    return [f"data.prefix={shards}", "train.log_interval=1", "train.eval_interval=8", "train.save_interval=12",
            "train.keep_last=2", "train.num_micro_batches=2"]


def test_preemption_storm_ends_bit_exact(tmp_path, shards, straight_run, launch):
    run = tmp_path / "storm"
    targets = sorted(random.Random(20).sample(range(2, STORM_STEPS - 6), 5))  # room left for late stops
    stopped_at, lost = [], []
    for target in targets:
        target = max(target, (stopped_at or [0])[-1] + 1)  # a step this run has yet to train
        before = len(_rows(run))
        proc = launch(run, *_storm_args(shards), f"train.max_steps={STORM_STEPS}")
        trained = lambda before=before: [r["step"] for r in _rows(run)[before:] if r["split"] == "train"]  # noqa: E731
        _wait(lambda: max(trained(), default=0) >= target, proc, what=f"step {target}")  # noqa: B023
        signalled_at = max(trained())
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
        proc.wait(timeout=300)
        out = proc.output()
        assert "stop signal" in out and "(exit 75)" in out, out[-3000:]
        stopped_at.append(latest_step(run))
        lost.append(0 if stopped_at[-1] >= signalled_at else signalled_at - stopped_at[-1])
        _assert_no_half_written_checkpoint(run)
    code, out = torchrun(2, run, *_storm_args(shards), f"train.max_steps={STORM_STEPS}")
    assert code == 0 and "resumed from" in out, out[-3000:]
    assert len(set(stopped_at)) == 5 and stopped_at == sorted(stopped_at), stopped_at

    interrupted, straight = metrics(run), metrics(straight_run)
    assert sorted(interrupted) == list(range(1, STORM_STEPS + 1))  # no step lost, none repeated
    differ = [s for s in sorted(interrupted) if (interrupted[s]["loss"], interrupted[s]["grad_norm"])
              != (straight[s]["loss"], straight[s]["grad_norm"])]  # bit for bit: CPU, fp32, same layout
    assert not differ, f"stopped at {stopped_at}; steps whose loss or grad norm differ: {differ}"
    valid, valid_straight = metrics(run, "valid"), metrics(straight_run, "valid")
    assert sorted(valid) == [8, 16, 24] and all(valid[s]["loss"] == valid_straight[s]["loss"] for s in valid)
    final, reference = _contents(checkpoint_dir(run, STORM_STEPS)), _contents(checkpoint_dir(straight_run, STORM_STEPS))
    assert final.keys() == reference.keys()
    for key in reference:  # model, optimizer moments, EMA, every rank's RNG states: bit for bit
        assert _same(final[key], reference[key]), key
    figure("preemption-storm", f"5 SIGTERMs, stopped (and saved) at steps {stopped_at}, {sum(lost)} steps lost; "
                               f"6 runs; final checkpoint equal to the uninterrupted run's, {len(reference)} entries "
                               "bit for bit")


def _contents(path: Path) -> dict:
    """Every entry of a dist checkpoint, read without a process group (our own trusted test files)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    try:
        return torch.load(out, weights_only=False)
    finally:
        out.unlink()


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, io.BytesIO):
        a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------------------ 3. damaged latest


_SAVE_UNDER_SIGNALS = """
import os, signal, sys, time
from types import SimpleNamespace
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron_speech.training.loop import SavePolicy

def write(step, reshardable):
    # What megatron's writer does at a process's first save: spawn its results-queue Manager process.
    filesystem_async._get_write_results_queue()
    os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning lands in the middle of the save

train = SimpleNamespace(exit_on_signal=True, save_dir=sys.argv[1], save_interval=1, on_save_error="stop")
policy = SavePolicy(train, SimpleNamespace(alarm=lambda *a: None), write)
assert policy.save(1)
assert policy.stop._flag and policy.stop.signal_name == "SIGUSR1", "the signal during the save was lost"
manager = filesystem_async._results_queue._manager._process
for sig in (signal.SIGUSR1, signal.SIGTERM):  # Slurm signals every process of the step
    os.kill(manager.pid, sig)
time.sleep(1)
assert manager.is_alive(), f"the writer's Manager died: exit code {manager.exitcode}"
filesystem_async._results_queue.put("written")  # the next save still reaches it
assert filesystem_async._results_queue.get() == "written"
print("ok")
"""


def test_the_checkpoint_writer_survives_slurm_signals(tmp_path):
    """megatron's writer spawns a Manager process at the first save; Slurm's USR1/TERM reach it too. Started
    inside SavePolicy.save it must survive them (else the save at the signal fails: exit 1, no requeue), and a
    signal to the training process during the save must still be seen after it."""
    out = subprocess.run([sys.executable, "-c", _SAVE_UNDER_SIGNALS, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]


_WANDB_UNDER_SIGNALS = """
import json, os, signal, sys
import psutil
from megatron_speech.config import load_config
from megatron_speech.training.monitor import Monitor

cfg = load_config("configs/tiny.yaml", [f"train.save_dir={sys.argv[1]}", "logging.wandb=true",
                                        "logging.wandb_mode=offline"])
monitor = Monitor(cfg, 0, 4)
monitor.write(1, "train", {"loss": 1.0})
core = [p for p in psutil.Process().children(recursive=True) if p.name() == "wandb-core"]
assert core, "no wandb-core process"
for sig in (signal.SIGUSR1, signal.SIGTERM):  # Slurm's warning, then preemption: to every process of the step
    for p in core:
        p.send_signal(sig)
psutil.wait_procs(core, timeout=30)
monitor.write(2, "train", {"loss": 0.5})
monitor.alarm(2, "still here")
monitor.close()
assert [json.loads(line)["step"] for line in open(monitor.metrics_path)] == [1, 2, 2]
print("ok")
"""


def test_a_run_outlives_wandbs_service(tmp_path):
    """Preemption's SIGTERM ends wandb's service (wandb-core, a Go program, unblocks SIGTERM itself): the training
    process must go on logging to metrics.jsonl and save, not raise from wandb."""
    pytest.importorskip("wandb")
    env = dict(os.environ, WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _WANDB_UNDER_SIGNALS, str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]


def test_resume_falls_back_past_a_damaged_latest_checkpoint(tmp_path, shards, straight_run):
    run = tmp_path / "damaged"
    shutil.copytree(straight_run, run)
    shard = max(checkpoint_dir(run, STORM_STEPS).glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of a tensor
    shard.write_bytes(bytes(data))
    started = time.monotonic()
    code, out = torchrun(2, run, *_storm_args(shards), f"train.max_steps={STORM_STEPS + 2}")
    took = time.monotonic() - started
    assert code == 0, out[-3000:]
    assert f"cannot resume from {checkpoint_dir(run, STORM_STEPS)}: {shard.name}: SHA-256 differs" in out, out[-3000:]
    assert f"resumed from {checkpoint_dir(run, 12)}" in out
    rows = [r["step"] for r in _rows(run) if r["split"] == "train"]
    assert rows[-(STORM_STEPS + 2 - 12):] == list(range(13, STORM_STEPS + 3))  # redone from 13
    assert latest_step(run) == STORM_STEPS + 2
    figure("damaged-latest", f"flipped bit in {shard.name} of iter_{STORM_STEPS:07d}: refused at resume, fell back "
                             f"to step 12 ({STORM_STEPS - 12} steps redone); the whole restarted run took {took:.1f} s")
