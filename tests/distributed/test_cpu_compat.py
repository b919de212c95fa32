"""megatron-core's real TP/SP/DDP/optimizer/schedule code on CPU under gloo, through apply_cpu_compat().

Each spawned run costs ~3 s of megatron import per rank, so the checks are grouped into two 2-rank runs
(module-scoped fixtures) whose results several tests assert on.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from tests.dist import RankError, run_ranks

H, FFN = 8, 16  # hidden and MLP sizes of the tiny test model


# --------------------------------------------------------------------------------------------------
# Helpers used inside the ranks (imports of megatron happen there, not in the pytest process).


def _config(tp: int, sp: bool = False, dtype: torch.dtype = torch.float32, per_token: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=2,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        sequence_parallel=sp,
        params_dtype=dtype,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        calculate_per_token_loss=per_token,
    )


def _mlp(config):
    """ColumnParallelLinear -> GELU -> RowParallelLinear, as a MegatronModule (DDP needs one)."""
    from megatron.core import tensor_parallel
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule

    class TinyMLP(MegatronModule):
        def __init__(self) -> None:
            super().__init__(config=config)
            self.model_type = ModelType.encoder_or_decoder  # read by the pipeline schedules
            init = torch.nn.init.zeros_  # overwritten by _load_full_weights
            self.fc1 = tensor_parallel.ColumnParallelLinear(
                H, FFN, config=config, init_method=init, bias=True, gather_output=False
            )
            self.fc2 = tensor_parallel.RowParallelLinear(
                FFN, H, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False
            )

        def set_input_tensor(self, input_tensor) -> None:  # required by the schedules; no PP here
            pass

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.fc1(x)
            out, _ = self.fc2(F.gelu(h))
            return out

    return TinyMLP()


def _full_weights(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights, identical on every rank; rounded to `dtype` like a model in that dtype."""
    g = torch.Generator().manual_seed(7)
    w = {
        "fc1.weight": torch.rand(FFN, H, generator=g) - 0.5,
        "fc1.bias": torch.rand(FFN, generator=g) - 0.5,
        "fc2.weight": torch.rand(H, FFN, generator=g) - 0.5,
        "fc2.bias": torch.rand(H, generator=g) - 0.5,
    }
    return {k: v.to(dtype).float() for k, v in w.items()}


def _load_full_weights(model, full: dict[str, torch.Tensor], tp_rank: int, tp: int) -> None:
    f = FFN // tp
    with torch.no_grad():
        model.fc1.weight.copy_(full["fc1.weight"][tp_rank * f : (tp_rank + 1) * f])
        model.fc1.bias.copy_(full["fc1.bias"][tp_rank * f : (tp_rank + 1) * f])
        model.fc2.weight.copy_(full["fc2.weight"][:, tp_rank * f : (tp_rank + 1) * f])
        model.fc2.bias.copy_(full["fc2.bias"])


def _reference(full: dict[str, torch.Tensor]) -> torch.nn.ModuleDict:
    ref = torch.nn.ModuleDict({"fc1": torch.nn.Linear(H, FFN), "fc2": torch.nn.Linear(FFN, H)})
    with torch.no_grad():
        for k, v in full.items():
            ref.get_submodule(k.split(".")[0]).get_parameter(k.split(".")[1]).copy_(v)
    return ref


