"""The data path at the seed's scale, imitated on a CPU: the binary utterance index (rebuilt when missing or stale,
once under a lock while other ranks wait), what a DataLoader worker receives (flat in the corpus size), the
vectorized epoch against the per-utterance loop it replaced, and noise packed once and memory-mapped."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from megatron_speech.common.rng import EPOCH_STREAM, counter_rng
from megatron_speech.data import dataset as dataset_module
from megatron_speech.data import index as index_module
from megatron_speech.data.augment import Augmenter
from megatron_speech.data.dataset import AudioShards, Corpus, expand_prefixes
from megatron_speech.data.index import UtteranceIndex, build_index, content_digest, ensure_index
from megatron_speech.data.noise import PACKED_DIR, open_noise
from megatron_speech.data.sampler import DynamicBatchSampler
from megatron_speech.models.wav2vec2.config import Wav2Vec2Config
from tests.fixtures import ROOT, write_split

SR = 16_000


def _utterances(rng, count, tag, languages=("en", "fr", "sw")):
    out = []
    for i in range(count):
        n = int(rng.uniform(0.3, 3.0) * SR)
        audio = (rng.standard_normal(n) * 3000).astype(np.int16)
        labels = {"language": languages[i % len(languages)]} if languages else {}
        out.append((f"{tag}{i:04d}", audio, labels | {"text": f"words {i}"}))
    return out


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    p = str(root / "corpus")
    write_split(p, "train", _utterances(np.random.default_rng(1), 40, "u"))
    return p


def _rows(prefix, split="train"):
    with open(f"{prefix}_{split}.manifest.jsonl") as f:
        return [json.loads(line) for line in f]


def test_index_matches_the_manifest_and_shards(prefix):
    index = UtteranceIndex.open(prefix, "train")
    rows = _rows(prefix)
    assert len(index) == len(rows)
    assert [index.id(i) for i in range(len(index))] == [r["id"] for r in rows]
    assert index.lengths.tolist() == [r["samples"] for r in rows]
    assert [index.language_names[c] for c in index.language] == [r["language"] for r in rows]
    corpus = Corpus(prefix, "train")
    for i in (0, 17, 39):
        assert corpus.read(i).tolist() == AudioShards(prefix, "train").read(i).tolist()
    assert AudioShards(prefix, "train").labels(5) == {"language": rows[5]["language"], "text": rows[5]["text"]}


def test_a_missing_or_stale_index_is_rebuilt_and_equals_a_fresh_one(prefix, tmp_path):
    path = ensure_index(prefix, "train")
    fresh = tmp_path / "fresh.index"

    def same_as_fresh():
        build_index(prefix, "train", str(fresh))
        assert content_digest(path) == content_digest(str(fresh))

    os.remove(path)  # missing
    assert Corpus(prefix, "train") and os.path.exists(path)
    same_as_fresh()
    # stale: the manifest edited (an utterance dropped, another's language changed); the index follows it
    rows = _rows(prefix)
    rows = rows[1:]
    rows[0]["language"] = "yo"
    with open(f"{prefix}_train.manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    corpus = Corpus(prefix, "train")
    assert len(corpus) == len(rows) and corpus.language(0) == "yo" and corpus.id(0) == rows[0]["id"]
    same_as_fresh()
    # stale: a shard rewritten (its .idx mtime changes) -> rebuilt, checked against the shard again
    before = os.stat(path).st_mtime_ns
    shard_idx = os.path.join(os.path.dirname(prefix), rows[0]["shard"] + ".idx")
    os.utime(shard_idx, ns=(time.time_ns(), time.time_ns()))
    Corpus(prefix, "train")
    assert os.stat(path).st_mtime_ns != before
    same_as_fresh()
    # a fresh index is not rebuilt
    before = os.stat(path).st_mtime_ns
    Corpus(prefix, "train")
    assert os.stat(path).st_mtime_ns == before


def _race(prefix, barrier, queue):
    builds = []
    original = index_module.build_index
    index_module.build_index = lambda *a, **k: builds.append(1) or original(*a, **k)
    barrier.wait()
    corpus = Corpus(prefix, "train")
    queue.put((len(builds), len(corpus), corpus.id(len(corpus) - 1)))


def test_concurrent_ranks_build_the_index_once(tmp_path):
    p = str(tmp_path / "race")
    write_split(p, "train", _utterances(np.random.default_rng(2), 30, "r"))
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(p, barrier, queue)) for _ in range(3)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert sum(r[0] for r in results) == 1  # one builder; the others waited on the lock and opened its file
    assert {r[1:] for r in results} == {(30, "r0029")}
    assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]


def test_a_worker_receives_the_same_few_bytes_whatever_the_corpus_size(tmp_path):
    """What a spawned DataLoader worker unpickles must not grow with the corpus (10^8 utterances x 5 workers x 8
    ranks per node): the Corpus travels as its index paths and small tables."""
    sizes = {}
    for n in (100, 2000):
        p = str(tmp_path / f"c{n}")
        rng = np.random.default_rng(n)
        clips = [(f"c{i}", (rng.standard_normal(SR) * 1000).astype(np.int16), {}) for i in range(4)]
        write_split(p, "train", clips)
        rows = _rows(p)
        with open(f"{p}_train.manifest.jsonl", "w") as f:  # n utterances sharing 4 clips
            for k in range(n):
                f.write(json.dumps(rows[k % 4] | {"id": f"u{k:07d}", "language": f"l{k % 7}"}) + "\n")
        corpus = Corpus(p, "train")
        assert len(corpus) == n and corpus.languages.max() == 6 and len(corpus.lengths) == n
        sizes[n] = len(pickle.dumps(corpus))
        clone = pickle.loads(pickle.dumps(corpus))
        assert clone.id(n - 1) == f"u{n - 1:07d}" and np.array_equal(clone.read(n - 1), corpus.read(n - 1))
    assert abs(sizes[2000] - sizes[100]) <= 8 and sizes[2000] < 4096, sizes  # only the paths' lengths differ


def _reference_epoch(sampler: DynamicBatchSampler, epoch: int) -> list[list[int]]:
    """The epoch as main built it before vectorization: one Python step per utterance (copied from 3e507c6)."""
    from megatron_speech.data.crop import crop_num_frames

    items = sampler.epoch_items(epoch)
    rng = counter_rng(sampler.seed, epoch, 1, 0, stream=EPOCH_STREAM)
    ties = rng.random(len(items)) if sampler.shuffle else np.arange(len(items))
    sort_key = np.minimum(sampler.lengths, sampler.max_samples)
    items = items[np.lexsort((ties, -sort_key[items]))]
    g = sampler.geometry
    crop = [g.num_samples(crop_num_frames(int(n), sampler.max_samples, 1, 1, g)) for n in sort_key[items]]
    bounds, count = [0], 0
    for i, c in enumerate(crop):
        if count and (count + 1) * c > sampler.max_tokens:
            bounds.append(i)
            count = 0
        count += 1
    bounds.append(len(items))
    batches = [items[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if sampler.shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_vectorized_epoch_equals_the_per_utterance_loop(shuffle):
    rng = np.random.default_rng(7)
    n = 20_000
    lengths = rng.integers(SR // 2, 20 * SR, size=n).astype(np.int32)
    lengths[rng.random(n) < 0.3] = 5 * SR  # long runs of equal crops: the carried-over batch path
    groups = rng.integers(-1, 5, size=n).astype(np.int16)  # -1 = too short, not sampled
    for max_tokens in (1_400_000, 500_000, 240_000):
        sampler = DynamicBatchSampler(lengths, max_tokens, 15 * SR, seed=3, groups=groups,
                                      group_names=list("abcde"), alpha=0.5, shuffle=shuffle,
                                      geometry=Wav2Vec2Config().geometry)
        for epoch in (0, 1):
            got = [b.tolist() for b in sampler.epoch_batches(epoch)]
            assert got == _reference_epoch(sampler, epoch)
            assert all(groups[i] >= 0 for b in got for i in b)


def test_noise_is_packed_once_and_read_by_memory_map(tmp_path):
    folder = tmp_path / "musan"
    rng = np.random.default_rng(0)
    for kind, rate in (("noise", 16000), ("music", 22050), ("speech", 16000)):
        (folder / kind).mkdir(parents=True)
        for i in range(2):
            soundfile.write(str(folder / kind / f"{kind}{i}.wav"),
                            (rng.standard_normal(int(rate * 1.5)) * 0.1).astype(np.float32), rate, subtype="PCM_16")
    bank = open_noise(str(folder), ["noise", "music", "babble"])
    packed = Path(f"{bank.prefix}_train.manifest.jsonl")
    assert packed.exists() and Path(bank.prefix).is_relative_to(folder / PACKED_DIR)
    assert {bank.count(k) for k in bank.kinds} == {2}
    # 16 kHz files come back sample-exact; the bank pickles as a path, not as audio
    audio, _ = soundfile.read(str(folder / "noise" / "noise1.wav"), dtype="int16")
    assert np.array_equal(bank.audio("noise", 1), audio) and not bank.audio("noise", 1).flags.writeable
    assert len(pickle.dumps(Augmenter(noise=bank, noise_prob=1.0))) < 4096
    # a second opening uses the pack as it is
    stamp = packed.stat().st_mtime_ns
    assert open_noise(str(folder), ["noise"]).prefix == bank.prefix and packed.stat().st_mtime_ns == stamp
    # a changed folder gets a new pack beside the old one, which a running job keeps reading
    soundfile.write(str(folder / "noise" / "noise2.wav"), (rng.standard_normal(SR) * 0.1).astype(np.float32), SR)
    new = open_noise(str(folder), ["noise"])
    assert new.prefix != bank.prefix and new.count("noise") == 3
    assert np.array_equal(pickle.loads(pickle.dumps(bank)).audio("noise", 1), audio)
    # a packed prefix is taken as it is
    assert open_noise(new.prefix, ["music"]).count("music") == 2


def test_prefix_patterns_expand_to_all_the_parts_or_refuse(tmp_path):
    def journal(k, complete=True):
        Path(f"{tmp_path}/cv_part{k:04d}.preprocess.json").write_text(
            json.dumps({"complete": complete, "params": {"part": [k, 3]}}))

    for k in (1, 0):
        write_split(str(tmp_path / f"cv_part{k:04d}"), "train", _utterances(np.random.default_rng(k), 3, f"p{k}_"))
        journal(k)
    # part 2 of 3 failed (no manifest): training on the other two would silently leave it out
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 parts of .*cv are missing or unfinished \(cv_part0002"):
        Corpus(str(tmp_path / "cv_part*"), "train")
    write_split(str(tmp_path / "cv_part0002"), "train", _utterances(np.random.default_rng(2), 3, "p2_"))
    journal(2, complete=False)  # its manifest is there, its journal says unfinished
    with pytest.raises(FileNotFoundError, match="missing or unfinished"):
        Corpus(str(tmp_path / "cv_part*"), "train")
    journal(2)
    assert expand_prefixes([str(tmp_path / "cv_part*")], "train") == [str(tmp_path / f"cv_part{k:04d}")
                                                                       for k in range(3)]
    assert len(Corpus(str(tmp_path / "cv_part*"), "train")) == 9
    with pytest.raises(FileNotFoundError, match="matches no train manifest"):
        expand_prefixes(str(tmp_path / "nothing*"), "train")


_OUTLIVE = """
import sys
from megatron_speech.data.dataset import AudioShards, Corpus
view = Corpus(sys.argv[1], "train").read(3)      # the Corpus is gone at once
labeled = AudioShards(sys.argv[1], "train").read(5)
print(int(view.astype("int64").sum()), int(labeled.astype("int64").sum()))
"""


def test_audio_views_outlive_their_corpus(prefix):
    """A view into a shard must keep its mapping: megatron's reader unmapped it with the dataset (a segfault)."""
    out = subprocess.run([sys.executable, "-c", _OUTLIVE, prefix], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    corpus = Corpus(prefix, "train")
    assert out.stdout.split() == [str(int(corpus.read(i).astype(np.int64).sum())) for i in (3, 5)]


def test_open_shard_mappings_are_bounded(prefix, monkeypatch):
    monkeypatch.setattr(dataset_module, "MAX_OPEN_SHARDS", 2)
    corpus, reference = Corpus(prefix, "train"), AudioShards(prefix, "train")
    for i in list(range(len(corpus))) * 2:  # 40 utterances over 3 shards, twice
        assert np.array_equal(corpus.read(i), reference.read(i))
        assert len(corpus._shards) <= 2


def test_a_worker_refuses_an_index_rebuilt_under_the_job(tmp_path):
    p = str(tmp_path / "moving")
    write_split(p, "train", _utterances(np.random.default_rng(3), 6, "m"))
    payload = pickle.dumps(Corpus(p, "train"))  # what a DataLoader worker receives
    rows = _rows(p)[1:]  # an utterance removed: every later one moves up by one
    with open(f"{p}_train.manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    Corpus(p, "train")  # another job (or rank) rebuilds the index
    with pytest.raises(RuntimeError, match="was rebuilt while this job ran"):
        pickle.loads(payload)
