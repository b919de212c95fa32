"""A fine-tuning step at TP=2 (sequence parallelism off and on) equals TP=1: the loss and every gradient, encoder
(conv feature encoder included, so the time-sliced partial gradients are summed) and head, with a padded batch,
time and channel masks; CTC over the last hidden state and a pooled classifier over the weighted layer sum; each
also with a layer skipped by LayerDrop (the block path and the per-layer path of the weighted sum)."""

from __future__ import annotations

import numpy as np
import torch

from tests.dist import run_ranks

# (head kind, layer weighting, layers LayerDrop skips)
CASES = (("ctc", False, ()), ("classification", True, ()), ("ctc", False, (1,)), ("classification", True, (0,)))


def _batch(cfg, kind: str) -> dict:
    """Three utterances of different lengths, padded to frames a multiple of 2 (so TP=1 and TP=2 see the same)."""
    from megatron_speech.data.augment import normalize
    from megatron_speech.data.finetune_data import frame_padding_mask, padded_num_frames
    from megatron_speech.models.wav2vec2.masker import compute_span_mask

    rng = np.random.default_rng(7)
    lengths = [12_000, 9_000, 6_500]
    frames = padded_num_frames(max(lengths), cfg.model.geometry, 2)
    wave = np.zeros((len(lengths), cfg.model.num_samples(frames)), dtype=np.float32)
    for b, n in enumerate(lengths):
        wave[b, :n] = normalize(rng.standard_normal(n).astype(np.float32), 1e-5)
    padding = torch.from_numpy(frame_padding_mask(lengths, frames, cfg.model.geometry))
    real = (~padding).sum(1).numpy()
    mask = compute_span_mask((3, frames), 0.3, 3, rng, min_masks=1, lengths=real, require_same_masks=False)
    channels = compute_span_mask((3, cfg.model.hidden_size), 0.2, 8, rng)
    batch = {"waveform": torch.from_numpy(wave), "padding_mask": padding, "mask": torch.from_numpy(mask),
             "channel_mask": torch.from_numpy(channels), "num_samples": sum(lengths), "references": []}
    if kind == "ctc":
        targets = [rng.integers(1, 7, size=k) for k in (5, 4, 3)]
        batch["targets"] = torch.from_numpy(np.concatenate(targets))
        batch["target_lengths"] = torch.tensor([len(t) for t in targets])
        batch["target_min_frames"] = batch["target_lengths"].clone()
    else:
        batch["targets"] = torch.tensor([0, 2, 1])
    return batch


def _rank(rank: int, world: int, weights: str):
    from megatron_speech.models.wav2vec2 import interop
    from megatron_speech.models.wav2vec2.factory import HeadSpec, build_model
    from megatron_speech.parallel.initialize import initialize_parallel
    from megatron_speech.tasks.task import Task
    from megatron_speech.training.finetune_step import global_sums, run_micro_batches
    from megatron_speech.training.parallelize import wrap_for_training
    from tests.fixtures import tiny_config

    initialize_parallel(world, seed=5)
    cfg = tiny_config(dropout=0.0)
    results = {}
    for case, (kind, layer_weighting, skips) in enumerate(CASES):
        task = Task("phoneme", "phonemes", tuple(f"p{i}" for i in range(6))) if kind == "ctc" else \
            Task("emotion", "arousal_proxy", ("high", "low", "neutral"))
        for sp in ((False,) if world == 1 else (False, True)):
            model = build_model(cfg.model, tp=world, sequence_parallel=sp,
                                head=HeadSpec(kind, task.num_outputs, layer_weighting))
            wav2vec2 = model.wav2vec2
            path = f"{weights}.{case}"
            if world == 1:
                with torch.no_grad():
                    for p in model.head_params():
                        p.normal_(0, 0.3)
                torch.save({"encoder": interop.canonical_state_dict(wav2vec2),
                            "head": [p.detach().clone() for p in model.head_params()]}, path)
            saved = torch.load(path)
            interop.load_canonical(wav2vec2, saved["encoder"])
            with torch.no_grad():
                for p, value in zip(model.head_params(), saved["head"], strict=True):
                    p.copy_(value)
            model.set_trainable(encoder=True, feature_encoder=True, mask_emb=True)
            ddp = wrap_for_training(model, use_distributed_optimizer=False)
            ddp.zero_grad_buffer()
            batch = {**_batch(cfg, kind), "skip_layers": skips}
            sums = global_sums(task, run_micro_batches(ddp, task, [batch]), with_scores=False)
            grads = interop.canonical_state_dict(wav2vec2, grads=True)
            grads.update({f"head.{i}": p.main_grad.clone() for i, p in enumerate(model.head_params())})
            results[(case, sp)] = (sums["loss_sum"], sums["num_utterances"], grads)
    return results


def test_tp2_finetuning_step_equals_tp1(tmp_path):
    weights = str(tmp_path / "weights")
    (single,) = run_ranks(_rank, 1, weights)
    pair = run_ranks(_rank, 2, weights)
    for case, (kind, _, skips) in enumerate(CASES):
        loss1, count1, grads1 = single[(case, False)]
        assert count1 == 3
        for sp in (False, True):
            for rank in (0, 1):
                loss2, count2, grads2 = pair[rank][(case, sp)]
                assert count2 == count1
                np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
                assert grads2.keys() == grads1.keys() and len(grads1) > 20
                for name in grads1:  # fp32 summation order differs: errors relative to the tensor's scale
                    scale = float(grads1[name].abs().max())
                    torch.testing.assert_close(grads2[name], grads1[name], atol=2e-5 * scale, rtol=0,
                                               msg=lambda m, n=name, k=kind, s=sp: f"{k} sp={s} {n}: {m}")
        skipped = [n for n in grads1 if n.startswith(tuple(f"encoder.block.layers.{i}." for i in skips))]
        assert len(skipped) == 12 * len(skips)  # every tensor of a skipped layer: zero, on TP=1 and (above) TP=2
        assert all(float(grads1[n].abs().max()) == 0 for n in skipped)
