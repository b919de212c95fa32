"""LayerDrop (models/wav2vec2/layerdrop.py): the draws as a function of the counter key, the micro-batches that carry
them, a skipped layer against transformers' model with that layer removed, evaluation, recompute, layerdrop=0 against
megatron's own TransformerLayer, the config rules and the transformers config both ways."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from megatron_speech.common import rng as rng_module
from megatron_speech.models.wav2vec2 import interop
from megatron_speech.models.wav2vec2.factory import build_model
from megatron_speech.models.wav2vec2.layerdrop import layer_skips
from megatron_speech.parallel.initialize import single_rank_groups
from tests.fixtures import synthetic_batch, tiny_config

transformers = pytest.importorskip("transformers")


# ---- the draws ------------------------------------------------------------------------------------------------

def test_draws_are_a_function_of_the_key_at_the_configured_rate():
    assert layer_skips(1, 7, 0, 24, 0.3) == layer_skips(1, 7, 0, 24, 0.3)  # a resume draws what the run drew
    by_step = {layer_skips(1, s, 0, 24, 0.3) for s in range(40)}
    by_micro_step = {layer_skips(1, 7, m, 24, 0.3) for m in range(40)}
    by_seed = {layer_skips(s, 7, 0, 24, 0.3) for s in range(40)}
    assert min(len(by_step), len(by_micro_step), len(by_seed)) > 30  # each word of the key matters
    assert all(layer_skips(1, s, 0, 24, 0.0) == () for s in range(50))
    draws, num_layers, p = 4000, 24, 0.3
    counts = np.zeros(num_layers)
    for s in range(draws):
        counts[list(layer_skips(5, s, s % 3, num_layers, p))] += 1
    rate = counts.sum() / (draws * num_layers)
    assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / (draws * num_layers))  # 4 sigma over 96 000 draws
    per_layer = counts / draws  # no layer favoured: each within 5 sigma of p
    assert np.abs(per_layer - p).max() < 5 * np.sqrt(p * (1 - p) / draws)


def test_the_stream_is_its_own():
    streams = {v for k, v in vars(rng_module).items() if k.endswith("_STREAM") and k != "LAYERDROP_STREAM"}
    assert rng_module.LAYERDROP_STREAM not in streams
    # UTTERANCE_STREAM + b for every utterance b of a micro-batch
    assert rng_module.LAYERDROP_STREAM - rng_module.UTTERANCE_STREAM > 100_000


def test_micro_batches_carry_the_same_skips_on_every_dp_rank_and_none_in_evaluation(shards):
    from megatron_speech.data.loader import build_eval_loader, build_pretrain_loader

    def first_step(layerdrop: float, dp_rank: int) -> list[dict]:
        cfg = tiny_config(f"data.prefix={shards}", "model.num_layers=12", f"model.layerdrop={layerdrop}")
        loader = build_pretrain_loader(cfg.data, cfg.model, dp_rank, 2, 3, 1, cfg.train.seed)
        try:
            return next(iter(loader))
        finally:
            loader.close()

    rank0, rank1, off = first_step(0.5, 0), first_step(0.5, 1), first_step(0.0, 0)
    skips = [b["skip_layers"] for b in rank0]
    assert skips == [b["skip_layers"] for b in rank1]  # dp_rank 0 in the key: balanced work over DP
    assert len(set(skips)) == 3 and all(0 < len(s) < 12 for s in skips)  # one draw per micro-batch
    assert all(b["skip_layers"] == () for b in off)
    for on_batch, off_batch in zip(rank0, off, strict=True):  # the draw disturbs no other stream
        for key in ("waveform", "mask", "negatives"):
            assert torch.equal(on_batch[key], off_batch[key]), key
    cfg = tiny_config(f"data.prefix={shards}", "model.layerdrop=0.5")
    evaluation = build_eval_loader(cfg.data, cfg.model, 0, 1, 1, cfg.train.seed)
    assert all(b["skip_layers"] == () for b in itertools.islice(evaluation, evaluation.num_batches))


# ---- the model ------------------------------------------------------------------------------------------------

def _hf_three_layers():
    """transformers' model with three random layers (dropouts 0) and our config of it."""
    from tests.hf_reference import hf_tiny_config

    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForPreTraining(hf_tiny_config(num_hidden_layers=3)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf, interop.config_from_hf(hf.config)


def test_a_skipped_layer_is_transformers_without_it():
    from tests.hf_reference import batch

    hf, cfg = _hf_three_layers()
    ours = build_model(cfg, pg_collection=single_rank_groups()).train()  # training: LayerDrop acts; dropouts are 0
    interop.load_canonical(ours, interop.from_hf(hf.state_dict(), cfg.num_attention_heads))
    wave, _, _ = batch(cfg)
    hidden = ours.encode(wave, skip_layers=(1,))
    states = ours.encode(wave, skip_layers=(1,), all_layers=True)
    layers = hf.wav2vec2.encoder.layers
    hf.wav2vec2.encoder.layers = torch.nn.ModuleList([layers[0], layers[2]])  # the layer removed, in eval
    with torch.no_grad():
        ref = hf.wav2vec2(wave, output_hidden_states=True)
    torch.testing.assert_close(hidden, ref.last_hidden_state, atol=1e-4, rtol=1e-4)
    # transformers' hidden_states under layerdrop: a skipped layer's state is its input
    assert torch.equal(states[2], states[1])
    for ours_state, ref_state in zip([states[0], states[1], states[3]], ref.hidden_states, strict=True):
        torch.testing.assert_close(ours_state, ref_state, atol=1e-4, rtol=1e-4)

    # every parameter of the skipped layer gets a gradient, of zeros (megatron's DDP waits for each)
    hidden.square().sum().backward()
    for i, layer in enumerate(ours.encoder.block.layers):
        for name, p in layer.named_parameters():
            assert p.grad is not None, (i, name)
            assert (p.grad.abs().max() == 0) == (i == 1), (i, name)


def _loss_and_grads(model, batch, skip_layers=()):
    model.zero_grad(set_to_none=True)
    out = model(batch["waveform"], batch["mask"], batch["negatives"], skip_layers=skip_layers)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _tiny_model(*overrides: str, **build):
    cfg = tiny_config(*overrides, dropout=0.0).model
    torch.manual_seed(0)
    model = build_model(cfg, pg_collection=single_rank_groups(), **build).train()
    model.quantizer.gumbel_noise = False
    return cfg, model


def test_evaluation_never_skips():
    cfg, model = _tiny_model()
    wave = synthetic_batch(cfg, 0)["waveform"]
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.encode(wave, skip_layers=(0, 1)), model.encode(wave))
        model.train()
        assert not torch.equal(model.encode(wave, skip_layers=(0, 1)), model.encode(wave))
    with pytest.raises(ValueError, match="layers 0..1"):
        model.encode(wave, skip_layers=(2,))


