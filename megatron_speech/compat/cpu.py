"""Run megatron-core's real TP/SP/DDP/optimizer/schedule code on CPU (gloo). Targets megatron-core 0.16.1
(the CUDA assumptions below are that release's; re-check them on an upgrade, see compat/__init__.py).

megatron-core assumes CUDA: it allocates with ``device=torch.cuda.current_device()`` or
``device="cuda"``, checks ``param.type() == "torch.cuda.FloatTensor"``, and keeps its tensor-parallel
RNG streams in CUDA generators. :func:`apply_cpu_compat` makes exactly those assumptions hold on a
CPU-only machine, so tests and the CPU demo exercise the same code paths as a GPU run. It does
nothing at all when CUDA is available: GPU runs never see any of this.

What it installs (each piece is needed by a code path named in its comment):

* ``_CudaToCpuMode``: a ``TorchFunctionMode`` that rewrites CUDA devices (``"cuda"``, ``"cuda:0"``,
  ``torch.device("cuda")``, bare ints) to CPU in ``device=`` keywords and ``Tensor.to``; makes
  ``Tensor.cuda()`` return the (CPU) tensor; reports ``torch.cuda.*Tensor`` type strings to
  megatron-core callers only. torch keeps mode stacks per thread: the mode is entered once per thread
  that calls :func:`apply_cpu_compat` and kept for the thread's life; it is re-entered for the body of
  ``backward``/``autograd.grad`` so autograd hooks and ``Function.backward`` (DDP grad hooks, SP
  reduce-scatter, activation recompute) see it too.
* ``torch.cuda.current_device`` returns 0 (the mode maps device 0 to CPU); ``torch.cuda.synchronize``
  is a no-op (CPU work is done when a call returns).
* ``CpuRNGStatesTracker`` replaces megatron's ``CudaRNGStatesTracker`` (class and live tracker), and
  megatron's ``_get_cuda_rng_state``/``_set_cuda_rng_state`` work on the CPU generator, so
  ``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()`` and activation recompute
  work on CPU.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_TB = torch._C.TensorBase
# Runs a handled function's own body without dispatching it to the mode again (present in the pinned
# torch 2.13; older releases lack it, see _autograd).
_redispatch = getattr(torch.overrides, "redispatch_function", None)

_lock = threading.Lock()
_applied = False
_thread_state = threading.local()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    # A bare int is an accelerator index (torch.cuda.current_device() returns 0 here); bool is not one.
    return isinstance(device, int) and not isinstance(device, bool)


def _to(mode: _CudaToCpuMode, func: Callable, types: Any, args: tuple, kwargs: dict) -> Any:
    # Tensor.to takes the device positionally too: x.to("cuda"), x.to(torch.cuda.current_device()).
    args = tuple(_CPU if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
    return func(*args, **kwargs)


def _cuda(mode: _CudaToCpuMode, func: Callable, types: Any, args: tuple, kwargs: dict) -> Any:
    # x.cuda() (grad scaler load_state_dict, optimizer state reload, tensor_parallel.data): the
    # tensor already is on the compute device, and torch returns self in that case.
    return args[0]


def _type(mode: _CudaToCpuMode, func: Callable, types: Any, args: tuple, kwargs: dict) -> Any:
    result = func(*args, **kwargs)
    # The optimizer, distributed optimizer and clip-grad code choose their fp16/bf16/fp32 branch by
    # comparing param.type() with "torch.cuda.FloatTensor" etc. Answer in those terms, but only to
    # megatron-core callers (frame 0: this function, 1: __torch_function__, 2: the caller), so no
    # other code ever sees a CUDA type name for a CPU tensor.
    if (
        len(args) == 1
        and not kwargs
        and result.startswith("torch.")
        and not result.startswith("torch.cuda.")
        and sys._getframe(2).f_globals.get("__name__", "").startswith("megatron.core")
    ):
        return "torch.cuda." + result[len("torch.") :]
    return result


def _autograd(mode: _CudaToCpuMode, func: Callable, types: Any, args: tuple, kwargs: dict) -> Any:
    # torch pops a mode while it handles a call, and backward()/autograd.backward/autograd.grad are
    # handled calls: without this, everything the engine runs (Function.backward, tensor and
    # grad-accumulation hooks, activation recompute) would run with the mode off. Re-enter the mode
    # and run the function's own body; the engine captures the mode with its thread-local state.
    if _redispatch is None:  # older torch: backward runs without the mode (SP/TP backward will fail)
        return func(*args, **kwargs)
    with mode:
        return _redispatch(func, types, args, kwargs)


_SPECIAL: dict[Any, Callable[..., Any]] = {
    _TB.to: _to,
    _TB.cuda: _cuda,
    _TB.type: _type,
    torch.Tensor.backward: _autograd,
    torch.autograd.backward: _autograd,
    torch.autograd.grad: _autograd,
}


# megatron-core 0.16.1: device="cuda" allocations, param.type() == "torch.cuda.FloatTensor" branches, x.cuda().
class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices to CPU in every torch call (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        # Hot path (every torch op): one dict lookup and one .get.
        if kwargs:
            device = kwargs.get("device")
            # GlobalMemoryBuffer, SP all-gather/reduce-scatter, DDP param/grad buffers, the
            # optimizer, grad scaler, clip-grad and forward_backward_no_pipelining all allocate
            # with device=torch.cuda.current_device() or device="cuda".
            if device is not None and _is_cuda_device(device):
                kwargs = {**kwargs, "device": _CPU}
        else:
            kwargs = {}
        special = _SPECIAL.get(func)
        if special is not None:
            return special(self, func, types, args, kwargs)
        return func(*args, **kwargs)


_MODE = _CudaToCpuMode()


# megatron-core 0.16.1: allocates with device=torch.cuda.current_device() throughout.
def _current_device() -> int:
    # ~175 megatron-core allocations use device=torch.cuda.current_device(), which raises without
    # CUDA. Return the int a one-GPU process would see; the mode maps it to CPU.
    return 0


# megatron-core 0.16.1: Timers and dist_checkpointing call torch.cuda.synchronize() unconditionally.
def _synchronize(device: Any = None) -> None:
    # megatron's Timers.start/stop, async checkpoint scheduling and fully-parallel checkpoint loading
    # call torch.cuda.synchronize() unconditionally; CPU ops have finished when they return.
    return None


# megatron-core 0.16.1: tensor_parallel.random keeps the TP RNG streams in CUDA generators only.
def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    # Replaces megatron's _get_cuda_rng_state: _get_all_rng_states() reads it when activation
    # recompute (tensor_parallel.checkpoint, CheckpointWithoutOutput) saves the RNG streams.
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    # Replaces megatron's _set_cuda_rng_state: recompute restores the saved streams through it.
    torch.set_rng_state(new_state)


# megatron-core 0.16.1: CudaRNGStatesTracker.add/fork seed and swap the CUDA generator.
def _make_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's TP RNG tracker over the CPU default generator (the one CPU dropout draws from).

        ``add`` seeds a named stream; ``fork(name)`` swaps that stream into the CPU generator and
        restores the previous state on exit, exactly as the CUDA tracker does with the CUDA generator.
        """

        def add(self, name: str, seed: int) -> None:
            """Track a new named CPU RNG stream seeded with ``seed``."""
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.default_generator.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            """Run the body on stream ``name``; the default stream is restored afterwards."""
            # The CUDA tracker's fork also warns when the CPU state changed inside the fork; here the
            # forked stream *is* the CPU generator, so that warning would fire on every dropout.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                if self._current_state_name != name:
                    raise Exception(
                        f"current state name {self._current_state_name} is not the same as the "
                        f"desired state name {name}."
                    )
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _enter_mode_in_this_thread() -> None:
    if not getattr(_thread_state, "entered", False):
        # Entered and never exited: the mode stays on this thread's stack for the process's life.
        _MODE.__enter__()
        _thread_state.entered = True


