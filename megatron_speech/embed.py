"""Hidden states of one audio file.

    python -m megatron_speech.embed --checkpoint CKPT --audio FILE --output OUT.npy [--layer L] [--ema]

CKPT: an iter_NNNNNNN/ folder, a save_dir (its latest checkpoint) or SAVE_DIR/best (train.keep_best).
OUT.npy is [frames, hidden] float32: without --layer, after the final LayerNorm (transformers'
last_hidden_state); with --layer L, the output of transformer layer L before any final norm (transformers'
hidden_states[L]). The audio (any format, rate, channels) is decoded and resampled exactly as
tools/preprocess_audio.py does, then normalized with the checkpoint's data.normalize / normalize_eps.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


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


def embed(checkpoint: str, audio: str, layer: int | None = None, use_ema: bool = False) -> np.ndarray:
    from megatron_speech.checkpoint.model_io import checkpoint_config, load_model_weights
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import single_rank_groups

    cfg = checkpoint_config(checkpoint)
    model = build_model(cfg.model, pg_collection=single_rank_groups()).eval()
    load_model_weights(checkpoint, model, use_ema=use_ema)
    wave = load_waveform(audio, cfg.data.normalize, cfg.data.normalize_eps)
    with torch.no_grad():
        hidden = model.encode(wave.to(next(model.parameters()).device), output_layer=layer)[0]
    return hidden.float().cpu().numpy()  # [frames, hidden]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="iter_NNNNNNN/ folder, a save_dir (its latest) or SAVE_DIR/best")
    parser.add_argument("--audio", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--ema", action="store_true")
    args = parser.parse_args(argv)
    try:
        hidden = embed(args.checkpoint, args.audio, args.layer, args.ema)
    except ValueError as e:
        print(f"embed: {e}", file=sys.stderr)
        return 2
    np.save(args.output, hidden)
    print(f"wrote {args.output}: {hidden.shape[0]} frames x {hidden.shape[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
