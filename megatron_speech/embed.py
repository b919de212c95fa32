"""Hidden states of one audio file, or of every utterance of a manifest.

    python -m megatron_speech.embed --checkpoint CKPT --audio FILE --output OUT.npy [--layer L] [--ema]
    python -m megatron_speech.embed --checkpoint CKPT --manifest M --output DIR [--layers all|final|L1,L2,...]
                                    [--pool none|mean] [--format npy|shards] [--max-tokens N] [--num-workers N]
                                    [--ema]

CKPT: an iter_NNNNNNN/ folder, a save_dir (its latest checkpoint) or SAVE_DIR/best (train.keep_best).
One file: OUT.npy is [frames, hidden] float32: without --layer, after the final LayerNorm (transformers'
last_hidden_state); with --layer L, the output of transformer layer L before any final norm (transformers'
hidden_states[L]). The audio (any format, rate, channels) is decoded and resampled exactly as
tools/preprocess_audio.py does, then normalized with the checkpoint's data.normalize / normalize_eps.

A manifest (what `evaluate` reads: preprocessed shards' PREFIX_{train,valid}.manifest.jsonl, or a JSONL / fairseq
TSV / folder of audio files, decoded as above): layers are named "0".."L" (hidden_states[l]; 0 is the encoder
input after the positional conv) and "final" (last_hidden_state); `--layers all` is 0..L (`all,final` adds the
final one), default final.
--pool mean: the mean over the utterance's real frames ([hidden]); none: every frame ([frames, hidden]).
--format npy: DIR/<layer>/<id>.npy (ids made file-name safe; DIR/index.jsonl maps ids to files); shards:
DIR/<layer>/shard_NNNNNN.npy, one per window of utterances, rows located by DIR/index.jsonl (embed_store.py).
Batches hold whole utterances sorted by length within windows of WINDOW utterances, at most --max-tokens padded
samples (default: the checkpoint's data.max_tokens); padded frames are masked out of attention and pooling, so an
utterance's result does not depend on its batch. Resumable: a rerun into the same DIR skips what index.jsonl lists
(see embed_store.py). --num-workers processes decode and batch ahead of the model. Runs at TP=1 in fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")
logger = logging.getLogger("megatron_speech.embed")
WINDOW = 512  # utterances decoded, length-sorted and batched together: bounds memory (~0.5 GB of 15 s audio)


def load_waveform(path: str, normalize: bool, eps: float) -> torch.Tensor:
    """[1, T] float32 at 16 kHz, as the trainer sees it (before augmentation)."""
    from megatron_speech.data.audio_io import Kept, decode_file
    from megatron_speech.data.augment import normalize as normalize_fn

    decoded = decode_file(path, min_samples=400)
    if not isinstance(decoded, Kept):
        raise ValueError(f"{path}: {decoded.reason}: {decoded.detail}")
    audio = decoded.samples.astype(np.float32) / 32768.0
    if normalize:
        audio = normalize_fn(audio, eps)
    return torch.from_numpy(audio)[None]


def _load_model(checkpoint: str, use_ema: bool):
    from megatron_speech.checkpoint.model_io import checkpoint_config, load_model_weights
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import single_rank_groups

    cfg = checkpoint_config(checkpoint)
    model = build_model(cfg.model, pg_collection=single_rank_groups()).eval()
    load_model_weights(checkpoint, model, use_ema=use_ema)
    return cfg, model


def embed(checkpoint: str, audio: str, layer: int | None = None, use_ema: bool = False) -> np.ndarray:
    cfg, model = _load_model(checkpoint, use_ema)
    wave = load_waveform(audio, cfg.data.normalize, cfg.data.normalize_eps)
    with torch.no_grad():
        hidden = model.encode(wave.to(next(model.parameters()).device), output_layer=layer)[0]
    return hidden.float().cpu().numpy()  # [frames, hidden]


# ---- a manifest ------------------------------------------------------------------------------------------


def parse_layers(spec: str, num_layers: int) -> list[str]:
    """--layers -> layer names: a comma list of integers in 0..L, "final" and "all" (0..L)."""
    names: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if part == "all":
            names += [str(i) for i in range(num_layers + 1) if str(i) not in names]
            continue
        if part != "final" and not (part.isdigit() and int(part) <= num_layers):
            raise ValueError(f"--layers {spec!r}: {part!r} is not a layer of this {num_layers}-layer model; give "
                             f"a comma list of 0..{num_layers} (hidden_states[l]), 'final' (after the final "
                             f"LayerNorm) and 'all' (0..{num_layers})")
        name = part if part == "final" else str(int(part))
        if name not in names:
            names.append(name)
    return names


class _ShardAudio:
    """Preprocessed shards: int16 views into the shards (AudioShards without its labels)."""

    def __init__(self, prefix: str, split: str, min_samples: int) -> None:
        from megatron_speech.data.dataset import AudioShards

        self.shards = AudioShards(prefix, split, min_samples, label_keys=[])
        self.num_skipped = self.shards.num_skipped

    def __len__(self) -> int:
        return len(self.shards)

    def id(self, i: int) -> str:
        return self.shards.id(i)

    def audio(self, i: int) -> np.ndarray | str:
        return self.shards.read(i)


class _FileAudio:
    """Audio files of a JSONL / TSV manifest or a folder, decoded one by one when read (never all in memory)."""

    num_skipped = 0

    def __init__(self, manifest: str, min_samples: int) -> None:
        from megatron_speech.data.inputs import list_inputs

        _, self.items = list_inputs(manifest)
        self.min_samples = min_samples

    def __len__(self) -> int:
        return len(self.items)

    def id(self, i: int) -> str:
        return self.items[i].id

    def audio(self, i: int) -> np.ndarray | str:
        """int16 samples at 16 kHz, or why the file was rejected."""
        from megatron_speech.data.audio_io import Kept, decode_file

        item = self.items[i]
        if item.reject is not None:
            return f"{item.reject[0]}: {item.reject[1]}"
        decoded = decode_file(item.source, self.min_samples)
        return decoded.samples if isinstance(decoded, Kept) else f"{decoded.reason}: {decoded.detail}"


def open_audio(manifest: str, min_samples: int):
    """`evaluate`'s manifest kinds (data/finetune_data.open_manifest), read lazily: shards, or audio files."""
    from megatron_speech.data.finetune_data import shard_manifest

    shards = shard_manifest(manifest)
    return _ShardAudio(*shards, min_samples) if shards else _FileAudio(manifest, min_samples)