def _ref_forward(ref: torch.nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    return ref["fc2"](F.gelu(ref["fc1"](x)))


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


# --------------------------------------------------------------------------------------------------
# Run A: TP=2 (2 ranks) — RNG tracker, recompute, Column/Row parallel linears, the mode, idempotency.


class _MakesCudaTensorsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        # What megatron's SP/TP Function.backward does: allocate on the "current CUDA device".
        a = torch.zeros(g.shape, device=torch.cuda.current_device())
        b = torch.ones(g.shape, device="cuda")
        return g * 2 + a + b - 1


def _tp_rank_main(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    from megatron_speech.compat import cpu as cpu_compat
    from megatron_speech.parallel.initialize import destroy_parallel, initialize_parallel

    out: dict = {}

    # With CUDA "available", apply_cpu_compat must not touch anything.
    real_is_available, real_current_device = torch.cuda.is_available, torch.cuda.current_device
    torch.cuda.is_available = lambda: True
    cpu_compat.apply_cpu_compat()
    torch.cuda.is_available = real_is_available
    out["noop_on_cuda"] = (
        torch.cuda.current_device is real_current_device
        and not cpu_compat.is_cpu_compat_active()
        and not torch.overrides._get_current_function_mode_stack()
        and mrandom._get_cuda_rng_state.__module__ == "megatron.core.tensor_parallel.random"
    )

    # TP must divide the world size; refused before any process group forms.
    try:
        initialize_parallel(tensor_model_parallel_size=3)
        out["tp3_error"] = None
    except ValueError as e:
        out["tp3_error"] = str(e)
    out["initialized_after_error"] = torch.distributed.is_initialized()

    torch.manual_seed(100 + rank)  # initialize_parallel must make the default stream rank-independent
    initialize_parallel(tensor_model_parallel_size=2, seed=1234)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    out["tp_rank"] = parallel_state.get_tensor_model_parallel_rank()

    # --- RNG tracker ---
    tracker = tensor_parallel.get_cuda_rng_tracker()
    out["tracker_class"] = type(tracker).__name__
    default_before = torch.get_rng_state()
    with tracker.fork():
        out["mask_fork_1"] = F.dropout(torch.ones(256), 0.5)
    with tracker.fork():
        out["mask_fork_2"] = F.dropout(torch.ones(256), 0.5)
    out["fork_restores_default"] = torch.equal(torch.get_rng_state(), default_before)
    out["mask_default"] = F.dropout(torch.ones(256), 0.5)
    # megatron's TP stream is seeded seed + 2718 + tp_rank: the fork must draw from exactly that.
    saved = torch.get_rng_state()
    torch.default_generator.manual_seed(1234 + 2718 + out["tp_rank"])
    out["fork_matches_megatron_seed"] = torch.equal(out["mask_fork_1"], F.dropout(torch.ones(256), 0.5))
    torch.set_rng_state(saved)

    # --- activation recompute restores the CPU and tracker streams ---
    def dropouts(x: torch.Tensor) -> torch.Tensor:
        with tracker.fork():
            y = F.dropout(x, 0.5)
        return y + 3 * F.dropout(x, 0.5)

    def states():
        return torch.get_rng_state(), {k: v.clone() for k, v in tracker.get_states().items()}

    x = torch.rand(64, requires_grad=True)
    cpu0, trk0 = states()
    y_ckpt = tensor_parallel.checkpoint(dropouts, False, x)
    y_ckpt.backward(torch.arange(64.0))
    grad_ckpt = x.grad.clone()
    cpu_after_ckpt, trk_after_ckpt = states()
    torch.set_rng_state(cpu0)
    tracker.set_states(trk0)
    x.grad = None
    y_plain = dropouts(x)
    y_plain.backward(torch.arange(64.0))
    cpu_after_plain, trk_after_plain = states()
    out["recompute_same_output"] = torch.equal(y_ckpt, y_plain)
    out["recompute_same_grad"] = torch.equal(grad_ckpt, x.grad)
    out["recompute_same_streams_after"] = torch.equal(cpu_after_ckpt, cpu_after_plain) and all(
        torch.equal(trk_after_ckpt[k], trk_after_plain[k]) for k in trk_after_plain
    )

    # --- the device mode: factories, Tensor.to/.cuda/.type, and inside autograd backward ---
    out["zeros_cuda_device"] = str(torch.zeros(2, device="cuda").device)
    out["to_cuda_device"] = str(torch.ones(2).to("cuda:0").device)
    out["dot_cuda_device"] = str(torch.ones(2).cuda().device)
    out["type_for_test_code"] = torch.ones(2).type()
    xb = torch.ones(3, requires_grad=True)
    _MakesCudaTensorsInBackward.apply(xb).sum().backward()  # Tensor.backward
    out["backward_grad"] = xb.grad.clone()
    (gx,) = torch.autograd.grad(_MakesCudaTensorsInBackward.apply(xb).sum(), xb)  # autograd.grad
    out["autograd_grad"] = gx
    hook_devices = []
    xh = torch.ones(2, requires_grad=True)
    xh.register_hook(lambda g: hook_devices.append(str(torch.empty(1, device="cuda").device)))
    torch.autograd.backward((xh * 2).sum())
    out["hook_devices"] = hook_devices

    # megatron's Timers call torch.cuda.synchronize() on every start/stop.
    from megatron.core.timers import Timers

    timers = Timers(log_level=2, log_option="minmax")
    timers("step", log_level=0).start()
    timers("step").stop()
    out["timer_elapsed"] = timers("step").elapsed()

    # --- ColumnParallelLinear + RowParallelLinear at TP=2 vs. a torch.nn.Linear pair ---
    full = _full_weights()
    s, b = 6, 3
    xg = torch.Generator().manual_seed(11)
    x_full = torch.randn(s, b, H, generator=xg)
    dy_full = torch.randn(s, b, H, generator=xg)
    ref = _reference(full)
    x_ref = x_full.clone().requires_grad_(True)
    y_ref = _ref_forward(ref, x_ref)
    y_ref.backward(dy_full)
    for sp in (False, True):
        model = _mlp(_config(tp=2, sp=sp))
        _load_full_weights(model, full, out["tp_rank"], 2)
        chunk = slice(out["tp_rank"] * s // 2, (out["tp_rank"] + 1) * s // 2)
        x_in = (x_full[chunk] if sp else x_full).clone().requires_grad_(True)  # SP: [s/tp, b, h]
        y = model(x_in)
        y.backward(dy_full[chunk] if sp else dy_full)
        # SP: the row bias is applied to this rank's sequence chunk; its grad is partial and marked
        # `sequence_parallel` for megatron's finalize_model_grads to sum over TP. Sum it here.
        bias_grad = model.fc2.bias.grad.clone()
        if sp:
            assert getattr(model.fc2.bias, "sequence_parallel", False)
            torch.distributed.all_reduce(bias_grad, group=tp_group)
        res = {
            "y": (_gather(y, 0, tp_group) if sp else y, y_ref),
            "x_grad": (_gather(x_in.grad, 0, tp_group) if sp else x_in.grad, x_ref.grad),
            "fc1.weight": (_gather(model.fc1.weight.grad, 0, tp_group), ref["fc1"].weight.grad),
            "fc1.bias": (_gather(model.fc1.bias.grad, 0, tp_group), ref["fc1"].bias.grad),
            "fc2.weight": (_gather(model.fc2.weight.grad, 1, tp_group), ref["fc2"].weight.grad),
            "fc2.bias": (bias_grad, ref["fc2"].bias.grad),
        }
        out[f"linear_sp{int(sp)}"] = {k: (a.detach(), e.detach()) for k, (a, e) in res.items()}

    # --- idempotency: a second (and third) apply changes nothing, the live tracker included ---
    def snapshot():
        modes = [m for m in torch.overrides._get_current_function_mode_stack()]
        return (
            len(modes),
            torch.cuda.current_device,
            mrandom.CudaRNGStatesTracker,
            mrandom._get_cuda_rng_state,
            mrandom._CUDA_RNG_STATE_TRACKER,
            {k: v.clone() for k, v in tracker.get_states().items()},
        )

    before = snapshot()
    cpu_compat.apply_cpu_compat()
    cpu_compat.apply_cpu_compat()
    after = snapshot()
    out["mode_count"] = before[0]
    out["idempotent"] = before[:5] == after[:5] and all(torch.equal(before[5][k], after[5][k]) for k in before[5])

    # --- a new thread: no mode until it calls apply_cpu_compat() itself ---
    thread_result: dict = {}

    def in_thread() -> None:
        try:
            torch.zeros(1, device="cuda")
            thread_result["before"] = "no error"
        except Exception as e:  # expected: torch keeps modes per thread
            thread_result["before"] = type(e).__name__
        cpu_compat.apply_cpu_compat()
        thread_result["after"] = str(torch.zeros(1, device="cuda").device)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    out["thread"] = thread_result

    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def tp_run() -> list[dict]:
    return run_ranks(_tp_rank_main, 2, timeout=180)


def test_apply_is_noop_when_cuda_is_available(tp_run):
    assert all(r["noop_on_cuda"] for r in tp_run)


def test_tp_must_divide_world_size(tp_run):
    for r in tp_run:
        assert r["tp3_error"] is not None and "tensor_model_parallel_size=3" in r["tp3_error"]
        assert "2" in r["tp3_error"]
        assert not r["initialized_after_error"]


def test_rng_tracker_forks_per_tp_rank(tp_run):
    r0, r1 = tp_run
    assert [r0["tp_rank"], r1["tp_rank"]] == [0, 1]
    assert r0["tracker_class"] == "CpuRNGStatesTracker"
    # inside fork(): TP-rank-dependent streams, from megatron's seed + 2718 + tp_rank, advancing
    assert not torch.equal(r0["mask_fork_1"], r1["mask_fork_1"])
    assert all(r["fork_matches_megatron_seed"] for r in tp_run)
    assert not torch.equal(r0["mask_fork_1"], r0["mask_fork_2"])
    # outside: the default stream, identical on the TP ranks (despite different seeds before init)
    assert torch.equal(r0["mask_default"], r1["mask_default"])
    assert all(r["fork_restores_default"] for r in tp_run)


def test_activation_recompute_replays_rng_streams(tp_run):
    for r in tp_run:
        assert r["recompute_same_output"]
        assert r["recompute_same_grad"]
        assert r["recompute_same_streams_after"]


def test_device_mode_rewrites_cuda_to_cpu_also_in_backward(tp_run):
    for r in tp_run:
        assert r["zeros_cuda_device"] == r["to_cuda_device"] == r["dot_cuda_device"] == "cpu"
        assert r["type_for_test_code"] == "torch.FloatTensor"  # the CUDA type name is for megatron only
        assert torch.equal(r["backward_grad"], torch.full((3,), 2.0))
        assert torch.equal(r["autograd_grad"], torch.full((3,), 2.0))
        assert r["hook_devices"] == ["cpu"]
        assert r["timer_elapsed"] >= 0.0


@pytest.mark.parametrize("sp", [False, True], ids=["sp_off", "sp_on"])
def test_column_row_parallel_tp2_matches_linear_pair(tp_run, sp):
    for r in tp_run:
        for name, (got, expected) in r[f"linear_sp{int(sp)}"].items():
            assert got.shape == expected.shape, name
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_apply_cpu_compat_is_idempotent(tp_run):
    for r in tp_run:
        assert r["mode_count"] == 1
        assert r["idempotent"]
        # torch keeps function modes per thread: a new thread needs its own apply_cpu_compat() call
        assert r["thread"]["before"] != "no error" and r["thread"]["after"] == "cpu"


# --------------------------------------------------------------------------------------------------
# Run B: DP=2 (TP=1) — DDP (distributed optimizer, overlapped grad reduce) + get_megatron_optimizer,
# driven by forward_backward_no_pipelining with per-token loss and unequal token counts per rank.

# (sequence lengths of the two micro-batches) per DP rank: unequal on purpose
_SEQS = {0: (3, 4), 1: (5, 2)}
_B = 2
_LR, _EPS = 0.1, 0.1  # eps comparable to |grad|: the Adam step then depends on the gradient's scale


def _microbatches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    data = {
        r: [(torch.randn(s, _B, H, generator=g), torch.randn(s, _B, H, generator=g)) for s in seqs]
        for r, seqs in _SEQS.items()
    }
    return data[rank]


def _ddp_step(dtype: torch.dtype, inject_inf_step2: bool) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
    from megatron.core.transformer.module import Float16Module

    dp_rank = parallel_state.get_data_parallel_rank()
    config = _config(tp=1, dtype=dtype, per_token=True)
    full = _full_weights(dtype)
    module = _mlp(config)
    _load_full_weights(module, full, 0, 1)
    if dtype != torch.float32:
        module = Float16Module(config, module)  # casts params and (positional) inputs
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_grad_reduce=True, grad_reduce_in_fp32=False
    )
    model = DistributedDataParallel(config, ddp_config, module)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=_LR,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_eps=_EPS,
        clip_grad=0.0,
        use_distributed_optimizer=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        initial_loss_scale=2.0**6,
        hysteresis=1,
        loss_scale_window=1000,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync  # accumulate over micro-batches, reduce once
    config.grad_scale_func = optimizer.scale_loss

    def loss_func(target: torch.Tensor, output: torch.Tensor):
        loss_sum = ((output.float() - target) ** 2).sum()
        num_tokens = torch.tensor(target.shape[0] * target.shape[1], dtype=torch.int)
        return loss_sum, num_tokens, {"loss_sum": loss_sum.detach().clone()}

    def forward_step(data_iterator, model):
        x, target = next(data_iterator)
        return model(x), lambda output: loss_func(target, output)

    def train_step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        store = forward_backward_no_pipelining(
            forward_step_func=forward_step,
            data_iterator=iter(_microbatches(dp_rank)),
            model=[model],
            num_microbatches=2,
            seq_length=0,
            micro_batch_size=_B,
            forward_only=False,
        )
        return store

    def params() -> dict[str, torch.Tensor]:
        return {k.split("module.")[-1]: p.detach().float().clone() for k, p in model.named_parameters()}

    out: dict = {"dtype": str(dtype)}
    store = train_step()
    out["losses"] = [d["loss_sum"].item() for d in store]
    success, grad_norm, _ = optimizer.step()
    out["step1_success"] = bool(success)
    out["params1"] = params()

    # Reference: one process, plain torch Adam, gradient of the summed loss / global token count.
    ref = _reference(full)
    total = sum(s * _B for seqs in _SEQS.values() for s in seqs)
    loss = sum(((_ref_forward(ref, x) - t) ** 2).sum() for r in _SEQS for x, t in _microbatches(r)) / total
    loss.backward()
    torch.optim.Adam(ref.parameters(), lr=_LR, betas=(0.9, 0.98), eps=_EPS, weight_decay=0.0).step()
    out["ref_params1"] = {k: v.detach().clone() for k, v in ref.named_parameters()}
    out["ref_losses"] = [((_ref_forward(_reference(full), x) - t) ** 2).sum().item() for x, t in _microbatches(dp_rank)]
    out["params0"] = full

    if inject_inf_step2:
        scale_before = optimizer.get_loss_scale().item()
        train_step()
        if dp_rank == 1:  # an inf in one rank's grad shard must make *every* rank skip the step
            for buf in model.buffers:
                buf.grad_data.fill_(float("inf"))
        success, _, _ = optimizer.step()
        out["step2_success"] = bool(success)
        out["params2"] = params()
        out["scale"] = (scale_before, optimizer.get_loss_scale().item())
    return out


def _dp_rank_main(rank: int, world_size: int) -> list[dict]:
    from megatron_speech.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(tensor_model_parallel_size=1, seed=1234)
    results = [
        _ddp_step(torch.float32, inject_inf_step2=False),
        _ddp_step(torch.bfloat16, inject_inf_step2=False),
        _ddp_step(torch.float16, inject_inf_step2=True),
    ]
    destroy_parallel()
    return results


@pytest.fixture(scope="module")
def dp_run() -> list[list[dict]]:
    return run_ranks(_dp_rank_main, 2, timeout=180)


# atol per dtype: about one unit in the last place of a parameter near 0.5; the step itself is ~0.05
_ATOL = {"torch.float32": 1e-6, "torch.bfloat16": 5e-3, "torch.float16": 6e-4}


@pytest.mark.parametrize("index", [0, 1, 2], ids=["fp32", "bf16", "fp16"])
def test_ddp_distributed_optimizer_step_matches_torch_adam(dp_run, index):
    for rank_results in dp_run:
        r = rank_results[index]
        assert r["step1_success"]
        atol = _ATOL[r["dtype"]]
        for name, expected in r["ref_params1"].items():
            got = r["params1"][name]
            moved = (expected - r["params0"][name]).abs().max().item()
            assert moved > 10 * atol, name  # the comparison can tell a step from no step
            torch.testing.assert_close(got, expected, rtol=0, atol=atol, msg=f"{r['dtype']} {name}")


def test_forward_backward_no_pipelining_per_token_loss(dp_run):
    # forward_data_store holds each micro-batch's loss *sum* (not divided by its own token count);
    # the gradient division by the global token count is checked by the Adam-step comparison above.
    for rank_results in dp_run:
        r = rank_results[0]
        assert len(r["losses"]) == 2
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(r["ref_losses"]), rtol=1e-5, atol=1e-5)


def test_fp16_overflow_on_one_rank_skips_the_step_everywhere(dp_run):
    for rank_results in dp_run:
        r = rank_results[2]
        assert r["step2_success"] is False
        for name, p in r["params1"].items():
            assert torch.equal(r["params2"][name], p), name
        assert r["scale"] == (2.0**6, 2.0**5)  # hysteresis=1: halved on the first overflow


# --------------------------------------------------------------------------------------------------
# run_ranks itself: failures and hangs come back to the parent.


def _fails_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise KeyError("rank one is broken")
    return rank


def _sleeps(rank: int, world_size: int) -> None:
    time.sleep(60)


def test_run_ranks_reports_a_rank_error_and_a_timeout():
    with pytest.raises(RankError, match="rank one is broken") as info:
        run_ranks(_fails_on_rank_1, 2, timeout=60)
    assert info.value.rank == 1 and "KeyError" in info.value.remote_traceback
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0\]"):
        run_ranks(_sleeps, 1, timeout=3)
    assert time.monotonic() - start < 15
