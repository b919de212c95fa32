"""The batch stream shared by pre-training (data/loader.py) and fine-tuning (data/finetune_data.py): slots of a
sampler -> a batch builder in DataLoader workers -> numpy batches -> tensors in the training process.

    loader = ResumableLoader(builder, sampler, num_workers, pin_memory)   # builder[slot] -> dict of numpy arrays
    for micro_batches in loader: ...             # this DP rank's num_micro_batches micro-batches per step
    state = loader.state_dict()                  # the sampler's position: a resume yields exactly the rest
    for batch in EvalLoader(builder, batches, dp_rank, dp_size): ...   # the same batches at every evaluation

A builder is a map-style dataset keyed by sampler.Slot that returns a dict whose numpy arrays become tensors here
(`to_tensors`, pinned on request), and whose "_after" entry is the slot's position after its global batch. A
batch is a pure function of its slot and the seed (every random choice comes from common/rng.py's counter_rng), so
workers hold no state: any number of them (0 = in process) yields the same batches, and a resume from
state_dict() yields bit-identically what an uninterrupted run would have. Workers are spawned, never forked (the
parent may hold CUDA contexts, process groups or threads).

Signals: Slurm sends SIGUSR1 (the time-limit warning) and SIGTERM (preemption) to every process of the step, workers
included. Workers start with both blocked and then ignore them (common/stop_signals.py), so the training process
can finish its step and save while they keep serving batches; it ends them itself when it releases the iterator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from megatron_speech.common.rng import EVAL_MICRO_STEP
from megatron_speech.common.stop_signals import ignore_stop_signals, stop_signals_blocked
from megatron_speech.data.augment import Augmenter
from megatron_speech.data.noise import open_noise
from megatron_speech.data.sampler import DynamicBatchSampler, Position, Slot


class BatchBuilder(Protocol):
    """What the stream runs in its workers: the numpy batch of a slot."""

    def __getitem__(self, slot: Slot) -> dict[str, Any]: ...


class SlotStream(torch.utils.data.Sampler):
    """The DataLoader's sampler: this rank's slots of `sampler` from a fixed start position (endless)."""

    def __init__(self, sampler: DynamicBatchSampler, start: Position) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[Slot]:
        return self.sampler.slots(self.start)


class EvalStream(torch.utils.data.Sampler):
    """Evaluation slots of one DP rank: item k is batches[(k dp_size + dp_rank) mod len], always from k = 0 (every
    evaluation sees the same batches); `count` items, or endless when None. Keys (k, EVAL_MICRO_STEP, dp_rank)."""

    def __init__(self, batches: Sequence[np.ndarray], dp_rank: int, dp_size: int, count: int | None = None) -> None:
        self.batches, self.dp_rank, self.dp_size, self.count = batches, dp_rank, dp_size, count

    def __iter__(self) -> Iterator[Slot]:
        k = 0
        while self.count is None or k < self.count:
            indices = self.batches[(k * self.dp_size + self.dp_rank) % len(self.batches)]
            yield Slot(k, EVAL_MICRO_STEP, self.dp_rank, 0, indices, Position())
            k += 1


def _identity(batch: Any) -> Any:
    return batch


def data_loader(builder: BatchBuilder, stream: torch.utils.data.Sampler, num_workers: int,
                prefetch: int) -> DataLoader:
    """A DataLoader over `stream`'s slots, one batch per slot, `prefetch` batches ahead across the workers."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        # spawn: workers share nothing with a parent that may hold CUDA contexts, process groups or threads.
        # ignore_stop_signals: a worker killed by Slurm's USR1/TERM would make torch raise in the training process
        # before it could save (the iterator must also be created under stop_signals_blocked: see start_workers).
        kwargs = {"multiprocessing_context": "spawn", "prefetch_factor": max(2, math.ceil(prefetch / num_workers)),
                  "worker_init_fn": ignore_stop_signals}
    # A private generator: iterating a DataLoader draws its workers' base seed from the generator it is given,
    # by default torch's global one, which dropout on the training side also draws from. A resumed run creates
    # its iterator at another step than the uninterrupted run, so that draw would shift every later dropout
    # mask. Our workers take all randomness from counter_rng, so the base seed is irrelevant to the batches.
    return DataLoader(builder, batch_size=None, sampler=stream, num_workers=num_workers, collate_fn=_identity,
                      generator=torch.Generator(), **kwargs)


