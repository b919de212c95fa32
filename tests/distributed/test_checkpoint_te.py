"""Local-spec <-> Transformer Engine checkpoints, on CPU (TE does not install here).

TE's modules (TELayerNormColumnParallelLinear, TERowParallelLinear, TEDotProductAttention, TENorm) add an
`_extra_state` object (FP8 scaling metadata, a uint8 tensor) to megatron's sharded state dict, and megatron turns
it into a ShardedObject. A checkpoint of the local spec (a CPU run, tools/convert_from_hf.py) lacks those of the
attention core and the final norm, and torch DCP's strict load used to stop with "Missing key". The TE-like
model here is the tiny model whose attention cores, final LayerNorm and linear layers carry TE's extra state, so
its sharded_state_dict has ShardedObjects under TE's names. Both directions load through the real entry points:
load_model_weights (train.init_checkpoint, finetune's pretrained=, convert_to_hf), load_checkpoint (resume) and
embed; a key other than `_extra_state` that the checkpoint lacks is still an error naming it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.dist import run_ranks
from tests.fixtures import global_batch, tiny_config

TE_MODULES = ("core_attention", "final_layernorm", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
TE_STATE = b"te-fp8-meta v1"


class _TEExtraState:
    """What TransformerEngineBaseModule / TE's norms do with extra state: a uint8 tensor out; on load, whatever
    the checkpoint had (None from a local-spec linear layer, which TE ignores)."""

    def get_extra_state(self):
        return torch.frombuffer(bytearray(TE_STATE), dtype=torch.uint8).clone()

    def set_extra_state(self, state):
        self.te_state_loaded = state


def te_like(model: torch.nn.Module) -> torch.nn.Module:
    for name, module in model.named_modules():
        if name.endswith(TE_MODULES):
            module.__class__ = type(f"TE{type(module).__name__}", (_TEExtraState, type(module)), {})
    return model


def _weights(model) -> dict:
    from megatron_speech.models.wav2vec2 import interop

    return {k: v.clone() for k, v in interop.canonical_state_dict(model).items()}


def _build(seed: int, te: bool, cfg=None):
    from megatron_speech.models.wav2vec2.factory import build_model

    cfg = cfg or tiny_config("optim.warmup_steps=1", dropout=0.0)
    torch.manual_seed(seed)
    model = build_model(cfg.model, tp=1, sequence_parallel=False)
    return cfg, te_like(model) if te else model


def _extra_state_keys(model) -> set[str]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {v.key for v in model.sharded_state_dict().values()
            if isinstance(v, ShardedObject) and v.key.endswith("_extra_state")}


def _both_directions(rank, world, root):
    from megatron_speech.checkpoint.checkpointing import checkpoint_dir, load_checkpoint, save_checkpoint
    from megatron_speech.checkpoint.model_io import load_model_weights, save_model_only
    from megatron_speech.parallel.initialize import initialize_parallel
    from megatron_speech.training.ema import EMA
    from megatron_speech.training.optim import build_optimizer, build_scheduler
    from megatron_speech.training.parallelize import wrap_for_training
    from megatron_speech.training.step import train_step

    initialize_parallel(1, seed=3)
    out = {}
    cfg, local = _build(1, te=False)
    _, te = _build(2, te=True)
    te_only = sorted(_extra_state_keys(te) - _extra_state_keys(local))
    out["te_only_keys"] = te_only

    # local -> TE: a converted / CPU checkpoint (weights and config only, as convert_from_hf writes it)
    save_model_only(f"{root}/local", local, cfg)
    load_model_weights(f"{root}/local", te)
    out["local_to_te_equal"] = all(torch.equal(a, b) for a, b in zip(_weights(local).values(), _weights(te).values()))
    cores = [m for n, m in te.named_modules() if n.endswith("core_attention")]
    # the checkpoint has no value for it: the module keeps its own (its fresh state is loaded back into it)
    out["fresh_state_kept"] = all(not hasattr(m, "te_state_loaded") or bytes(m.te_state_loaded.numpy()) == TE_STATE
                                  for m in cores)

    # TE -> local: the extra objects are ignored
    _, te2 = _build(3, te=True)
    save_model_only(f"{root}/te", te2, cfg)
    _, local2 = _build(4, te=False)
    load_model_weights(f"{root}/te", local2)
    out["te_to_local_equal"] = all(torch.equal(a, b) for a, b in zip(_weights(te2).values(), _weights(local2).values()))
    # and TE -> TE restores TE's state
    _, te3 = _build(5, te=True)
    load_model_weights(f"{root}/te", te3)
    out["te_to_te_state"] = all(bytes(m.te_state_loaded.numpy()) == TE_STATE
                                for n, m in te3.named_modules() if n.endswith("core_attention"))

    # resume a CPU run (distributed optimizer, EMA) on the TE model: the next step equals the local one's
    def trainer(model):
        ddp = wrap_for_training(model, use_distributed_optimizer=True, overlap_grad_reduce=True)
        opt = build_optimizer(ddp, cfg.optim, cfg.train, cfg.parallel)
        return ddp, opt, build_scheduler(opt, cfg.optim), EMA(model, 0.9)

    _, run = _build(6, te=False)
    ddp, opt, sched, ema = trainer(run)
    train_step(ddp, opt, global_batch(cfg.model, 1))
    sched.step(1)
    ema.update()
    save_checkpoint(f"{root}/run", 1, ddp, opt, sched, ema, {"consumed": 1})
    local_loss = train_step(ddp, opt, global_batch(cfg.model, 2))["loss"]
    _, resumed = _build(7, te=True)
    ddp, opt, sched, ema = trainer(resumed)
    load_checkpoint(checkpoint_dir(f"{root}/run", 1), ddp, opt, sched, ema)
    out["resume_loss"] = (local_loss, train_step(ddp, opt, global_batch(cfg.model, 2))["loss"])

    # any other key the checkpoint lacks: an error naming it, raised before a byte is loaded
    _, strict = _build(8, te=True)
    strict.encoder.block.final_layernorm.register_parameter("gamma2", torch.nn.Parameter(torch.ones(3)))
    before = _weights(strict)
    try:
        load_model_weights(f"{root}/local", strict)
        out["other_missing"] = None
    except ValueError as e:
        out["other_missing"] = str(e)
    out["untouched"] = all(torch.equal(a, b) for a, b in zip(before.values(), _weights(strict).values()))

    # embed (the entry point as it is) on the TE-like model, from the converted checkpoint
    import soundfile

    from megatron_speech import embed
    from megatron_speech.models.wav2vec2 import factory

    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    soundfile.write(f"{root}/clip.wav", audio, 16000, subtype="PCM_16")
    local_hidden = embed.embed(f"{root}/local", f"{root}/clip.wav")
    build = factory.build_model
    factory.build_model = lambda *a, **k: te_like(build(*a, **k))
    out["embed"] = (local_hidden, embed.embed(f"{root}/local", f"{root}/clip.wav"))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("te")
    return root, run_ranks(_both_directions, 1, str(root))[0]


def test_te_like_model_has_te_only_extra_state(results):
    _, out = results
    # what a local checkpoint lacks: the attention core's and the final norm's (TE's names, layers stacked)
    assert out["te_only_keys"] == ["encoder.block.final_layernorm._extra_state",
                                   "encoder.block.layers.self_attention.core_attention._extra_state"]


def test_local_checkpoint_loads_into_te_model(results):
    _, out = results
    assert out["local_to_te_equal"]
    assert out["fresh_state_kept"]  # no checkpoint value for it: the module keeps its own state


def test_te_checkpoint_loads_into_local_model(results):
    _, out = results
    assert out["te_to_local_equal"] and out["te_to_te_state"]


def test_cpu_run_resumes_on_te_model(results):
    _, out = results
    local_loss, te_loss = out["resume_loss"]
    assert abs(local_loss - te_loss) <= 1e-6 * abs(local_loss)


def test_another_missing_key_is_an_error_naming_it(results):
    _, out = results
    assert out["other_missing"] and "encoder.block.final_layernorm.gamma2" in out["other_missing"]
    assert "_extra_state" not in out["other_missing"]
    assert out["untouched"]  # refused before anything was read into the model


def test_embed_on_te_model_from_local_checkpoint(results):
    _, out = results
    local, on_te = out["embed"]
    assert local.shape[0] > 0
    np.testing.assert_array_equal(local, on_te)
