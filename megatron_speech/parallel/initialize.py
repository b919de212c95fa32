"""Process groups, megatron-core model parallelism and RNG seeding for one training process."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_speech.compat.cpu import apply_cpu_compat


def _env_int(key: str, default: int | None = None) -> int | None:
    value = os.environ.get(key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer; set it to one") from None


MASTER_PORT_BASE, MASTER_PORT_SPAN = 20_000, 12_000
"""Under srun, MASTER_PORT = 20000 + job id mod 12000: 20000-31999, below Linux's ephemeral range (32768-60999 by
default, net.ipv4.ip_local_port_range), where any outgoing connection on the node (NCCL's and gloo's own sockets
included) may already hold the port."""


def master_port_for_job(job_id: int) -> int:
    """The rendezvous port of a Slurm job: every task of the job computes the same one without talking."""
    return MASTER_PORT_BASE + job_id % MASTER_PORT_SPAN


def env_from_slurm() -> None:
    """Under `srun python -m ...` (no torchrun), derive torch.distributed's variables from Slurm's.
    Leaves an environment that torchrun already set untouched."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        import subprocess

        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "localhost")
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
        os.environ["MASTER_ADDR"] = hosts.stdout.split()[0] if hosts.returncode == 0 and hosts.stdout else nodes
    os.environ.setdefault("MASTER_PORT", str(master_port_for_job(_env_int("SLURM_JOB_ID", 0))))


def world_size_from_env() -> int:
    """The world size the launcher announced (1 for a plain `python` run)."""
    return _env_int("WORLD_SIZE", 1)


def initialize_parallel(tensor_model_parallel_size: int = 1, seed: int = 1234, backend: str | None = None,
                        timeout_seconds: float | None = None) -> None:
    """Start torch.distributed (if needed) and megatron-core's tensor/data-parallel groups, then seed RNGs.

    The process group comes from the environment torchrun/srun/spawn set (``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); without ``WORLD_SIZE`` it is a
    single-process group (rank 0 of 1), so tools run as plain ``python`` work too. The backend is
    ``nccl`` when CUDA is present, else ``gloo`` (with :func:`apply_cpu_compat`). Pipeline parallelism
    is always 1. Seeds: every rank's default generator gets ``seed`` (identical on the TP ranks, for
    dropout on replicated tensors) and megatron's tracker gets the TP-rank-dependent stream; both are offset by
    the data-parallel rank.

    ``timeout_seconds`` (train.collective_timeout_seconds) bounds every collective of the default group and of
    megatron's groups: past it, a collective whose peer is stuck raises instead of hanging (gloo honours it per
    operation; NCCL's watchdog aborts the process). None keeps the defaults (gloo 30 min, NCCL 10 min).

    Raises:
        ValueError: ``tensor_model_parallel_size`` is not a positive divisor of the world size
            (checked before any process group forms).
    """
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if tensor_model_parallel_size < 1:
        raise ValueError(f"parallel.tensor_model_parallel_size={tensor_model_parallel_size} must be >= 1")
    if dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = _env_int("WORLD_SIZE", 1)
    if world_size % tensor_model_parallel_size != 0:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={tensor_model_parallel_size} does not divide the world "
            f"size {world_size}: launch a multiple of {tensor_model_parallel_size} processes or pick a TP "
            f"size that divides {world_size}"
        )

    if not cuda:
        # Before anything that builds megatron tensors or the RNG tracker.
        apply_cpu_compat()
    if not dist.is_initialized():
        if cuda:
            # One GPU per process: without this every local rank would use (and NCCL would bind) GPU 0.
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        timeout = {"timeout": timedelta(seconds=timeout_seconds)} if timeout_seconds else {}
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, init_method="env://", **timeout)
        else:
            # Plain `python tool.py`: an in-process store, no port to pick.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, **timeout)

    minutes = {"distributed_timeout_minutes": timeout_seconds / 60} if timeout_seconds else {}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size, 1, **minutes)
    # Offset by the DP rank: replicas must not share dropout / Gumbel noise, while the TP ranks of one replica
    # share the default generator (dropout on replicated activations must be identical across them) and
    # megatron's tracker derives a TP-rank-specific stream for local slices (docs/design.md §3, Randomness).
    seed = seed + 1009 * parallel_state.get_data_parallel_rank()
    # model_parallel_cuda_manual_seed seeds the CUDA default generator with `seed`; the CPU one is what
    # dropout on CPU tensors draws from, so seed it the same way (on GPU this is harmless).
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def compute_device() -> torch.device:
    """Where this rank's model and batches live: its GPU (initialize_parallel picked it from LOCAL_RANK), or the
    CPU when there is none."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def single_rank_groups() -> ProcessGroupCollection:
    """Process groups for building a model outside a launched job (tools, evaluation, counting, tests): a
    one-process world (initialize_parallel(1)) unless one is already initialized."""
    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(1)
    return ProcessGroupCollection.use_mpu_process_groups()


def destroy_parallel() -> None:
    """Tear down megatron-core's groups and the default process group (safe to call twice)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