def test_without_skips_the_layer_is_megatrons_bit_for_bit():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    cfg, model = _tiny_model()
    batch = synthetic_batch(cfg, 1)
    loss, grads = _loss_and_grads(model, batch)
    for layer in model.encoder.block.layers:  # today's layer: megatron-core's own class
        layer.__class__ = TransformerLayer
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


@pytest.mark.parametrize("recompute, chunk", [("full", 1), ("full", 2), ("selective", 1)])
def test_skips_compose_with_recompute(recompute, chunk):
    """megatron's full recompute runs a chunk of layers again in backward: it must skip what the forward skipped."""
    cfg, plain = _tiny_model()
    _, recomputed = _tiny_model(recompute=recompute, recompute_num_layers=chunk)
    recomputed.load_state_dict(plain.state_dict())
    batch = synthetic_batch(cfg, 2)
    loss, grads = _loss_and_grads(plain, batch, skip_layers=(0,))
    ref_loss, ref_grads = _loss_and_grads(recomputed, batch, skip_layers=(0,))
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    assert all(float(g.abs().max()) == 0 for n, g in grads.items() if ".layers.0." in n)


# ---- config ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_layerdrop_outside_0_1_is_refused(value):
    with pytest.raises(ValueError, match=r"model\.layerdrop"):
        tiny_config(f"model.layerdrop={value}")


def test_fine_tuning_may_set_layerdrop_but_not_the_depth():
    from megatron_speech.training.finetune_config import load_finetune_config

    cfg = load_finetune_config("configs/finetune/phoneme.yaml", ["pretrained=none", "model.layerdrop=0.1"])
    assert cfg.model.layerdrop == 0.1
    with pytest.raises(ValueError, match="model.num_layers"):
        load_finetune_config("configs/finetune/phoneme.yaml", ["pretrained=none", "model.num_layers=3"])


def test_transformers_config_carries_layerdrop_both_ways(tmp_path):
    cfg = tiny_config("model.layerdrop=0.25").model
    interop.config_to_hf(cfg).save_pretrained(tmp_path)
    loaded = transformers.Wav2Vec2Config.from_pretrained(tmp_path)
    assert loaded.layerdrop == 0.25
    assert interop.config_from_hf(loaded).layerdrop == 0.25
