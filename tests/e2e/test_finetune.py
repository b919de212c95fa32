"""Fine-tuning pieces: tasks and metrics, config, padded batches, heads (padding invariance), freezing (frozen
weights unchanged and out of the optimizer, gradients right after the rebuild), and export parity with transformers.

The synthetic corpus (`synthetic_corpus`, tests/fixtures.py) is shared with test_finetune_tasks.py and
test_fp16.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.fixtures import ROOT, padded_pair, synthetic_corpus

# ------------------------------------------------------------------------------------------ tasks and metrics


def test_edit_distance_and_greedy_ctc():
    from megatron_speech.tasks.metrics import ctc_greedy, edit_distance

    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], [1, 2]) == 2 and edit_distance([1, 2], []) == 2
    assert edit_distance(["a", "b"], ["a", "b"]) == 0
    # repeats merge, blanks separate real repeats, frames past the length are ignored
    assert ctc_greedy(np.array([0, 1, 1, 0, 1, 2, 2, 0, 3, 3]), 8) == [1, 1, 2]
    assert ctc_greedy(np.array([0, 0]), 2) == []


def test_task_labels_targets_and_text_normalization():
    from megatron_speech.config import FinetuneConfig
    from megatron_speech.tasks.task import Task, collect_labels, normalize_text

    assert normalize_text("The  old man's BOOK, near-by!") == "the old man's book near by"
    assert collect_labels("phoneme", ["p1 p0  p2", ["p3"]]) == ["p0", "p1", "p2", "p3"]
    assert collect_labels("asr", ["ab a"]) == ["a", "b", "|"]
    task = Task.from_config(FinetuneConfig(task="phoneme", labels=["p0", "p1", "p2"]))
    assert task.kind == "ctc" and task.num_outputs == 4 and task.label_key == "phonemes"
    assert task.target("p1 p1  p2", "u").tolist() == [2, 2, 3]
    with pytest.raises(ValueError, match="utterance 'u'.*p9"):
        task.target("p1 p9", "u")
    assert task.target("p1 p9", "u", strict=False).tolist() == [2]  # eval: dropped from the loss only
    emotion = Task.from_config(FinetuneConfig(task="emotion", label_key="arousal_proxy", labels=["high", "low"]))
    assert emotion.describe == "emotion (arousal_proxy)" and emotion.num_outputs == 2
    assert emotion.target("low", "u").tolist() == [1] and emotion.target("calm", "u", strict=False).tolist() == [-1]


def test_metrics_per_wer_cer_and_unweighted_accuracy():
    from megatron_speech.tasks import metrics as m
    from megatron_speech.tasks.task import Task

    def run(task, predictions, references):
        stats = dict.fromkeys(m.COMMON, 0.0)
        stats["num_utterances"] = len(references)
        stats.update(m.score(task, predictions, references))
        return m.metrics(task, stats)

    phoneme = Task("phoneme", "phonemes", ("a", "b", "c"))
    assert run(phoneme, [["a", "b"], []], ["a b c", "a"])["per"] == pytest.approx(2 / 4)  # 1 deletion + 1
    asr = Task("asr", "text", ("a", "b", "|"))
    out = run(asr, [list("ab|a"), list("b")], ["Ab, a", "ba"])
    assert out["wer"] == pytest.approx(1 / 3) and out["cer"] == pytest.approx(1 / 6)
    emotion = Task("emotion", "arousal_proxy", ("high", "low"))
    # 3 "low" (all right), 1 "high" (wrong): accuracy 3/4, unweighted (1 + 0) / 2
    out = run(emotion, ["low", "low", "low", "low"], ["low", "low", "low", "high"])
    assert out["accuracy"] == pytest.approx(0.75) and out["unweighted_accuracy"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ config


def test_finetune_config_bare_keys_checkpoint_architecture_and_rules(tmp_path):
    from megatron_speech.finetune import expand_bare_keys, load_finetune_config

    assert expand_bare_keys(["pretrained=/x", "train.max_steps=3", "freeze_encoder_steps=5"]) == [
        "finetune.pretrained=/x", "train.max_steps=3", "finetune.freeze_encoder_steps=5"]
    cfg = load_finetune_config(str(ROOT / "configs/finetune/emotion.yaml"), ["pretrained=none"])
    assert (cfg.finetune.task, cfg.finetune.task_label_key) == ("emotion", "arousal_proxy")  # named as what it is
    assert cfg.model.hidden_size == 64  # the untrained encoder comes from configs/tiny.yaml
    with pytest.raises(ValueError, match="model.hidden_size=128 differs"):
        load_finetune_config(str(ROOT / "configs/finetune/phoneme.yaml"), ["pretrained=none", "model.hidden_size=128",
                                                                           "model.ffn_hidden_size=256"])
    with pytest.raises(ValueError, match="finetune.task is 'none'"):
        load_finetune_config(None, ["pretrained=none"])
    with pytest.raises(ValueError, match="data.speed_perturb"):
        load_finetune_config(str(ROOT / "configs/finetune/phoneme.yaml"), ["pretrained=none",
                                                                           "data.speed_perturb=[0.9, 1.1]"])
    with pytest.raises(ValueError, match="unknown key 'finetune.freeze_steps'"):
        load_finetune_config(str(ROOT / "configs/finetune/phoneme.yaml"), ["pretrained=none",
                                                                           "finetune.freeze_steps=3"])
    for name in ("phoneme", "asr", "speaker", "emotion"):
        load_finetune_config(str(ROOT / f"configs/finetune/{name}.yaml"), ["pretrained=none"]).validate(2)


# ------------------------------------------------------------------------------------------ batches


def test_padded_batches_budget_frames_and_targets(tmp_path):
    from megatron_speech.config import FinetuneConfig
    from megatron_speech.data.finetune_data import PaddedBatchSampler, eval_batches, labeled_split
    from megatron_speech.finetune import load_finetune_config
    from megatron_speech.tasks.task import Task, collect_labels

    prefix = synthetic_corpus(tmp_path, num_train=20, num_valid=6)
    cfg = load_finetune_config(str(ROOT / "configs/finetune/phoneme.yaml"),
                               ["pretrained=none", f"data.prefix={prefix}", "data.max_tokens=64000",
                                "data.max_sample_seconds=4"])
    split = labeled_split([prefix], "train", "phonemes", 8000, 64000)
    sampler = PaddedBatchSampler(split.lengths, 64000, seed=1, geometry=cfg.model.geometry)
    batches = sampler.epoch_batches(0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(split.indices)))  # each once
    assert all(len(b) * split.lengths[b].max() <= 64000 for b in batches)
    task = Task.from_config(FinetuneConfig(task="phoneme", labels=collect_labels("phoneme", split.labels)))
    for tp in (1, 2):
        for batch in eval_batches(split, task, cfg, tp_size=tp):
            frames = batch["padding_mask"].shape[1]
            assert frames % tp == 0 and batch["waveform"].shape[1] >= cfg.model.num_samples(frames)
            real = (~batch["padding_mask"]).sum(1)
            length_of = {split.source.id(int(i)): int(split.source.lengths[i]) for i in split.indices}
            lengths = [length_of[uid] for uid in batch["ids"]]
            assert real.tolist() == [cfg.model.num_frames(n) for n in lengths]  # transformers' rule
            assert batch["target_lengths"].sum() == len(batch["targets"])
            assert (batch["target_min_frames"] >= batch["target_lengths"]).all()


def test_finetune_workers_survive_slurm_signals(tmp_path):
    """As pre-training's loader (tests/unit/test_data_loader.py): Slurm's USR1/TERM reach every process of the step, and
    a dead worker would make torch raise in the training process before it saved."""
    from megatron_speech.data.finetune_data import build_finetune_loader, labeled_split
    from megatron_speech.finetune import load_finetune_config
    from megatron_speech.tasks.task import Task, collect_labels
    from tests.runs import slurm_signals_to_children

    prefix = synthetic_corpus(tmp_path, num_train=20, num_valid=4)
    cfg = load_finetune_config(str(ROOT / "configs/finetune/phoneme.yaml"),
                               ["pretrained=none", f"data.prefix={prefix}", "data.max_tokens=64000",
                                "data.max_sample_seconds=4", "train.num_micro_batches=2"])
    split = labeled_split([prefix], "train", "phonemes", 8000, 64000)
    cfg.finetune.labels = collect_labels("phoneme", split.labels)
    task = Task.from_config(cfg.finetune)
    expected = [next(build_finetune_loader(split, task, cfg, 0, 1, 1)) for _ in range(1)]
    cfg.data.num_workers = 2
    loader = build_finetune_loader(split, task, cfg, 0, 1, 1)
    with slurm_signals_to_children() as signalled:
        got = [next(loader) for _ in range(1)]
        workers = list(loader._it._workers)
        assert {w.pid for w in workers} <= signalled and all(w.is_alive() for w in workers)
    for want, have in zip(expected[0], got[0], strict=True):
        assert want.keys() == have.keys()
        for key, value in want.items():
            assert torch.equal(value, have[key]) if torch.is_tensor(value) else value == have[key], key


# ------------------------------------------------------------------------------------------ model pieces


def _tiny_finetune_model(kind: str, num_outputs: int, layer_weighting: bool, dropout: float = 0.0):
    from megatron_speech.models.wav2vec2.factory import HeadSpec, build_model
    from megatron_speech.parallel.initialize import single_rank_groups
    from tests.fixtures import tiny_config

    cfg = tiny_config(dropout=dropout)
    pg = single_rank_groups()
    torch.manual_seed(0)
    model = build_model(cfg.model, head=HeadSpec(kind, num_outputs, layer_weighting), pg_collection=pg)
    with torch.no_grad():  # a head that is not ~0, and non-uniform layer weights
        for p in model.head_params():
            p.normal_(0, 0.5)
    return cfg, model


@pytest.mark.parametrize("kind,layer_weighting", [("ctc", False), ("classification", True)])
def test_padding_does_not_change_an_utterances_output(kind, layer_weighting):
    cfg, model = _tiny_finetune_model(kind, 7, layer_weighting)
    model.eval()
    wave, padding, alone = padded_pair(cfg)
    with torch.no_grad():
        batched = model(wave, padding_mask=padding)[1]
        single = model(alone, padding_mask=torch.zeros(1, cfg.model.num_frames(alone.shape[1]), dtype=torch.bool))[0]
        unmasked = model(alone)[0]
    if kind == "ctc":
        real = int((~padding[1]).sum())
        assert real == single.shape[0]
        torch.testing.assert_close(batched[:real], single, atol=2e-5, rtol=0)
    else:
        torch.testing.assert_close(batched, single, atol=2e-5, rtol=0)
    torch.testing.assert_close(single, unmasked, atol=2e-5, rtol=0)


def _optimized_param_ids(optimizer) -> set[int]:
    ids = set()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        groups = getattr(opt, "model_fp32_groups", None)
        if groups is None:  # non-distributed fp32: torch's param groups hold the model parameters
            groups = [g["params"] for g in opt.optimizer.param_groups]
        ids |= {id(p) for g in groups for p in g}
    return ids


def _rank_freeze(rank, world, prefix, distributed):
    """Three frozen steps, the rebuild, two more; snapshots and gradient checks along the way."""
    from megatron_speech.compat.megatron_core import disarm_ddp
    from megatron_speech.data.finetune_data import build_finetune_loader, labeled_split
    from megatron_speech.finetune import load_finetune_config
    from megatron_speech.parallel.initialize import initialize_parallel
    from megatron_speech.tasks.task import Task, collect_labels
    from megatron_speech.training.finetune_step import run_micro_batches, task_loss, train_step
    from megatron_speech.training.finetune_unit import build_model, build_trainer

    cfg = load_finetune_config(str(ROOT / "configs/finetune/phoneme.yaml"), [
        "pretrained=none", f"data.prefix={prefix}", "data.max_tokens=64000", "data.max_sample_seconds=4",
        "model.dropout=0", "model.attention_dropout=0", "model.feature_proj_dropout=0", "mask_prob=0.2",
        "freeze_encoder_steps=3", "optim.warmup_steps=1", "optim.weight_decay=0.1",
        f"parallel.use_distributed_optimizer={str(distributed).lower()}"])
    initialize_parallel(1, cfg.train.seed)
    split = labeled_split([prefix], "train", "phonemes", 8000, 64000)
    cfg.finetune.labels = collect_labels("phoneme", split.labels)
    task = Task.from_config(cfg.finetune)
    model = build_model(cfg, task, 1)
    loader = build_finetune_loader(split, task, cfg, 0, 1, 1)
    snap = lambda params: [p.detach().clone() for p in params]  # noqa: E731
    encoder, conv = model.encoder_params(), list(model.wav2vec2.feature_extractor.parameters())
    unused = [p for name in ("quantizer", "project_q", "project_hid")
              for p in getattr(model.wav2vec2, name).parameters()]
    start_encoder, start_head, start_unused = snap(encoder), snap(model.head_params()), snap(unused)
    start_conv = snap(conv)

    ddp, opt, sched = build_trainer(model, cfg, frozen=True)
    frozen_optimized = _optimized_param_ids(opt) == {id(p) for p in model.head_params()}
    for _ in range(3):
        train_step(ddp, opt, task, next(loader))
        sched.step(1)
    encoder_kept = all(torch.equal(a, b) for a, b in zip(start_encoder, encoder, strict=True))
    head_moved = not all(torch.equal(a, b) for a, b in zip(start_head, model.head_params(), strict=True))

    disarm_ddp(ddp)
    ddp, opt, sched = build_trainer(model, cfg, frozen=False, scheduler_steps=sched.num_steps)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    full_optimized = _optimized_param_ids(opt) == trainable
    conv_out = not any(id(p) in trainable for p in conv + unused)
    # gradients through the new wrapper (old hooks disarmed) = plain autograd of loss / utterances
    batch = next(loader)[0]
    ddp.zero_grad_buffer()
    # ends with finalize_model_grads (reduced); the loss was divided by the step's utterance count
    run_micro_batches(ddp, task, [batch], normalizer=batch["padding_mask"].shape[0])
    params = [p for p in model.parameters() if p.requires_grad]
    got = [p.main_grad.clone() for p in params]
    logits = model(batch["waveform"], padding_mask=batch["padding_mask"], mask=batch["mask"])
    loss, _ = task_loss(task, logits, batch)
    # autograd.grad runs no AccumulateGrad hooks: the reference bypasses DDP entirely
    expected = torch.autograd.grad(loss / batch["padding_mask"].shape[0], params)
    grads_ok = all(torch.allclose(g, e, atol=1e-6, rtol=1e-4) for g, e in zip(got, expected, strict=True))
    for _ in range(2):
        train_step(ddp, opt, task, next(loader))
        sched.step(1)
    encoder_moved = not all(torch.equal(a, b) for a, b in zip(start_encoder, encoder, strict=True))
    conv_kept = all(torch.equal(a, b) for a, b in zip(start_conv, conv, strict=True))
    unused_kept = all(torch.equal(a, b) for a, b in zip(start_unused, unused, strict=True))
    return dict(frozen_optimized=frozen_optimized, encoder_kept=encoder_kept, head_moved=head_moved,
                full_optimized=full_optimized, conv_out=conv_out, grads_ok=grads_ok, encoder_moved=encoder_moved,
                conv_kept=conv_kept, unused_kept=unused_kept, lr=sched.get_lr(opt.param_groups[0]))


@pytest.mark.parametrize("distributed", [True, False], ids=["distributed_optimizer", "plain_optimizer"])
def test_frozen_phase_keeps_the_encoder_and_the_rebuild_trains_it(tmp_path, distributed):
    from tests.dist import run_ranks

    prefix = synthetic_corpus(tmp_path, num_train=12, num_valid=2)
    (out,) = run_ranks(_rank_freeze, 1, prefix, distributed)
    assert out.pop("lr") > 0
    assert all(out.values()), out


# ------------------------------------------------------------------------------------------ export


def _save_finetuned(tmp_path, task_name, labels, layer_weighting):
    """A weights-only fine-tuned checkpoint of a tiny model with a non-trivial head; returns (path, model)."""
    from megatron_speech.checkpoint.checkpointing import save_checkpoint
    from megatron_speech.config import config_to_dict
    from megatron_speech.tasks.task import Task
    from tests.fixtures import tiny_config

    cfg = tiny_config(dropout=0.0)
    cfg.finetune.task, cfg.finetune.labels, cfg.finetune.layer_weighting = task_name, labels, layer_weighting
    task = Task.from_config(cfg.finetune)
    _, model = _tiny_finetune_model(task.kind, task.num_outputs, layer_weighting)
    path = tmp_path / f"ckpt_{task_name}_{layer_weighting}"
    save_checkpoint(path, 1, model, None, None, None, {"config": config_to_dict(cfg)})
    return path, model.eval(), task


def test_ctc_export_gives_our_logits_and_decoding(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megatron_speech.tasks.metrics import decode
    from tools.convert_to_hf import export

    path, model, task = _save_finetuned(tmp_path, "phoneme", ["p0", "p1", "p2", "p3", "p4", "p5"], False)
    out = export(str(path), str(tmp_path / "hf"), model_class="ctc")
    hf = transformers.Wav2Vec2ForCTC.from_pretrained(out).eval()
    wave, padding, _ = padded_pair(_tiny_finetune_model("ctc", 7, False)[0])
    attention = torch.ones_like(wave, dtype=torch.long)
    attention[1, 11_200:] = 0
    with torch.no_grad():
        ours = model(wave, padding_mask=padding)
        theirs = hf(wave, attention_mask=attention).logits
    real = (~padding).sum(1)
    assert theirs.shape == ours.shape
    for b in range(2):
        torch.testing.assert_close(theirs[b, :real[b]], ours[b, :real[b]], atol=1e-4, rtol=0)
    processor = transformers.Wav2Vec2Processor.from_pretrained(out)
    ids = theirs.argmax(-1)
    for b, hyp in enumerate(decode(task, ours, real.tolist())):
        assert processor.decode(ids[b, :real[b]]) == " ".join(hyp)
    assert json.loads((out / "vocab.json").read_text())["<pad>"] == 0  # the CTC blank


def test_classification_export_with_layer_weights_gives_our_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tools.convert_to_hf import export

    path, model, task = _save_finetuned(tmp_path, "emotion", ["high", "low", "neutral"], True)
    out = export(str(path), str(tmp_path / "hf"), model_class="classification")
    hf = transformers.Wav2Vec2ForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.use_weighted_layer_sum and hf.config.id2label[2] == "neutral"
    wave, padding, _ = padded_pair(_tiny_finetune_model("classification", 3, True)[0])
    attention = torch.ones_like(wave, dtype=torch.long)
    attention[1, 11_200:] = 0
    with torch.no_grad():
        torch.testing.assert_close(hf(wave, attention_mask=attention).logits, model(wave, padding_mask=padding),
                                   atol=1e-4, rtol=0)


def test_weighted_ctc_head_exports_as_encoder_plus_documented_head_file(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    from tools.convert_to_hf import HEAD_FILE, export_with_notes

    path, model, _ = _save_finetuned(tmp_path, "asr", ["a", "b", "|"], True)
    out, notes = export_with_notes(str(path), str(tmp_path / "hf"), model_class="ctc")
    assert notes and HEAD_FILE in notes[0]
    encoder = transformers.Wav2Vec2Model.from_pretrained(out).eval()
    with safe_open(str(out / HEAD_FILE), "pt") as f:
        assert "softmax(layer_weights)" in f.metadata()["formula"]
        w, weight, bias = (f.get_tensor(k) for k in ("layer_weights", "lm_head.weight", "lm_head.bias"))
    wave = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 12_000)).astype(np.float32))
    with torch.no_grad():
        states = encoder(wave, output_hidden_states=True).hidden_states
        hidden = sum(s * a for s, a in zip(states, torch.softmax(w, 0), strict=True))
        torch.testing.assert_close(hidden @ weight.T + bias, model(wave), atol=1e-4, rtol=0)
