"""The CUDA paths of the model and the training step, checked on one GPU (run by bench/gpu_check.sh).

    python bench/gpu_checks.py [--device cuda|cpu] [--checks NAME,...] [--json OUT]

Checks, each PASS / FAIL / SKIP with its numbers:
- gpu_vs_cpu:   the same weights and batch give the same loss and gradients on the GPU (fp32, TF32 off) as on the
                CPU path (a subprocess with CUDA hidden: gloo + the CPU compatibility layer);
- bf16:         the model wrapped for bf16 training (Float16Module, megatron DDP): loss within 2% of fp32, gradients
                finite and aligned with fp32's (cosine > 0.99);
- sdpa_flash:   forward + backward in bf16 with attention dropout on, restricted to the flash-attention SDPA
                kernel (fails if our attention inputs cannot take it);
- train_steps:  a few real training steps (train_step: forward_backward_no_pipelining, DDP, megatron optimizer)
                with NCCL at world size 1, bf16 and fp16 (dynamic loss scale): finite losses, updates applied;
- fp16_scale:   one step in fp16 and one in fp32 from the same weights and batch, wired as training wires them:
                equal grad norms (within 5%) and the configured initial loss scale kept unless an overflow was
                reported (a loss never multiplied by the scale gives a ratio of 2^-16);
- drivers:      the entry points as a user runs them, each a fresh process on this device: pretrain 3 steps,
                resume to 4, fine-tune (speaker) 2 steps from it, evaluate, embed (model and batches placed on the
                GPU by the library, collectives on NCCL);
- te:           XL with Transformer Engine's spec (bf16): a local-spec checkpoint loads into it, forward/backward
                without a mask (pre-training) and with a padding mask (fine-tuning), outputs equal to the local
                spec's on the same weights; "SKIPPED: Transformer Engine not importable here (...)" where it is
                not (bench/gpu_check.sh runs it as its own stage: `--checks te`);
- tp2:          SKIP on one GPU (NCCL refuses two ranks on one GPU); the TP equalities are tested on CPU.
With `--device cpu` (the dry run of a machine without a GPU) the same code runs on the CPU path: the plumbing
is exercised, the GPU-only parts are SKIP. Exit status: 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 1234
NUM_FRAMES, BATCH_SIZE = 48, 2


def tiny(*overrides: str):
    """The tiny preset with dropouts off (deterministic comparisons) unless overridden."""
    from megatron_speech.config import load_config

    off = [f"model.{k}=0.0" for k in ("dropout", "attention_dropout", "feature_proj_dropout",
                                      "feature_quantizer_dropout")]
    return load_config(str(ROOT / "configs/tiny.yaml"), off + list(overrides))


def make_batch(cfg, seed: int = 0) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import make_batch as bench_batch

    return bench_batch(cfg.model, BATCH_SIZE, NUM_FRAMES, seed)


def build(cfg, precision: str = "fp32"):
    from megatron_speech.models.wav2vec2.factory import build_model

    # the local spec, TE or not (the CPU reference has no TE; the `te` stage checks TE's spec against it)
    model = build_model(cfg.model, precision=precision, use_te=False)
    model.quantizer.gumbel_noise = False  # deterministic straight-through codes: comparable across devices
    return model


def reference(path: str) -> None:
    """CPU reference (run with CUDA hidden): weights, batch, loss and gradients of one forward/backward."""
    import torch

    from megatron_speech.models.wav2vec2 import interop
    from megatron_speech.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(1, SEED)
    cfg = tiny()
    model = build(cfg).train()
    batch = make_batch(cfg)
    out = model(batch["waveform"], batch["mask"], batch["negatives"])
    out.loss.backward()
    torch.save({"state": interop.canonical_state_dict(model), "grads": interop.canonical_state_dict(model, grads=True),
                "loss": out.loss.detach(), "batch": batch}, path)
    destroy_parallel()


def _grad_stats(grads: dict, ref: dict) -> dict:
    import torch

    worst, cos_min = 0.0, 1.0
    for key, expected in ref.items():
        got = grads[key].float().cpu()
        scale = expected.abs().max().clamp(min=1e-12)
        worst = max(worst, float((got - expected).abs().max() / scale))
        cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0, eps=1e-12)
        if expected.abs().max() > 0:
            cos_min = min(cos_min, float(cos))
    return {"max_rel_grad_err": worst, "min_grad_cosine": cos_min,
            "all_finite": all(bool(g.isfinite().all()) for g in grads.values())}


def check_gpu_vs_cpu(device: str, ref: dict) -> dict:

    from megatron_speech.models.wav2vec2 import interop

    model = build(tiny()).train()
    interop.load_canonical(model, ref["state"])
    model.to(device)
    batch = {k: v.to(device) for k, v in ref["batch"].items()}
    out = model(batch["waveform"], batch["mask"], batch["negatives"])
    out.loss.backward()
    loss_err = abs(float(out.loss.detach()) - float(ref["loss"])) / abs(float(ref["loss"]))
    stats = _grad_stats(interop.canonical_state_dict(model, grads=True), ref["grads"])
    ok = loss_err < 1e-4 and stats["max_rel_grad_err"] < 1e-3 and stats["all_finite"]
    return {"status": "PASS" if ok else "FAIL", "loss": float(out.loss.detach()), "loss_ref": float(ref["loss"]),
            "loss_rel_err": loss_err, **stats, "limits": "loss 1e-4, grads 1e-3 of each tensor's max"}


def _wrapped(precision: str, ref: dict, device: str, *overrides: str):
    from megatron_speech.models.wav2vec2 import interop
    from megatron_speech.training.parallelize import wrap_for_training

    model = build(tiny(*overrides), precision).train()
    interop.load_canonical(model, ref["state"])
    model.to(device)
    return model, wrap_for_training(model, use_distributed_optimizer=True)


def check_bf16(device: str, ref: dict) -> dict:
    from megatron_speech.models.wav2vec2 import interop

    model, ddp = _wrapped("bf16", ref, device)
    batch = {k: v.to(device) for k, v in ref["batch"].items()}
    ddp.zero_grad_buffer()
    out = ddp(batch["waveform"], mask=batch["mask"], negatives=batch["negatives"])
    out.loss.backward()
    loss_err = abs(float(out.loss.detach()) - float(ref["loss"])) / abs(float(ref["loss"]))
    stats = _grad_stats(interop.canonical_state_dict(model, grads=True), ref["grads"])
    ok = loss_err < 2e-2 and stats["min_grad_cosine"] > 0.99 and stats["all_finite"]
    return {"status": "PASS" if ok else "FAIL", "loss": float(out.loss.detach()), "loss_fp32_cpu": float(ref["loss"]),
            "loss_rel_err": loss_err, **stats, "limits": "loss 2e-2, grad cosine > 0.99"}


def check_sdpa_flash(device: str, ref: dict) -> dict:
    if device != "cuda":
        return {"status": "SKIP", "why": "no GPU: SDPA runs its math kernel on CPU"}
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, ddp = _wrapped("bf16", ref, device, "model.attention_dropout=0.1")
    batch = {k: v.to(device) for k, v in ref["batch"].items()}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # no fallback: raises if flash cannot take our inputs
        ddp.zero_grad_buffer()
        out = ddp(batch["waveform"], mask=batch["mask"], negatives=batch["negatives"])
        out.loss.backward()
    torch.cuda.synchronize()
    finite = all(bool(p.main_grad.isfinite().all()) for p in model.parameters() if hasattr(p, "main_grad"))
    return {"status": "PASS" if finite and torch.isfinite(out.loss) else "FAIL", "loss": float(out.loss.detach()),
            "grads_finite": finite, "device": torch.cuda.get_device_name()}


def check_train_steps(device: str, ref: dict, steps: int = 4) -> dict:
    import torch

    from megatron_speech.training.optim import build_optimizer
    from megatron_speech.training.step import train_step

    results = {}
    for precision in ("bf16", "fp16"):
        cfg = tiny(f"train.precision={precision}", "model.dropout=0.05", "model.attention_dropout=0.05")
        model, ddp = _wrapped(precision, ref, device, "model.dropout=0.05", "model.attention_dropout=0.05")
        model.quantizer.gumbel_noise = True
        optimizer = build_optimizer(ddp, cfg.optim, cfg.train, cfg.parallel)
        losses, updated = [], []
        for step in range(steps):
            batch = {k: v.to(device) for k, v in make_batch(cfg, seed=step).items()}
            out = train_step(ddp, optimizer, [batch])
            losses.append(out["loss"])
            updated.append(out["updated"])
        if device == "cuda":
            torch.cuda.synchronize()
        finite = all(torch.isfinite(torch.tensor(losses)))
        # fp16 may skip a step on an overflow (dynamic loss scale) by design; fp16_scale checks the scaling
        ok = finite and (any(updated) if precision == "fp16" else all(updated))
        results[precision] = {"ok": ok, "losses": losses, "updated": updated,
                              "loss_scale": float(optimizer.get_loss_scale())}
    backend = torch.distributed.get_backend()
    return {"status": "PASS" if all(r["ok"] for r in results.values()) else "FAIL", "backend": backend,
            "world_size": torch.distributed.get_world_size(), **results}


FP16_GRAD_NORM_RTOL = 0.05  # fp16 activations against fp32, one step of the tiny model; the bug gave 2^-16


def check_fp16_scale(device: str, ref: dict, tries: int = 4) -> dict:
    """One optimizer step in fp16 and one in fp32 from the same weights and batch, wired as training wires them
    (wrap_for_training, build_optimizer, train_step): the fp16 grad norm (megatron's, after unscaling) must equal
    fp32's, and the loss scale must still be the configured initial one unless an overflow was reported. A loss
    that is never multiplied by the scale while the optimizer still divides by it gives a ratio of 2^-16."""
    from megatron_speech.training.optim import build_optimizer
    from megatron_speech.training.step import train_step

    batch = {k: v.to(device) for k, v in ref["batch"].items()}
    runs = {}
    for precision in ("fp32", "fp16"):
        cfg = tiny(f"train.precision={precision}")
        _, ddp = _wrapped(precision, ref, device)
        optimizer = build_optimizer(ddp, cfg.optim, cfg.train, cfg.parallel)
        initial = float(optimizer.get_loss_scale())
        overflows, out = 0, {}
        for _ in range(tries):  # an overflow skips the step and leaves the weights as they were: same step again
            out = train_step(ddp, optimizer, [batch])
            if out["updated"]:
                break
            overflows += 1
        runs[precision] = {"updated": out["updated"], "grad_norm": out["grad_norm"], "loss": out["loss"],
                           "overflows_reported": overflows, "loss_scale_before": initial,
                           "loss_scale_after": float(optimizer.get_loss_scale()),
                           "configured_initial_loss_scale": cfg.train.initial_loss_scale}
    f32, f16 = runs["fp32"], runs["fp16"]
    ratio = (f16["grad_norm"] / f32["grad_norm"]) if f16["grad_norm"] and f32["grad_norm"] else None
    problems = []
    if not f32["updated"] or not f16["updated"]:
        problems.append(f"no update (fp32 {f32['updated']}, fp16 {f16['updated']} after {tries} tries)")
    if ratio is None or abs(ratio - 1.0) > FP16_GRAD_NORM_RTOL:
        problems.append(f"fp16/fp32 grad norm ratio {ratio} (limit 1 +- {FP16_GRAD_NORM_RTOL})")
    if f16["loss_scale_before"] != f16["configured_initial_loss_scale"]:
        problems.append(f"fp16 started at loss scale {f16['loss_scale_before']}, configured "
                        f"{f16['configured_initial_loss_scale']}")
    if f16["overflows_reported"] == 0 and f16["loss_scale_after"] != f16["loss_scale_before"]:
        problems.append(f"loss scale moved {f16['loss_scale_before']} -> {f16['loss_scale_after']} without an "
                        "overflow")
    if f16["overflows_reported"] and f16["loss_scale_after"] > f16["loss_scale_before"]:
        problems.append("loss scale grew after an overflow")
    return {"status": "FAIL" if problems else "PASS", "grad_norm_ratio_fp16_fp32": ratio,
            "loss_scale": f16["loss_scale_after"], "problems": problems, "fp32": f32, "fp16": f16,
            "limits": f"grad norm ratio 1 +- {FP16_GRAD_NORM_RTOL}; loss scale = the configured initial one unless "
                      "an overflow was reported"}


TE_SECONDS = 4.0  # per utterance in the TE check: a 2 x 4 s batch, small next to XL's weights


def _te_skip(device: str) -> str | None:
    """Why the TE check cannot run here, or None when it can."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # a half-installed TE raises more than ImportError
        return f"SKIPPED: Transformer Engine not importable here ({type(e).__name__}: {str(e)[:200]})"
    if device != "cuda":
        return "SKIPPED: Transformer Engine imports but there is no GPU here (its modules are CUDA-only)"
    return None


def _cosine(a, b) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def check_te(device: str, ref: dict | None = None, config: str = "configs/xl.yaml", te_spec: bool = True) -> dict:
    """XL built with Transformer Engine's spec (the path NVIDIA's container takes), bf16 as trained:
    - load_local: a checkpoint written from the local (SDPA) spec (save_model_only) loads into it
      (load_model_weights: TE's `_extra_state` absent from the file);
    - pretrain: forward/backward of the pre-training loss, no attention mask (what pre-training passes);
    - padded: the fine-tuning path, `encode` with a padding mask, forward/backward: TE must take the mask;
    - TE against local on the same weights: loss, and hidden states at real frames (cosine), and a padded
      utterance's states equal to the same utterance run alone (the mask really masks).
    Each part is tried on its own, so one failure does not hide the others. (`config` and `te_spec=False` let the
    CPU tests run this plumbing with the local spec in both places.)"""
    why = _te_skip(device)
    if why is not None:
        return {"status": "SKIP", "why": why}
    import torch

    from megatron_speech.checkpoint.model_io import load_model_weights, save_model_only
    from megatron_speech.config import load_config
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.training.parallelize import wrap_for_training

    off = [f"model.{k}=0.0" for k in ("dropout", "attention_dropout", "feature_proj_dropout",
                                      "feature_quantizer_dropout")]
    cfg = load_config(str(ROOT / config), off + ["train.precision=bf16"])
    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import make_batch as bench_batch

    frames = cfg.model.num_frames(int(TE_SECONDS * 16000))
    frames -= frames % 8
    batch = {k: v.to(device) for k, v in bench_batch(cfg.model, 2, frames, seed=3).items()}
    parts: dict[str, dict] = {}

    def part(name, fn):
        t0 = time.perf_counter()
        try:
            parts[name] = {"status": "PASS", **(fn() or {})}
        except Exception as e:
            parts[name] = {"status": "FAIL", "error": f"{type(e).__name__}: {str(e)[:800]}",
                           "traceback": traceback.format_exc()[-2500:]}
        parts[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"  te/{name}: {parts[name]['status']} {json.dumps(parts[name], default=str)[:400]}", flush=True)
        return parts[name]["status"] == "PASS"

    def build(use_te: bool):
        model = build_model(cfg.model, precision="bf16", use_te=use_te)
        model.quantizer.gumbel_noise = False  # deterministic codes: the two specs are comparable
        return model.train()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    models: dict[str, torch.nn.Module] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def save_local():
            models["local"] = build(False)
            save_model_only(os.path.join(tmp, "local"), models["local"], cfg)

        def build_te():
            models["te"] = build(te_spec)
            # megatron's TE wrappers live in megatron.core.extensions: look for TE in each module's classes
            te_modules = sorted({type(m).__name__ for m in models["te"].encoder.modules()
                                 if any(c.__module__.startswith("transformer_engine") for c in type(m).__mro__)})
            if te_spec and not te_modules:
                raise AssertionError("use_te=True built no Transformer Engine module")
            return {"te_modules": te_modules}

        def load_local():
            load_model_weights(os.path.join(tmp, "local"), models["te"])

        saved = part("save_local", save_local)
        built = part("build_te", build_te)
        loaded = False
        if built and saved:
            loaded = part("load_local", load_local)
        else:
            parts["load_local"] = {"status": "FAIL", "error": "not tried: building or saving failed"}
    if not built:
        return {"status": "FAIL", **parts}
    ddp = {name: wrap_for_training(m, use_distributed_optimizer=True) for name, m in models.items()}
    losses: dict[str, float] = {}

    def pretrain(name):
        def run():
            d = ddp[name]
            d.zero_grad_buffer()
            out = d(batch["waveform"], mask=batch["mask"], negatives=batch["negatives"])
            out.loss.backward()
            sync()
            finite = all(bool(p.main_grad.isfinite().all()) for p in models[name].parameters()
                         if hasattr(p, "main_grad"))
            losses[name] = float(out.loss.detach())
            if not (finite and torch.isfinite(out.loss)):
                raise AssertionError(f"loss {losses[name]}, gradients finite: {finite}")
            return {"loss": losses[name]}
        return run

    # fine-tuning's call: the utterance 1 is cut to 60% and right-padded, so TE must apply a padding mask
    real = int(frames * 0.6)
    padding_mask = torch.zeros(2, frames, dtype=torch.bool, device=device)
    padding_mask[1, real:] = True
    wave = batch["waveform"].clone()
    wave[1, cfg.model.num_samples(real):] = 0.0
    states: dict[str, torch.Tensor] = {}

    def padded(name):
        def run():
            d = ddp[name]
            d.zero_grad_buffer()
            inner = models[name]  # the bf16 weights live in it after Float16Module's cast
            x = inner.encode(wave.to(torch.bfloat16), padding_mask=padding_mask)
            (x.float().masked_fill(padding_mask[..., None], 0.0).pow(2).mean()).backward()
            with torch.no_grad():
                alone = inner.encode(wave[1:2, :cfg.model.num_samples(real)].to(torch.bfloat16))
            sync()
            states[name] = x.detach()
            finite = all(bool(p.main_grad.isfinite().all()) for p in inner.parameters() if hasattr(p, "main_grad"))
            cos_alone = _cosine(x[1, :real], alone[0])
            if not (finite and bool(x.isfinite().all())):
                raise AssertionError(f"non-finite states or gradients (gradients finite: {finite})")
            if cos_alone < 0.99:
                raise AssertionError(f"padded utterance != the same utterance alone (cosine {cos_alone:.4f}): "
                                     "the padding mask is not applied")
            return {"cosine_padded_vs_alone": cos_alone}
        return run

    for name in ddp:
        part(f"pretrain_{name}", pretrain(name))
        part(f"padded_{name}", padded(name))
    if loaded and "te" in states and "local" in states and "te" in losses and "local" in losses:
        def compare():
            keep = ~padding_mask
            cos = _cosine(states["te"][keep], states["local"][keep])
            loss_err = abs(losses["te"] - losses["local"]) / abs(losses["local"])
            if cos < 0.99 or loss_err > 3e-2:
                raise AssertionError(f"TE vs local on the same weights: states cosine {cos:.4f} (limit 0.99), loss "
                                     f"rel err {loss_err:.4f} (limit 3e-2)")
            return {"states_cosine": cos, "loss_rel_err": loss_err, "loss_te": losses["te"],
                    "loss_local": losses["local"]}
        part("te_vs_local", compare)
    else:
        parts["te_vs_local"] = {"status": "FAIL", "error": "not compared: an earlier part failed"}
    failed = [n for n, r in parts.items() if r["status"] == "FAIL"]
    return {"status": "FAIL" if failed else "PASS", "failed_parts": failed, "frames": frames, **parts,
            "te_version": getattr(sys.modules.get("transformer_engine"), "__version__", None)}


def check_drivers(device: str, ref: dict) -> dict:
    import wave

    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import write_split

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    rng = np.random.default_rng(SEED)
    runs, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        utterances = []
        for i in range(12):
            t = np.arange(int(rng.uniform(1.0, 2.0) * 16_000)) / 16_000
            audio = np.sin(2 * np.pi * (120 + 60 * (i % 2)) * t) * 8000 + rng.standard_normal(len(t)) * 300
            utterances.append((f"u{i:02d}", audio.astype(np.int16), {"language": "xx", "speaker": f"s{i % 2}"}))
        prefix = os.path.join(tmp, "synthetic")
        write_split(prefix, "train", utterances[:10])
        write_split(prefix, "valid", utterances[10:])
        with wave.open(os.path.join(tmp, "a.wav"), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(16_000)
            f.writeframes(utterances[0][1].tobytes())
        pre, ft = os.path.join(tmp, "pretrain"), os.path.join(tmp, "finetune")
        common = [f"data.prefix={prefix}", f"train.save_dir={pre}", "train.eval_interval=2", "train.log_interval=1",
                  "data.max_tokens=64000", "train.precision=bf16" if device == "cuda" else "train.precision=fp32"]
        commands = {
            "pretrain": ["-m", "megatron_speech.pretrain", "--config", "configs/tiny.yaml", "train.max_steps=3",
                         *common],
            "resume": ["-m", "megatron_speech.pretrain", "--config", "configs/tiny.yaml", "train.max_steps=4",
                       *common],
            "finetune": ["-m", "megatron_speech.finetune", "--config", "configs/finetune/speaker.yaml",
                         f"pretrained={pre}", f"data.prefix={prefix}", f"train.save_dir={ft}", "train.max_steps=2",
                         "finetune.freeze_encoder_steps=1", "train.eval_interval=2", "data.max_tokens=64000",
                         "data.max_sample_seconds=4"],
            "evaluate": ["-m", "megatron_speech.evaluate", "--checkpoint", ft, "--manifest",
                         f"{prefix}_valid.manifest.jsonl"],
            "embed": ["-m", "megatron_speech.embed", "--checkpoint", pre, "--audio", os.path.join(tmp, "a.wav"),
                      "--output", os.path.join(tmp, "a.npy")],
        }
        for name, args in commands.items():
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
            runs[name] = {"exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
            if proc.returncode != 0:
                runs[name]["output_tail"] = (proc.stdout + proc.stderr)[-2500:]
                ok = False
                break
        if ok:
            rows = [json.loads(x) for x in Path(pre, "metrics.jsonl").read_text().splitlines() if x.strip()]
            steps = [r["step"] for r in rows if r["split"] == "train"]
            runs["pretrain_steps_logged"] = steps
            runs["embedding_shape"] = list(np.load(os.path.join(tmp, "a.npy")).shape)
            ok = steps == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    return {"status": "PASS" if ok else "FAIL", **runs}


def check_tp2(device: str) -> dict:
    import torch

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus < 2:
        return {"status": "SKIP", "why": f"TP=2 needs 2 GPUs (NCCL refuses two ranks on one GPU); {gpus} here. "
                "TP=2 = TP=1 equalities are tested on CPU (tests/distributed/test_tensor_parallel.py); "
                "on a 2-GPU machine: "
                "python bench/train_throughput.py --config configs/xl.yaml --tp 2"}
    return {"status": "SKIP", "why": f"{gpus} GPUs: run bench/train_throughput.py --tp 2 for the TP=2 figures"}


def figures(folder: str) -> list[str]:
    """The figures docs/performance.md §5 records, one line each, from the JSON files of a gpu_check.sh run
    (checks.json, te.json, bench.json in `folder`); a missing file or field says so instead of failing."""
    def read(name: str) -> dict | None:
        path = Path(folder, name)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return {"_missing": f"{name}: {type(e).__name__}"}

    lines = []
    checks, te, bench = read("checks.json"), read("te.json"), read("bench.json")
    env = checks.get("environment") or te.get("environment") or {}
    lines.append(f"device: {env.get('gpu') or env.get('device', '?')} | torch {env.get('torch', '?')} | CUDA "
                 f"{env.get('cuda')} | megatron-core {env.get('megatron_core', '?')}")
    if "_missing" in bench:
        lines.append(f"MFU: no benchmark result ({bench['_missing']})")
    else:
        ours = bench.get("impls", {}).get("ours")
        if ours is None:
            lines.append(f"MFU: not measured (ours failed: {bench.get('failed', {}).get('ours', '?')})")
        else:
            mfu = f"{100 * ours['mfu']:.1f}%" if ours.get("mfu") is not None else "n/a (no GPU peak)"
            lines.append(f"MFU: ours {mfu} | {ours['audio_s_per_s_per_device']:.2f} audio-s/s per device | "
                         f"{ours['model_tflops_per_s_per_device']:.2f} model TFLOP/s | peak memory "
                         f"{ours.get('peak_memory_gib')} GiB | {bench.get('device')}")
        for name, value in bench.get("ratios", {}).items():
            lines.append(f"ratio {name} = {value:.3f}")
        for impl, why in bench.get("failed", {}).items():
            lines.append(f"benchmark FAILED {impl}: {why}")
    fp16 = checks.get("fp16_scale")
    if not fp16:
        lines.append(f"fp16: no result ({checks.get('_missing', 'fp16_scale not run')})")
    elif "fp16" in fp16:
        lines.append(f"fp16: {fp16['status']} | grad norm fp16/fp32 = {fp16['grad_norm_ratio_fp16_fp32']} | loss "
                     f"scale {fp16['fp16']['loss_scale_before']:g} -> {fp16['loss_scale']:g} (configured "
                     f"{fp16['fp16']['configured_initial_loss_scale']:g}), overflows "
                     f"{fp16['fp16']['overflows_reported']}" + (f" | {fp16['problems']}" if fp16["problems"] else ""))
    else:
        lines.append(f"fp16: {fp16['status']} {fp16.get('error', '')}")
    result = te.get("te")
    if not result:
        lines.append(f"TE: no result ({te.get('_missing', 'te not run')})")
    elif result["status"] == "SKIP":
        lines.append(f"TE: {result['why']}")
    else:
        parts = [f"{k} {v['status']}" for k, v in result.items() if isinstance(v, dict) and "status" in v]
        cmp = result.get("te_vs_local", {})
        lines.append(f"TE {result.get('te_version', '?')}: {result['status']} | " + ", ".join(parts)
                     + (f" | states cosine {cmp['states_cosine']:.4f}, loss rel err {cmp['loss_rel_err']:.4f}"
                        if "states_cosine" in cmp else ""))
    statuses = {n: r.get("status") for src in (checks, te) for n, r in src.items()
                if isinstance(r, dict) and "status" in r}
    lines.append("checks: " + ", ".join(f"{n} {s}" for n, s in statuses.items()))
    return lines


CHECKS = {"gpu_vs_cpu": check_gpu_vs_cpu, "bf16": check_bf16, "sdpa_flash": check_sdpa_flash,
          "train_steps": check_train_steps, "fp16_scale": check_fp16_scale, "drivers": check_drivers,
          "te": check_te}
NEEDS_REFERENCE = {"gpu_vs_cpu", "bf16", "sdpa_flash", "train_steps", "fp16_scale"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--checks", default=",".join(CHECKS),
                    help=f"comma-separated subset of {','.join(CHECKS)} (default: all, in this order)")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--figures", default=None, metavar="DIR",
                    help="print the figures of a gpu_check.sh run from DIR's JSON files, and exit")
    ap.add_argument("--reference", default=None, help=argparse.SUPPRESS)  # internal: the CPU subprocess
    args = ap.parse_args(argv)
    if args.figures:
        print("\n".join(figures(args.figures)))
        return 0
    if args.reference:
        reference(args.reference)
        return 0
    names = [n for n in args.checks.split(",") if n]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        ap.error(f"--checks: unknown {', '.join(unknown)}; choose from {', '.join(CHECKS)}")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        # fp32 parity means fp32: no TF32 in matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    results: dict[str, dict] = {}
    ref = None
    if NEEDS_REFERENCE & set(names):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "reference.pt")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key, None)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--reference", path], env=env, capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit("the CPU reference run failed")
            ref = torch.load(path, weights_only=True)
            print(f"CPU reference: loss {float(ref['loss']):.6f} ({time.perf_counter() - t0:.1f} s)", flush=True)

    from megatron_speech.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(1, SEED)
    for name in names:
        t0 = time.perf_counter()
        try:
            results[name] = CHECKS[name](device, ref)
        except Exception as e:  # report every check, whatever one of them raises
            results[name] = {"status": "FAIL", "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        if device == "cpu" and name == "gpu_vs_cpu":
            results[name]["note"] = "dry run: CPU against CPU (plumbing only)"
        print(f"{name:12s} {results[name]['status']}  {json.dumps(results[name], default=str)[:600]}", flush=True)
        if results[name]["status"] == "SKIP" and "why" in results[name]:
            print(f"{'':12s} {results[name]['why']}", flush=True)
        if name == "fp16_scale" and results[name].get("fp16"):
            r = results[name]
            print(f"{'':12s} fp16/fp32 grad norm ratio {r['grad_norm_ratio_fp16_fp32']}, loss scale "
                  f"{r['fp16']['loss_scale_before']:g} -> {r['loss_scale']:g} (configured "
                  f"{r['fp16']['configured_initial_loss_scale']:g}), overflows {r['fp16']['overflows_reported']}",
                  flush=True)
    if set(names) != {"te"}:
        results["tp2"] = check_tp2(device)
        print(f"{'tp2':12s} {results['tp2']['status']}  {results['tp2']['why']}", flush=True)
    destroy_parallel()

    results["environment"] = {
        "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "megatron_core": __import__("megatron.core", fromlist=["__version__"]).__version__,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    failed = [n for n, r in results.items() if r.get("status") == "FAIL"]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed (SKIPs listed above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
