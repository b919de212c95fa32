"""Test helper: run a function on N local ranks (multiprocessing forkserver) and collect the results.

`fn` must be importable by qualified name in a fresh interpreter (a top-level function of a test
module): it is pickled by reference, and the children get the parent's sys.path. Each child is
forked from one server per test process that has imported torch and megatron.core once (about 7 s
of CPU per process otherwise, most of a short rank's time); the child then takes the caller's
environment and working directory, as a spawned one would.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from multiprocessing import connection, forkserver, get_context
from typing import Any


class RankError(RuntimeError):
    """A rank raised (or died); the message carries that rank's traceback."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank} failed:\n{message}")
        self.rank = rank
        self.remote_traceback = message


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# imported once in the fork server; what a test changes in them after that stays in its own process
PRELOAD = ["torch", "megatron.core"]


def _context():
    """The forkserver context, its server started (once per process) with PRELOAD imported."""
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read when torch loads, in the server
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return ctx


def _rank_main(conn: connection.Connection, rank: int, world_size: int, fn: Callable, args: tuple,
               env: dict[str, str], cwd: str) -> None:
    # Runs in the child. Sends ("ok", value) or ("err", traceback text) as plain pickle bytes: the
    # multiprocessing pickler would share tensors through this process's memory, gone once it exits.
    # An unpicklable return value is reported as this rank's error instead of being lost.
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        import torch

        torch.set_num_threads(1)
        value = fn(rank, world_size, *args)
        try:
            message = pickle.dumps(("ok", value))
        except Exception:
            message = pickle.dumps(("err", "return value is not picklable:\n" + traceback.format_exc()))
    except BaseException:
        message = pickle.dumps(("err", traceback.format_exc()))
    try:
        conn.send_bytes(message)
    finally:
        conn.close()
        # A rank that leaves gloo groups open can hang in interpreter shutdown.
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def _kill(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240, env: dict[str, str] | None = None
) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return results by rank.

    Each child has OMP_NUM_THREADS=1, RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free
    MASTER_PORT in its environment, plus ``env``. If a rank raises or dies, all ranks are killed and
    :class:`RankError` carries its traceback; past ``timeout`` seconds all ranks are killed and
    ``TimeoutError`` names the ranks that had not finished.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    for attempt in range(3):
        try:
            return _run_ranks_once(fn, world_size, args, timeout, env)
        except RankError as e:
            # free_port's port was free a moment ago; a concurrent test (gloo opens ephemeral sockets by the dozen)
            # may take it before rank 0's store binds it: the harness's race, not the code under test's
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_ranks_once(fn: Callable[..., Any], world_size: int, args: tuple, timeout: float,
                    env: dict[str, str] | None) -> list:
    ctx = _context()
    base_env = {
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        **(env or {}),
    }
    procs, readers = [], []
    try:
        for rank in range(world_size):
            env_of_rank = {**os.environ, **base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_rank_main, args=(writer, rank, world_size, fn, args, env_of_rank, os.getcwd()))
            p.start()
            writer.close()
            procs.append(p)
            readers.append(reader)
    except BaseException:
        _kill(procs)
        raise

    results: dict[int, Any] = {}
    pending = set(range(world_size))
    deadline = time.monotonic() + timeout
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"ranks {sorted(pending)} of {world_size} did not finish within {timeout} s; all killed"
                )
            waitables = [readers[r] for r in pending] + [procs[r].sentinel for r in pending]
            ready = connection.wait(waitables, timeout=remaining)
            for rank in sorted(pending):
                if readers[rank] in ready or (procs[rank].sentinel in ready and readers[rank].poll()):
                    try:
                        status, payload = pickle.loads(readers[rank].recv_bytes())
                    except EOFError:
                        procs[rank].join(5)
                        raise RankError(rank, f"exited (code {procs[rank].exitcode}) without a result") from None
                    if status == "err":
                        raise RankError(rank, payload)
                    results[rank] = payload
                    pending.discard(rank)
                elif procs[rank].sentinel in ready:
                    procs[rank].join(5)
                    raise RankError(rank, f"exited (code {procs[rank].exitcode}) without a result")
    except BaseException:
        _kill(procs)
        raise
    finally:
        for r in readers:
            r.close()
    for p in procs:
        p.join(30)
    _kill(procs)
    return [results[r] for r in range(world_size)]