def start_workers(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """iter(loader), its workers spawned with SIGUSR1/SIGTERM blocked: a worker takes seconds to import torch and
    reach worker_init_fn, and a signal in that window would kill it (the block is inherited across exec)."""
    with stop_signals_blocked():
        return iter(loader)


def to_tensors(batch: dict[str, Any], pin_memory: bool = False) -> dict[str, Any]:
    """The one numpy -> torch step, in the training process: every numpy array of a builder's batch becomes a
    tensor sharing its memory (pinned: a copy in page-locked memory). Workers send numpy (pickled through the pipe)
    rather than tensors (shared-memory file descriptors): a worker shut down while its queue thread is inside
    torch's C++ tensor sharing dies with "terminate called without an active exception" (SIGABRT)."""
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            tensor = torch.from_numpy(value)
            batch[key] = tensor.pin_memory() if pin_memory else tensor
    return batch


class ResumableLoader:
    """Iterator over global steps: each item is this DP rank's list of num_micro_batches micro-batches.

    state_dict() is the position after the last global batch returned (prefetched batches do not count);
    load_state_dict() makes the next item the one after it.
    """

    def __init__(self, builder: BatchBuilder, sampler: DynamicBatchSampler, num_workers: int = 0,
                 pin_memory: bool = False, extra_stats: Mapping[str, float] | None = None) -> None:
        self.builder, self.sampler = builder, sampler
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.num_micro_batches = sampler.num_micro_batches
        self._extra_stats = dict(extra_stats or {})
        self._it: Iterator[dict[str, Any]] | None = None

    @property
    def step(self) -> int:
        """Global batches consumed = the step (counter key) of the next global batch."""
        return self.sampler.position.global_batches

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        if self._it is None:
            stream = SlotStream(self.sampler, self.sampler.position)
            self._it = start_workers(data_loader(self.builder, stream, self.num_workers, 2 * self.num_micro_batches))
        batches = [next(self._it) for _ in range(self.num_micro_batches)]
        for m, batch in enumerate(batches):
            assert (batch["step"], batch["micro_step"]) == (self.step, m), (batch["step"], batch["micro_step"])
            after = batch.pop("_after")
        self.sampler.position = after
        return [to_tensors(b, self.pin_memory) for b in batches]

    def state_dict(self) -> dict[str, Any]:
        """Sampler position: global batches consumed, epoch, micro-batches of that epoch consumed (plain ints)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the global batch where `state` was taken (restarts the workers if running)."""
        self.close()
        self.sampler.load_state_dict(state)

    def mixing_stats(self) -> dict[str, float]:
        """Flat metrics: `data/<group>/{hours,weight,natural_weight,utterances_per_epoch}`, plus extra_stats."""
        return {**self.sampler.mixing_stats(), **self._extra_stats}

    def close(self) -> None:
        """Stop the worker processes now (they restart on the next item). Not left to the iterator's release: a
        traceback can keep it alive to interpreter exit, where multiprocessing SIGTERMs the workers, which ignore it,
        and joins them forever."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's own clean stop (what its __del__ calls)
        if shutdown is not None:
            shutdown()
            for worker in getattr(it, "_workers", []):
                if worker.is_alive():  # past torch's join timeout, and deaf to SIGTERM
                    worker.kill()
                    worker.join()


class EvalLoader:
    """Evaluation micro-batches of one DP rank (single dicts, not lists), endless or `count` of them. Each iter()
    starts over, so every evaluation sees the same batches, crops and masks. `num_batches`: this rank's share of
    one pass."""

    def __init__(self, builder: BatchBuilder, batches: Sequence[np.ndarray], dp_rank: int, dp_size: int,
                 num_workers: int = 0, pin_memory: bool = False, count: int | None = None) -> None:
        self.builder, self.batches, self.dp_rank, self.dp_size = builder, batches, dp_rank, dp_size
        self.num_workers, self.pin_memory, self.count = num_workers, pin_memory, count
        self.num_batches = len(batches[dp_rank::dp_size])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = EvalStream(self.batches, self.dp_rank, self.dp_size, self.count)
        for batch in start_workers(data_loader(self.builder, stream, self.num_workers, 2)):
            batch.pop("_after")
            yield to_tensors(batch, self.pin_memory)


def build_augmenter(data_cfg: Any, train: bool = True) -> Augmenter:
    """The Augmenter of config.DataConfig `data_cfg`: speed perturbation (data.speed_perturb; fine-tuning's config
    check requires it empty) and additive noise (data.noise_dir) when training, normalization as configured;
    train=False keeps only the normalization (evaluation: no augmentation)."""
    eps = data_cfg.normalize_eps if data_cfg.normalize else None
    if not train:
        return Augmenter(normalize_eps=eps)
    noise = open_noise(data_cfg.noise_dir, data_cfg.noise_types) if data_cfg.noise_dir else None
    return Augmenter(data_cfg.speed_perturb, noise, data_cfg.noise_prob, tuple(data_cfg.noise_snr_db),
                     tuple(data_cfg.music_snr_db), tuple(data_cfg.babble_snr_db),
                     tuple(data_cfg.babble_num_speakers), normalize_eps=eps)