def apply_cpu_compat() -> None:
    """Make megatron-core's CUDA-assuming code run on CPU; a no-op when CUDA is available.

    Idempotent. Call it once at start-up, before ``model_parallel_cuda_manual_seed`` (done by
    :func:`megatron_speech.parallel.initialize.initialize_parallel`). torch keeps function modes per
    thread, so a thread of your own that runs megatron code (other than autograd, which is covered)
    calls it once too: that only enters the device mode in that thread.
    """
    global _applied
    if torch.cuda.is_available():
        return
    with _lock:
        if not _applied:
            if _redispatch is None:
                warnings.warn(
                    f"torch {torch.__version__} has no torch.overrides.redispatch_function: megatron's "
                    "autograd backward code runs without the CPU device mode; use the pinned torch 2.13",
                    stacklevel=2,
                )
            from megatron.core.tensor_parallel import random as mrandom

            torch.cuda.current_device = _current_device
            torch.cuda.synchronize = _synchronize
            # Trackers built from now on (initialize_rng_tracker, also with force_reset or for
            # inference) are CPU trackers; a CUDA tracker built before this call is replaced.
            tracker_cls = _make_tracker_class()
            mrandom.CudaRNGStatesTracker = tracker_cls
            if mrandom._CUDA_RNG_STATE_TRACKER is not None and not isinstance(
                mrandom._CUDA_RNG_STATE_TRACKER, tracker_cls
            ):
                mrandom.initialize_rng_tracker(force_reset=True)
            mrandom._get_cuda_rng_state = _cpu_get_rng_state
            mrandom._set_cuda_rng_state = _cpu_set_rng_state
            _applied = True
    _enter_mode_in_this_thread()


def is_cpu_compat_active() -> bool:
    """True when :func:`apply_cpu_compat` has patched this process and entered the mode in this thread."""
    return _applied and getattr(_thread_state, "entered", False)
