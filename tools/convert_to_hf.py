"""Our checkpoint (any TP/DP layout) -> a Hugging Face transformers directory.

    python tools/convert_to_hf.py --checkpoint CKPT --output DIR [--ema] [--model-class pretraining|base]

Writes config.json, model.safetensors and preprocessor_config.json (Wav2Vec2FeatureExtractor: 16 kHz,
per-utterance normalization). CKPT is an iter_NNNNNNN/ directory or a save_dir (its latest checkpoint).
The export is safetensors: loading it never unpickles anything (our dist checkpoints are trusted-source only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODEL_CLASSES = {"pretraining": "Wav2Vec2ForPreTraining", "base": "Wav2Vec2Model"}


def export(checkpoint: str, output: str, use_ema: bool = False, model_class: str = "pretraining") -> Path:
    import torch
    import transformers

    from megatron_speech.checkpoint.model_io import checkpoint_config, load_model_weights
    from megatron_speech.models.wav2vec2 import interop
    from megatron_speech.models.wav2vec2.factory import _single_rank_groups, build_pretraining_model, \
        transformer_config

    cfg = checkpoint_config(checkpoint)
    model = build_pretraining_model(cfg.model, transformer_config(cfg.model), _single_rank_groups())
    load_model_weights(checkpoint, model, use_ema=use_ema)
    hf_state = interop.to_hf(interop.canonical_state_dict(model), cfg.model.num_attention_heads)
    hf_config = interop.config_to_hf(cfg.model)
    hf = transformers.Wav2Vec2ForPreTraining(hf_config)
    hf.load_state_dict(hf_state, strict=True)  # every tensor, both ways
    if model_class == "base":
        hf = hf.wav2vec2
    elif model_class != "pretraining":
        raise ValueError(f"--model-class {model_class!r}: expected one of {sorted(MODEL_CLASSES)} (fine-tuned "
                         "heads export with their own classes once fine-tuning checkpoints are given)")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    hf.to(torch.float32).save_pretrained(out, safe_serialization=True)
    # transformers' extractor normalizes with a fixed eps of 1e-7; we trained with data.normalize_eps. The two
    # differ only for near-silent audio (variance ~1e-5 of full scale).
    transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0,
                                          do_normalize=cfg.data.normalize,
                                          return_attention_mask=True).save_pretrained(out)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    parser.add_argument("--model-class", default="pretraining", choices=sorted(MODEL_CLASSES))
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.output, args.ema, args.model_class)
    except ValueError as e:
        print(f"convert_to_hf: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({MODEL_CLASSES[args.model_class]}{', EMA weights' if args.ema else ''})")
    return 0


if __name__ == "__main__":  # dist_checkpointing may start writer processes that re-import __main__
    sys.exit(main(sys.argv[1:]))