class WindowBatches:
    """Map-style dataset for the DataLoader (its workers decode): positions of one window -> its padded batches,
    longest first, each at most max_tokens padded samples (a longer utterance gets a batch of its own).
    A batch: {"waveform": float32 [B, T] (each utterance normalized on its own samples, then zero-padded),
    "padding_mask": bool [B, F] (True = padded frame), "ids", "frames": real frames per utterance}."""

    def __init__(self, source, geometry, normalize_eps: float | None, max_tokens: int) -> None:
        self.source, self.geometry, self.eps, self.max_tokens = source, geometry, normalize_eps, max_tokens

    def __getitem__(self, positions: np.ndarray) -> dict:
        from megatron_speech.data.augment import normalize
        from megatron_speech.data.finetune_data import collate_waveforms, frame_padding_mask, padded_num_frames

        kept: list[tuple[str, np.ndarray]] = []
        rejects = []
        for i in positions.tolist():
            audio = self.source.audio(i)
            if isinstance(audio, str):
                rejects.append((self.source.id(i), audio))
            else:
                kept.append((self.source.id(i), audio))
        kept.sort(key=lambda x: -len(x[1]))  # stable: ties keep manifest order
        batches, start = [], 0
        while start < len(kept):
            longest = len(kept[start][1])
            count = max(1, min(len(kept) - start, self.max_tokens // longest))
            chunk = kept[start:start + count]
            start += count
            lengths = [len(a) for _, a in chunk]
            waves = [a.astype(np.float32) / 32768.0 for _, a in chunk]
            if self.eps is not None:
                waves = [normalize(w, self.eps) for w in waves]
            num_frames = padded_num_frames(longest, self.geometry, 1)
            waveform, _ = collate_waveforms(waves, pad=True, min_length=self.geometry.num_samples(num_frames))
            padding = frame_padding_mask(lengths, num_frames, self.geometry)
            batches.append({"waveform": waveform, "padding_mask": padding, "ids": [uid for uid, _ in chunk],
                            "frames": (~padding).sum(1)})
        return {"batches": batches, "rejects": rejects}


def _pending_windows(source, done: set[str], window: int) -> Iterator[np.ndarray]:
    """Positions not yet embedded, in manifest order, `window` at a time (lazily: memory is one window)."""
    for start in range(0, len(source), window):
        positions = np.arange(start, min(start + window, len(source)))
        if done:
            positions = positions[[source.id(i) not in done for i in positions.tolist()]]
        if len(positions):
            yield positions


def _forward(model, batch: dict, layers: list[str], pooled: bool) -> dict[str, list[np.ndarray]]:
    """One batch through the encoder: per layer name, each utterance's [frames, hidden] or pooled [hidden]."""
    device = next(model.parameters()).device
    wave = torch.from_numpy(batch["waveform"]).to(device)
    padding = torch.from_numpy(batch["padding_mask"]).to(device)
    if layers == ["final"]:
        hidden = {"final": model.encode(wave, padding_mask=padding)}
    elif len(layers) == 1:
        hidden = {layers[0]: model.encode(wave, padding_mask=padding, output_layer=int(layers[0]))}
    else:
        states = model.encode(wave, padding_mask=padding, all_layers=True)  # hidden_states[0..L], final
        hidden = {name: states[-1] if name == "final" else states[int(name)] for name in layers}
    frames = batch["frames"].tolist()
    out = {}
    for name, h in hidden.items():  # h: [B, F, H]
        if pooled:
            real = (~padding)[..., None].to(h.dtype)  # [B, F, 1]
            means = ((h * real).sum(1) / real.sum(1)).float().cpu().numpy()  # [B, H]
            out[name] = list(means)
        else:
            h = h.float().cpu().numpy()
            out[name] = [h[b, :n] for b, n in enumerate(frames)]
    return out


def embed_manifest(checkpoint: str, manifest: str, output: str, layers: str = "final", pool: str = "none",
                   fmt: str = "npy", max_tokens: int | None = None, use_ema: bool = False, num_workers: int = 0,
                   window: int = WINDOW) -> dict:
    """Embed every utterance of `manifest` not yet in `output` (see the module docstring). Returns counts:
    written, already_done, rejected (undecodable files), too_short (shards shorter than one frame)."""
    from megatron_speech.checkpoint.model_io import resolve
    from megatron_speech.data.stream import data_loader, start_workers
    from megatron_speech.embed_store import EmbeddingStore

    if pool not in ("none", "mean"):
        raise ValueError(f"--pool {pool!r}: expected none or mean")
    cfg, model = _load_model(checkpoint, use_ema)
    names = parse_layers(layers, cfg.model.num_layers)
    geometry = cfg.model.geometry
    source = open_audio(manifest, geometry.receptive_field)
    settings = {"checkpoint": str(resolve(checkpoint).resolve()), "ema": use_ema, "layers": names, "pool": pool,
                "format": fmt, "hidden_size": cfg.model.hidden_size, "dtype": "float32"}
    store = EmbeddingStore(output, names, pool == "mean", fmt, settings)
    counts = {"written": 0, "already_done": len(store.done), "rejected": 0, "too_short": source.num_skipped}
    builder = WindowBatches(source, geometry, cfg.data.normalize_eps if cfg.data.normalize else None,
                            max_tokens or cfg.data.max_tokens)
    loader = data_loader(builder, _pending_windows(source, store.done, window), num_workers, 2 * num_workers)
    started, last_log = time.monotonic(), time.monotonic()
    try:
        with torch.no_grad():
            for item in start_workers(loader):
                store.reject(item["rejects"])
                counts["rejected"] += len(item["rejects"])
                rows = sum(len(b["ids"]) if pool == "mean" else int(b["frames"].sum()) for b in item["batches"])
                store.begin_window(rows, cfg.model.hidden_size)
                for batch in item["batches"]:
                    store.add(batch["ids"], _forward(model, batch, names, pool == "mean"), batch["frames"])
                    counts["written"] += len(batch["ids"])
                store.end_window()
                if time.monotonic() - last_log > 60:
                    last_log = time.monotonic()
                    logger.info("%d utterances written (%.1f/s), %d rejected", counts["written"],
                                counts["written"] / (last_log - started), counts["rejected"])
    finally:
        store.close()
    return counts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="iter_NNNNNNN/ folder, a save_dir (its latest) or SAVE_DIR/best")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--audio", help="one audio file -> --output OUT.npy")
    what.add_argument("--manifest", help="a manifest -> --output DIR")
    parser.add_argument("--output", required=True)
    parser.add_argument("--layer", type=int, default=None, help="--audio: transformer layer L (hidden_states[L])")
    parser.add_argument("--layers", default="final", help="--manifest: a comma list of 0..L, final and all (0..L)")
    parser.add_argument("--pool", default="none", choices=["none", "mean"])
    parser.add_argument("--format", default="npy", choices=["npy", "shards"])
    parser.add_argument("--max-tokens", type=int, help="padded samples per batch (default: the checkpoint's)")
    parser.add_argument("--num-workers", type=int, default=2, help="decoding processes (0: in this process)")
    parser.add_argument("--ema", action="store_true")
    args = parser.parse_args(argv)
    manifest_only = ("--layers", "--pool", "--format", "--max-tokens", "--num-workers")
    if args.audio and any(a.split("=")[0] in manifest_only for a in argv):
        parser.error(f"{', '.join(manifest_only)} go with --manifest; --audio takes --layer")
    if args.manifest and args.layer is not None:
        parser.error("--layer goes with --audio; with --manifest use --layers")
    for pattern in (".*load_state_dict.*is deprecated.*", ".*ShardedTensor.*"):  # torch's, about megatron's loader
        warnings.filterwarnings("ignore", message=pattern)
    try:
        if args.audio:
            hidden = embed(args.checkpoint, args.audio, args.layer, args.ema)
        else:
            from megatron_speech.training.monitor import setup_logging

            setup_logging(0)
            counts = embed_manifest(args.checkpoint, args.manifest, args.output, args.layers, args.pool,
                                    args.format, args.max_tokens, args.ema, args.num_workers)
    except (ValueError, FileNotFoundError) as e:
        print(f"embed: {e}", file=sys.stderr)
        return 2
    if args.audio:
        np.save(args.output, hidden)
        print(f"wrote {args.output}: {hidden.shape[0]} frames x {hidden.shape[1]}")
    else:
        print(f"{args.output}: {json.dumps(counts)}")
    return 0


if __name__ == "__main__":  # dist_checkpointing and the decoding workers re-import __main__
    sys.exit(main(sys.argv[1:]))
