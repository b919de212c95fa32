"""The pre-training data path: shards -> dynamic batches -> (workers) -> micro-batches (docs/design.md §2, §3, §5).

Small int16 IndexedDataset shards + manifests are written here in the format of tools/preprocess_audio.py.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import time

import numpy as np
import psutil
import pytest
import soundfile
import torch

from megatron_speech.config import DataConfig
from megatron_speech.data import loader as loader_module
from megatron_speech.data.augment import Augmenter, list_noise_files
from megatron_speech.data.crop import crop_num_frames
from megatron_speech.data.dataset import AudioShards
from megatron_speech.data.finetune_data import collate_waveforms, frame_padding_mask
from megatron_speech.data.loader import build_eval_loader, build_pretrain_loader
from megatron_speech.data.sampler import DynamicBatchSampler, mixing_weights
from megatron_speech.models.wav2vec2.config import Wav2Vec2Config
from tests.fixtures import write_split
from tests.runs import slurm_signals_to_children

SR = 16_000
MODEL = Wav2Vec2Config(hidden_size=64, num_attention_heads=4, mask_prob=0.5, mask_length=2, num_negatives=10)
GEOMETRY = MODEL.geometry


def make_utterances(rng, count, tag, language=None, seconds=(1.0, 4.5)):
    out = []
    for i in range(count):
        n = int(rng.uniform(*seconds) * SR)
        audio = (rng.standard_normal(n) * 2000 + 3000 * np.sin(np.arange(n) * 0.05 * (1 + i % 7))).astype(np.int16)
        out.append((f"{tag}{i:03d}", audio, {"language": language} if language else {}))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One prefix, two languages (en: 48, fr: 16 utterances), 4 too-short ones; a valid split; a noise folder."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    train = make_utterances(rng, 48, "en", "en") + make_utterances(rng, 16, "fr", "fr")
    train += make_utterances(rng, 4, "short", "en", seconds=(0.2, 0.9))
    rng.shuffle(train)
    prefix = str(root / "multi")
    write_split(prefix, "train", train)
    write_split(prefix, "valid", make_utterances(rng, 12, "dev", "en"))

    noise = root / "musan"
    for kind, rate, channels, files in (("noise", 8000, 1, 2), ("music", 22050, 2, 2), ("speech", 16000, 1, 4)):
        (noise / kind / "sub").mkdir(parents=True)
        for i in range(files):
            audio = rng.standard_normal((int(rate * rng.uniform(0.5, 3.0)), channels)).astype(np.float32) * 0.1
            soundfile.write(str(noise / kind / "sub" / f"{kind}{i}.wav"), audio, rate, subtype="PCM_16")
    return {"prefix": prefix, "noise_dir": str(noise), "num_train": 64, "num_short": 4}


def data_cfg(corpus, **kw) -> DataConfig:
    base = dict(prefix=[corpus["prefix"]], max_tokens=96_000, min_sample_seconds=1.0, max_sample_seconds=4.0,
                num_workers=0, speed_perturb=[], noise_dir="", sampling_alpha=1.0)
    base.update(kw)
    return DataConfig(**base)


def take(loader, steps):
    return [next(loader) for _ in range(steps)]


def assert_same(a, b):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b, strict=True):
        for x, y in zip(step_a, step_b, strict=True):
            assert x["ids"] == y["ids"] and x["step"] == y["step"] and x["micro_step"] == y["micro_step"]
            for key in ("waveform", "mask", "negatives"):
                assert torch.equal(x[key], y[key]), key
            assert (x["channel_mask"] is None) == (y["channel_mask"] is None)
            if x["channel_mask"] is not None:
                assert torch.equal(x["channel_mask"], y["channel_mask"])


# ------------------------------------------------------------------------------------------------------------
# dataset


def test_shards_lengths_labels_and_skipped(corpus):
    shards = AudioShards(corpus["prefix"], "train", min_samples=SR)
    assert len(shards) == corpus["num_train"] and shards.num_skipped == corpus["num_short"]
    assert shards.skipped_seconds > 0 and (shards.lengths >= SR).all()
    assert sorted(shards.language_names) == ["en", "fr"]
    i = int(np.argmax(shards.lengths))
    assert shards.labels(i)["language"] == shards.language(i)
    whole = shards.read(i)
    assert whole.dtype == np.int16 and len(whole) == shards.lengths[i]
    part = shards.read(i, 100, 50)
    assert np.array_equal(part, whole[100:150]) and not part.flags.writeable  # a view into the mmap
    with pytest.raises(IndexError, match="outside utterance"):
        shards.read(i, int(shards.lengths[i]) - 10, 20)


def test_shard_errors_name_the_file(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere_train\.manifest\.jsonl"):
        AudioShards(str(tmp_path / "nothere"), "train")
    rows = [json.loads(line) for line in open(f"{corpus['prefix']}_train.manifest.jsonl")]
    folder = os.path.dirname(corpus["prefix"])

    def broken(name, edit):
        bad = [dict(r) for r in rows]
        edit(bad)
        prefix = os.path.join(folder, name)
        with open(f"{prefix}_train.manifest.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in bad)
        return prefix

    prefix = broken("missing_shard", lambda b: b[3].update(shard="multi_train_00099"))
    with pytest.raises(FileNotFoundError, match=r"missing_shard_train\.manifest\.jsonl:4 .*multi_train_00099\.idx"):
        AudioShards(prefix, "train")
    prefix = broken("outside", lambda b: b[5].update(index=999))
    with pytest.raises(ValueError, match=r"outside_train\.manifest\.jsonl:6: index 999 points outside shard "
                                         r".*multi_train_00000\.idx, which holds 16"):
        AudioShards(prefix, "train")
    prefix = broken("wrong_len", lambda b: b[0].update(samples=b[0]["samples"] + 1))
    with pytest.raises(ValueError, match=r"wrong_len_train\.manifest\.jsonl:1: samples="):
        AudioShards(prefix, "train")


# ------------------------------------------------------------------------------------------------------------
# batches, crops, DP/TP assignment


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_batches_within_budget_and_cropped_by_the_rule(corpus, tp):
    cfg = data_cfg(corpus)
    model = dataclasses.replace(MODEL, mask_channel_prob=0.2)
    shards = AudioShards(corpus["prefix"], "train", SR)
    length_of = {shards.id(i): int(shards.lengths[i]) for i in range(len(shards))}
    loader = build_pretrain_loader(cfg, model, dp_rank=0, dp_size=1, num_micro_batches=2, tp_size=tp, seed=3)
    sizes = set()
    for step, micro_batches in enumerate(take(loader, 12)):
        assert len(micro_batches) == 2
        for m, batch in enumerate(micro_batches):
            wave, mask, neg = batch["waveform"], batch["mask"], batch["negatives"]
            b, t = wave.shape
            f = mask.shape[1]
            assert wave.dtype == torch.float32 and mask.dtype == torch.bool and neg.dtype == torch.int64
            assert t == 320 * (f - 1) + 400 and f % tp == 0
            assert neg.shape == (b, f, MODEL.num_negatives) and batch["channel_mask"].shape == (b, 64)
            assert batch["num_samples"] == b * t <= cfg.max_tokens
            shortest = min(length_of[u] for u in batch["ids"])
            assert f == crop_num_frames(shortest, 4 * SR, tp, MODEL.mask_min_masks * 2 + 1, GEOMETRY)
            counts = mask.sum(1)
            assert (counts == counts[0]).all() and counts[0] >= MODEL.mask_min_masks  # require_same_masks
            assert (batch["step"], batch["micro_step"]) == (step, m)
            # normalized per utterance
            assert torch.allclose(wave.mean(1), torch.zeros(b), atol=1e-4)
            assert torch.allclose(wave.std(1, unbiased=False), torch.ones(b), atol=5e-3)
            sizes.add(b)
    assert max(sizes) > 1  # dynamic batching packs short utterances


def test_epoch_covers_every_utterance_once_across_dp_ranks(corpus):
    shards = AudioShards(corpus["prefix"], "train", SR)
    dp, nmb = 3, 2
    seen: dict[int, list[int]] = collections.defaultdict(list)
    for rank in range(dp):
        sampler = DynamicBatchSampler(shards.lengths, 96_000, 4 * SR, seed=5, dp_rank=rank, dp_size=dp,
                                      num_micro_batches=nmb, geometry=GEOMETRY)
        for slot in sampler.slots():
            if slot.epoch > 1:
                break
            seen[slot.epoch].extend(slot.indices.tolist())
            # budget at the crop rule (tp = 1 is the longest crop; any tp is within it)
            shortest = int(shards.lengths[slot.indices].min())
            assert len(slot.indices) * GEOMETRY.num_samples(crop_num_frames(shortest, 4 * SR, 1, 1, GEOMETRY)) <= 96_000
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == list(range(len(shards)))
    # batches differ between epochs (reshuffled), the epoch's content does not
    s = DynamicBatchSampler(shards.lengths, 96_000, 4 * SR, seed=5, geometry=GEOMETRY)
    assert [b.tolist() for b in s.epoch_batches(0)] != [b.tolist() for b in s.epoch_batches(1)]


def test_dp_ranks_disjoint_tp_ranks_identical(corpus):
    cfg = data_cfg(corpus, speed_perturb=[0.9, 1.0, 1.1])
    common = dict(dp_size=2, num_micro_batches=2, tp_size=2, seed=11)
    rank0 = take(build_pretrain_loader(cfg, MODEL, dp_rank=0, **common), 4)
    rank0_tp1 = take(build_pretrain_loader(cfg, MODEL, dp_rank=0, **common), 4)  # another TP rank, same dp_rank
    rank1 = take(build_pretrain_loader(cfg, MODEL, dp_rank=1, **common), 4)
    assert_same(rank0, rank0_tp1)
    ids0 = [u for step in rank0 for b in step for u in b["ids"]]
    ids1 = [u for step in rank1 for b in step for u in b["ids"]]
    assert not set(ids0) & set(ids1) and len(set(ids0)) == len(ids0)  # within the first epoch: no repeats


def test_resume_mid_epoch_is_bit_identical(corpus):
    cfg = data_cfg(corpus, speed_perturb=[0.9, 1.0, 1.1], noise_dir=corpus["noise_dir"], noise_prob=0.7)
    model = dataclasses.replace(MODEL, mask_channel_prob=0.2)
    common = dict(dp_rank=1, dp_size=2, num_micro_batches=3, tp_size=2, seed=7)
    loader = build_pretrain_loader(cfg, model, **common)
    take(loader, 2)
    state = json.loads(json.dumps(loader.state_dict()))  # plain JSON types: fits any checkpoint
    rest = take(loader, 12)  # runs past the end of epoch 0 (~35 micro-batches = ~6 global batches of 6)
    assert loader.state_dict()["epoch"] >= 1
    assert state["global_batches"] == 2 and state["epoch"] == 0
    resumed = build_pretrain_loader(cfg, model, start_state=state, **common)
    assert_same(rest, take(resumed, 12))
    # load_state_dict on a running loader restarts it at that position too
    loader.load_state_dict(state)
    assert_same(rest[:2], take(loader, 2))


def test_resume_at_another_layout_continues_the_same_micro_batches(corpus):
    shards = AudioShards(corpus["prefix"], "train", SR)
    a = DynamicBatchSampler(shards.lengths, 96_000, 4 * SR, seed=2, dp_rank=0, dp_size=2, num_micro_batches=2,
                            geometry=GEOMETRY)
    slots = a.slots()
    for _ in range(2 * 2):  # two global batches of rank 0
        slot = next(slots)
    a.position = slot.after
    state = a.state_dict()
    b = [DynamicBatchSampler(shards.lengths, 96_000, 4 * SR, seed=2, dp_rank=r, dp_size=4, geometry=GEOMETRY)
         for r in range(4)]
    for s in b:
        s.load_state_dict(state)
    nxt = [next(s.slots()).indices.tolist() for s in b]
    stream = [x for e in (0, 1) for x in a.epoch_batches(e)]
    assert nxt == [x.tolist() for x in stream[8:12]]  # 2 global batches x 4 micro-batches consumed


# ------------------------------------------------------------------------------------------------------------
# augmentation


def test_augmentation_only_when_enabled_and_reproducible(corpus):
    common = dict(dp_rank=0, dp_size=1, num_micro_batches=2, tp_size=1)
    raw_cfg = data_cfg(corpus, normalize=False)
    plain = take(build_pretrain_loader(raw_cfg, MODEL, seed=1, **common), 3)
    # no augmentation: every row is an exact window of the stored int16 audio
    shards = AudioShards(corpus["prefix"], "train", SR)
    index_of = {shards.id(i): i for i in range(len(shards))}
    for step in plain:
        for batch in step:
            for row, uid in zip(batch["waveform"], batch["ids"], strict=True):
                audio = shards.read(index_of[uid]).astype(np.float32) / 32768
                row = row.numpy()
                heads = np.lib.stride_tricks.sliding_window_view(audio[:len(audio) - len(row) + 16], 16)
                starts = np.flatnonzero((heads == row[:16]).all(axis=1))
                assert any(np.array_equal(audio[s:s + len(row)], row) for s in starts)

    def run(seed=1, **kw):
        return take(build_pretrain_loader(data_cfg(corpus, normalize=False, **kw), MODEL, seed=seed, **common), 3)

    speed = dict(speed_perturb=[0.8, 1.25])
    noise = dict(noise_dir=corpus["noise_dir"], noise_prob=1.0)
    for kw in (speed, noise, {**speed, **noise}, dict(noise, noise_types=["babble"])):
        augmented = run(**kw)
        assert_same(augmented, run(**kw))  # reproducible per seed
        if "speed_perturb" in kw:  # crops leave room for the fastest factor on every utterance
            for step in augmented:
                for batch in step:
                    shortest = min(int(shards.lengths[index_of[u]]) for u in batch["ids"])
                    assert batch["waveform"].shape[1] * 1.25 <= shortest
        for a, p in zip(augmented, plain, strict=True):
            for x, y in zip(a, p, strict=True):
                assert x["ids"] == y["ids"]  # same batches (and, at the same crop, the same masks)
                assert "speed_perturb" in kw or torch.equal(x["mask"], y["mask"])
                assert not torch.equal(x["waveform"], y["waveform"])  # ... different audio
        other = run(seed=2, **kw)
        assert not torch.equal(other[0][0]["waveform"], augmented[0][0]["waveform"])
    # noise_prob = 0: noise configured but never drawn changes nothing; crops do not move when noise is on
    assert_same(run(noise_dir=corpus["noise_dir"], noise_prob=0.0), plain)


def test_augmenter_parts():
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(40_000) * 3000).astype(np.int16)

    def read(o, c):
        return audio[o:o + c]

    def key():
        return np.random.default_rng(123)

    plain = Augmenter(normalize_eps=None)(read, len(audio), 16_000, key())
    assert plain.shape == (16_000,) and plain.dtype == np.float32
    fast = Augmenter(speed_factors=[1.5], normalize_eps=None)(read, len(audio), 16_000, key())
    assert fast.shape == (16_000,) and not np.array_equal(fast, plain)
    # the shortest utterance of a batch (length ~ crop) cannot play faster: capped, no crash, unchanged
    capped = Augmenter(speed_factors=[1.5], normalize_eps=None)(read, 16_000, 16_000, key())
    assert np.array_equal(capped, audio[:16_000].astype(np.float32) / 32768)
    normed = Augmenter(normalize_eps=1e-5)(read, len(audio), 16_000, key())
    assert abs(normed.mean()) < 1e-5 and abs(normed.std() - 1) < 5e-3


def test_noise_folder_layout(corpus, tmp_path):
    files = list_noise_files(corpus["noise_dir"], ["noise", "music", "babble"])
    assert [len(files[k]) for k in ("noise", "music", "babble")] == [2, 2, 4]
    assert files == list_noise_files(corpus["noise_dir"], ["noise", "music", "babble"])  # sorted, stable
    (tmp_path / "noise").mkdir()
    with pytest.raises(FileNotFoundError, match="no music/ folder"):
        list_noise_files(str(tmp_path), ["music"])
    with pytest.raises(ValueError, match="holds no audio file"):
        list_noise_files(str(tmp_path), ["noise"])


# ------------------------------------------------------------------------------------------------------------
# language-temperature mixing


def test_language_temperature_proportions():
    rng = np.random.default_rng(1)
    counts = {"en": 6000, "fr": 1500, "sw": 500}
    groups = np.concatenate([np.full(n, g) for g, n in enumerate(counts.values())])
    lengths = rng.integers(2 * SR, 12 * SR, size=len(groups))
    names = list(counts)
    hours = {n: float(lengths[groups == g].sum()) / SR / 3600 for g, n in enumerate(names)}
    total = sum(hours.values())
    for alpha in (1.0, 0.5, 0.0):
        sampler = DynamicBatchSampler(lengths, 200 * SR, 12 * SR, seed=0, groups=groups, group_names=names,
                                      alpha=alpha, geometry=GEOMETRY)
        want = mixing_weights(hours, alpha)
        for epoch in range(2):
            items = sampler.epoch_items(epoch)
            drawn = {n: float(lengths[items][groups[items] == g].sum()) / SR / 3600 for g, n in enumerate(names)}
            got = sum(drawn.values())
            assert abs(got - total) / total < 0.02  # an epoch keeps the corpus' hours
            for name in names:
                # sampling error of a random subset of utterances with uniform lengths: a few percent here
                assert abs(drawn[name] / got - want[name]) < 0.02, (alpha, name, drawn[name] / got, want[name])
            if alpha == 1.0:
                assert sorted(items.tolist()) == list(range(len(lengths)))  # natural: every utterance once
    assert mixing_weights(hours, 1.0) == pytest.approx({n: h / total for n, h in hours.items()})
    assert mixing_weights(hours, 1e-6) == pytest.approx({n: 1 / 3 for n in names}, abs=1e-4)
    assert mixing_weights(hours, 0.5)["sw"] > hours["sw"] / total  # low-resource languages upsampled
    assert mixing_weights(hours, 0.5, {"en": 1, "fr": 1, "sw": 2}) == pytest.approx({"en": .25, "fr": .25, "sw": .5})


def test_loader_mixing_stats_and_prefix_weights(corpus, tmp_path):
    stats = build_pretrain_loader(data_cfg(corpus, sampling_alpha=0.5), MODEL, 0, 1, 1, 1, seed=0).mixing_stats()
    natural = stats["data/fr/natural_weight"]
    assert stats["data/fr/weight"] > natural and stats["data/skipped_utterances"] == corpus["num_short"]
    assert stats["data/en/hours"] + stats["data/fr/hours"] == pytest.approx(stats["data/hours"])
    # two prefixes with explicit weights: groups are the prefixes
    rng = np.random.default_rng(3)
    other = str(tmp_path / "other")
    write_split(other, "train", make_utterances(rng, 10, "xx"))
    cfg = data_cfg(corpus, prefix=[corpus["prefix"], other], weights=[1.0, 3.0])
    stats = build_pretrain_loader(cfg, MODEL, 0, 1, 1, 1, seed=0).mixing_stats()
    assert stats["data/multi/weight"] == pytest.approx(0.25) and stats["data/other/weight"] == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------------------------
# workers, evaluation, fine-tuning collate


def test_workers_give_the_same_batches_as_in_process(corpus):
    cfg = data_cfg(corpus, speed_perturb=[0.9, 1.1], noise_dir=corpus["noise_dir"], noise_prob=0.5)
    common = dict(dp_rank=1, dp_size=2, num_micro_batches=2, tp_size=2, seed=4)
    in_process = take(build_pretrain_loader(cfg, MODEL, **common), 5)
    loader = build_pretrain_loader(dataclasses.replace(cfg, num_workers=2), MODEL, **common)
    try:
        assert_same(in_process, take(loader, 5))
    finally:
        loader.close()


def test_workers_survive_slurm_signals(corpus):
    """Slurm sends USR1 (time-limit warning) and TERM (preemption) to every process of the step: the workers must
    keep serving batches while the training process finishes its step and saves. Signalled without pause from
    the moment they are spawned (while they still import torch, before any worker_init_fn) until the end."""
    cfg = data_cfg(corpus, speed_perturb=[0.9, 1.1], noise_dir=corpus["noise_dir"], noise_prob=0.5)
    common = dict(dp_rank=0, dp_size=1, num_micro_batches=2, tp_size=1, seed=5)
    in_process = take(build_pretrain_loader(cfg, MODEL, **common), 4)
    loader = build_pretrain_loader(dataclasses.replace(cfg, num_workers=2), MODEL, **common)
    try:
        with slurm_signals_to_children() as signalled:
            got = take(loader, 4)
            workers = {w.pid for w in loader._it._workers}
            assert workers <= signalled and all(w.is_alive() for w in loader._it._workers)
    finally:
        loader.close()
    assert_same(in_process, got)
    # the loader still ends its workers (cooperatively: they ignore TERM)
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers):
        assert time.monotonic() < deadline, "workers still alive 30 s after close()"
        time.sleep(0.1)


def test_a_bad_noise_dir_fails_before_the_manifests_load(corpus, tmp_path, monkeypatch):
    """configs/xl.yaml ships a placeholder data.noise_dir: it must fail in seconds, not after the manifest load."""
    def no_load(*args, **kwargs):
        raise AssertionError("the manifests were loaded before data.noise_dir was checked")

    monkeypatch.setattr(loader_module, "Corpus", no_load)
    with pytest.raises(FileNotFoundError, match=r"data.noise_dir='.*/musan' is neither a MUSAN folder"):
        build_pretrain_loader(data_cfg(corpus, noise_dir=str(tmp_path / "musan")), MODEL, 0, 1, 1, 1, seed=0)
    (tmp_path / "musan").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data.noise_dir='.*/musan' has no noise/ folder"):
        build_pretrain_loader(data_cfg(corpus, noise_dir=str(tmp_path / "musan")), MODEL, 0, 1, 1, 1, seed=0)
    loader_module.check_noise_dir(data_cfg(corpus, noise_dir=corpus["noise_dir"]))  # a good one passes
    loader_module.check_noise_dir(data_cfg(corpus, noise_dir=""))  # off


def test_eval_loader_is_deterministic_and_unaugmented(corpus):
    cfg = data_cfg(corpus, speed_perturb=[0.9, 1.1], noise_dir=corpus["noise_dir"], noise_prob=1.0)
    loader = build_eval_loader(cfg, MODEL, dp_rank=1, dp_size=2, tp_size=2, seed=0)
    first = list(itertools.islice(loader, loader.num_batches + 2))
    again = list(itertools.islice(loader, loader.num_batches + 2))
    assert_same([first], [again])
    plain = build_eval_loader(data_cfg(corpus), MODEL, dp_rank=1, dp_size=2, tp_size=2, seed=0)
    assert_same([first], [list(itertools.islice(plain, loader.num_batches + 2))])
    ids = {u for b in first[:loader.num_batches] for u in b["ids"]}
    assert all(u.startswith("dev") for u in ids) and all(b["waveform"].shape[1] % 320 == 80 for b in first)


def test_fine_tuning_collate_pads_with_masks():
    waves = [np.ones(1000, np.float32), np.ones(720, np.float32)]
    with pytest.raises(ValueError, match="unequal lengths"):
        collate_waveforms(waves)
    wave, padding = collate_waveforms(waves, pad=True)
    assert wave.shape == (2, 1000) and padding[1, 720:].all() and not padding[1, :720].any()
    assert collate_waveforms([waves[0], waves[0]])[1] is None  # pre-training: never a padding mask
    # frames cover [0,400), [320,720), [640,1040)
    frames = frame_padding_mask([1000, 720], num_frames=3, geometry=GEOMETRY)
    assert frames.tolist() == [[False, False, True], [False, False, True]]


def test_bench_loader_reports_throughput(corpus):
    from bench.loader_throughput import bench_loader, format_results

    results = bench_loader(corpus["prefix"], num_workers=(0,), noise_dir=corpus["noise_dir"], seconds=0.2,
                           data_cfg=data_cfg(corpus), model_cfg=MODEL)
    assert [(r["augment"], r["noise"]) for r in results] == [(False, False), (True, True)]
    assert all(r["audio_seconds_per_second"] > 0 and r["steps"] > 0 for r in results)
    assert "audio-s/s" in format_results(results)


def test_close_stops_the_workers_while_something_else_holds_the_iterator(corpus):
    """A traceback (a worker's exception, kept as sys.last_traceback) can hold the DataLoader iterator to interpreter
    exit, where multiprocessing SIGTERMs the workers, which ignore it, and joins them forever: close() stops them."""
    loader = build_pretrain_loader(dataclasses.replace(data_cfg(corpus), num_workers=2), MODEL, 0, 1, 1, 1, seed=0)
    next(loader)
    held = loader._it  # what the traceback would hold
    workers = list(held._workers)
    assert all(w.is_alive() for w in workers)
    loader.close()
    assert not any(w.is_alive() for w in workers)
