"""`embed --manifest`: batched, padded extraction equals the one-file path utterance by utterance; pooling; the
npy and shard layouts; resume after a kill; bad --layers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.fixtures import synthetic_test_files, tiny_config


def _save_tiny(path):
    """A tiny checkpoint, written in this process (embed's one-process world, as `embed` forms it)."""
    from megatron_speech.checkpoint.model_io import save_model_only
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import single_rank_groups

    cfg = tiny_config(dropout=0.0)
    model = build_model(cfg.model, pg_collection=single_rank_groups())
    torch.manual_seed(5)
    with torch.no_grad():  # away from the init (zero biases, unit norms would hide a mixed-up layer)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model_only(path, model, cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    _save_tiny(str(root / "ckpt"))
    manifest = synthetic_test_files(root, num=6)  # 22.05 kHz stereo files of different lengths
    # ids that are not file names: a folder separator and a space
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["id"], rows[1]["id"] = "spk 1/utt:1", "spk 1/utt:2"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, manifest, rows


def _single(root, rows):
    """Each file alone, as `embed --audio` computes it (the model loaded once)."""
    from megatron_speech.embed import _load_model, embed, load_waveform

    cfg, model = _load_model(str(root / "ckpt"), False)
    out = {"1": {}, "final": {}}
    with torch.no_grad():
        for r in rows:
            wave = load_waveform(str(root / r["path"]), cfg.data.normalize, cfg.data.normalize_eps)
            out["1"][r["id"]] = model.encode(wave, output_layer=1)[0].numpy()
            out["final"][r["id"]] = model.encode(wave)[0].numpy()
    np.testing.assert_array_equal(embed(str(root / "ckpt"), str(root / rows[0]["path"]), 1), out["1"][rows[0]["id"]])
    return out


def _index(out):
    return {row["id"]: row for row in map(json.loads, (out / "index.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def single(setup):
    root, _, rows = setup
    return _single(root, rows)


def test_batched_npy_equals_one_file_at_a_time(setup, single, tmp_path):
    from megatron_speech.embed import embed_manifest

    root, manifest, rows = setup
    # a budget of ~2 utterances per batch and windows of 4: batches with padding, several windows
    counts = embed_manifest(str(root / "ckpt"), str(manifest), str(tmp_path), "1,final", max_tokens=45_000,
                            window=4)
    assert counts["written"] == len(rows) and counts["rejected"] == 0
    index = _index(tmp_path)
    assert set(index) == {r["id"] for r in rows}
    assert index["spk 1/utt:1"]["file"] != index["spk 1/utt:2"]["file"]
    assert "/" not in index["spk 1/utt:1"]["file"]
    for layer in ("1", "final"):
        for uid, expected in single[layer].items():
            got = np.load(tmp_path / layer / index[uid]["file"])
            assert got.shape == expected.shape and index[uid]["frames"] == expected.shape[0]
            np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0, err_msg=f"{uid} layer {layer}")


def test_pooled_shards_are_means_of_frames(setup, single, tmp_path):
    from megatron_speech.embed import embed_manifest

    root, manifest, rows = setup
    embed_manifest(str(root / "ckpt"), str(manifest), str(tmp_path / "mean"), "all", pool="mean", fmt="shards",
                   max_tokens=45_000, window=4)
    embed_manifest(str(root / "ckpt"), str(manifest), str(tmp_path / "frames"), "1", fmt="shards",
                   max_tokens=45_000, window=4)
    pooled, frames = _index(tmp_path / "mean"), _index(tmp_path / "frames")
    assert sorted(os.listdir(tmp_path / "mean")) == [".embed.lock", "0", "1", "2", "embed.json", "index.jsonl"]
    for r in rows:
        p, f = pooled[r["id"]], frames[r["id"]]
        mean = np.load(tmp_path / "mean" / "1" / f"shard_{p['shard']:06d}.npy")[p["row"]]
        framewise = np.load(tmp_path / "frames" / "1" / f"shard_{f['shard']:06d}.npy")[f["row"]:f["row"] + f["frames"]]
        np.testing.assert_allclose(framewise, single["1"][r["id"]], atol=2e-5, rtol=0)
        np.testing.assert_allclose(mean, framewise.mean(0), atol=1e-5, rtol=0)


def test_resume_after_a_kill_skips_done_and_matches_a_full_run(setup, tmp_path):
    from megatron_speech.embed import embed_manifest

    root, manifest, rows = setup
    ckpt = str(root / "ckpt")
    full = tmp_path / "full"
    embed_manifest(ckpt, str(manifest), str(full), "all", window=2)

    out = tmp_path / "resumed"
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps({**r, "path": str(root / r["path"])}) + "\n" for r in rows[:3]))
    assert embed_manifest(ckpt, str(half), str(out), "all", window=2)["written"] == 3
    done = _index(out)
    first = {uid: os.stat(out / "2" / row["file"]).st_mtime_ns for uid, row in done.items()}
    # what a kill leaves: a half-written array under its temporary name and a torn index line
    (out / "2" / "x.npy.tmp").write_bytes(b"\x93NUMPY garbage")
    with open(out / "index.jsonl", "a") as f:
        f.write('{"id": "x00')
    full_manifest = tmp_path / "all.jsonl"
    full_manifest.write_text("".join(json.dumps({**r, "path": str(root / r["path"])}) + "\n" for r in rows))
    counts = embed_manifest(ckpt, str(full_manifest), str(out), "all", window=2)
    assert counts == {"written": 3, "already_done": 3, "rejected": 0, "too_short": 0}
    assert not list((out / "2").glob("*.tmp"))
    index = _index(out)
    assert len((out / "index.jsonl").read_text().splitlines()) == len(rows) == len(index)
    for uid, row in done.items():  # not rewritten
        assert os.stat(out / "2" / row["file"]).st_mtime_ns == first[uid]
    reference = _index(full)
    for uid in index:
        for layer in ("0", "1", "2"):
            np.testing.assert_array_equal(np.load(out / layer / index[uid]["file"]),
                                          np.load(full / layer / reference[uid]["file"]))
    # a rerun with other settings is refused, naming what differs
    with pytest.raises(ValueError, match="pool="):
        embed_manifest(ckpt, str(full_manifest), str(out), "all", pool="mean")


def test_resume_of_shards_never_overwrites_a_listed_shard(setup, tmp_path):
    from megatron_speech.embed import embed_manifest

    root, manifest, rows = setup
    ckpt = str(root / "ckpt")
    embed_manifest(ckpt, str(manifest), str(tmp_path), "final", fmt="shards", window=2)
    index = _index(tmp_path)
    # a kill after a window's shard was renamed but before its lines were appended: they are lost; the rerun
    # must write those utterances into a new shard, leaving the listed ones' shards as they are
    lines = (tmp_path / "index.jsonl").read_text().splitlines()
    (tmp_path / "index.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()}
    assert embed_manifest(ckpt, str(manifest), str(tmp_path), "final", fmt="shards", window=2)["written"] == 2
    after = _index(tmp_path)
    assert len(after) == len(rows)
    for name, data in before.items():
        assert (tmp_path / "final" / name).read_bytes() == data
    for uid, row in after.items():
        old = index[uid]
        a = np.load(tmp_path / "final" / f"shard_{row['shard']:06d}.npy")[row["row"]:row["row"] + row["frames"]]
        b = np.load(tmp_path / "final" / f"shard_{old['shard']:06d}.npy")[old["row"]:old["row"] + old["frames"]]
        np.testing.assert_array_equal(a, b)


def test_preprocessed_shards_manifest(setup, shards, tmp_path):
    from megatron_speech.data.dataset import AudioShards
    from megatron_speech.embed import embed_manifest

    root, _, _ = setup
    manifest = f"{shards}_valid.manifest.jsonl"
    # a decoding worker process (spawned, as on a GPU node) and none give the same shards
    for workers in (1, 0):
        counts = embed_manifest(str(root / "ckpt"), manifest, str(tmp_path / str(workers)), "final", pool="mean",
                                fmt="shards", max_tokens=150_000, num_workers=workers)
        assert counts["written"] == len(AudioShards(shards, "valid")) == len(_index(tmp_path / str(workers)))
    assert _index(tmp_path / "1") == _index(tmp_path / "0")
    for name in os.listdir(tmp_path / "0" / "final"):
        assert (tmp_path / "1" / "final" / name).read_bytes() == (tmp_path / "0" / "final" / name).read_bytes()


def test_bad_layers_name_the_flag_and_the_range(setup, tmp_path, capsys):
    from megatron_speech.embed import main, parse_layers

    assert parse_layers("all", 2) == ["0", "1", "2"]
    assert parse_layers("2, final,1,2", 2) == ["2", "final", "1"]
    assert parse_layers("final,all", 2) == ["final", "0", "1", "2"]
    root, manifest, _ = setup
    for bad in ("3", "-1", "last", "1;2"):
        with pytest.raises(ValueError, match=r"--layers .*0\.\.2"):
            parse_layers(bad, 2)
    rc = main(["--checkpoint", str(root / "ckpt"), "--manifest", str(manifest), "--output", str(tmp_path),
               "--layers", "7", "--num-workers", "0"])
    assert rc == 2 and "--layers '7'" in capsys.readouterr().err
