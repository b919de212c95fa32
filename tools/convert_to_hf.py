"""Our checkpoint (any TP/DP layout) -> a Hugging Face transformers directory.

    python tools/convert_to_hf.py --checkpoint CKPT --output DIR [--ema]
                                  [--model-class pretraining|base|ctc|classification]

Writes config.json (model.layerdrop as `layerdrop`, which transformers applies when training the export),
model.safetensors and preprocessor_config.json (Wav2Vec2FeatureExtractor: 16 kHz, per-utterance normalization).
CKPT is an iter_NNNNNNN/ directory, a save_dir (its latest checkpoint) or SAVE_DIR/best.
The export is safetensors: loading it never unpickles anything (our dist checkpoints are trusted-source only).

Model classes:
  pretraining     Wav2Vec2ForPreTraining (encoder, quantizer, projections)
  base            Wav2Vec2Model (the encoder; also from a fine-tuned checkpoint)
  ctc             a phoneme / asr fine-tuned checkpoint -> Wav2Vec2ForCTC, its `lm_head` = our CTC head, output 0 =
                  the CTC blank = the tokenizer's "<pad>"; plus the tokenizer (vocab.json: Wav2Vec2CTCTokenizer
                  for asr, "|" between words; Wav2Vec2PhonemeCTCTokenizer without phonemizer for phonemes) and
                  the processor, so `Wav2Vec2Processor.from_pretrained(DIR)` decodes its greedy output.
  classification  a speaker / emotion fine-tuned checkpoint -> Wav2Vec2ForSequenceClassification. transformers'
                  head is projector (hidden -> classifier_proj_size) -> mean over real frames -> classifier; ours
                  is mean -> one linear, exported exactly as projector = identity (classifier_proj_size = hidden
                  size; x @ I is exact) and classifier = our linear. finetune.layer_weighting maps to
                  use_weighted_layer_sum: our weights are its `layer_weights` over the same L + 1 hidden states
                  (transformers >= 5: h_0 and each layer's output, the last before the final LayerNorm; 4.x
                  put the final LayerNorm's output last, so there the last state differs: the tool warns).
A head transformers cannot express, a CTC head over a weighted sum of layers, is written as the encoder
(Wav2Vec2Model) plus DIR/head.safetensors (tensors `layer_weights` [L + 1] and `lm_head.weight` [V, H],
`lm_head.bias` [V]; its metadata holds the formula: logits = lm_head(sum_i softmax(layer_weights)_i *
hidden_states[i]), hidden_states = Wav2Vec2Model(..., output_hidden_states=True).hidden_states) and the
tokenizer; the tool prints a notice saying so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODEL_CLASSES = {"pretraining": "Wav2Vec2ForPreTraining", "base": "Wav2Vec2Model", "ctc": "Wav2Vec2ForCTC",
                 "classification": "Wav2Vec2ForSequenceClassification"}
HEAD_FILE = "head.safetensors"
BLANK_TOKEN = "<pad>"  # transformers' CTC blank is its pad token


def export(checkpoint: str, output: str, use_ema: bool = False, model_class: str = "pretraining") -> Path:
    """Write the export; returns the output directory. A ValueError for a class the checkpoint cannot give."""
    return export_with_notes(checkpoint, output, use_ema, model_class)[0]


def export_with_notes(checkpoint: str, output: str, use_ema: bool = False,
                      model_class: str = "pretraining") -> tuple[Path, list[str]]:
    """export(), plus notices for the user (e.g. a head written outside the transformers model)."""
    import torch
    import transformers

    from megatron_speech.checkpoint.model_io import checkpoint_config, load_model_weights
    from megatron_speech.models.wav2vec2 import interop
    from megatron_speech.models.wav2vec2.factory import HeadSpec, build_model
    from megatron_speech.parallel.initialize import single_rank_groups

    if model_class not in MODEL_CLASSES:
        raise ValueError(f"--model-class {model_class!r}: expected one of {sorted(MODEL_CLASSES)}")
    cfg = checkpoint_config(checkpoint)
    ft = cfg.finetune
    finetuned = ft.task != "none"
    if model_class in ("ctc", "classification") and not finetuned:
        raise ValueError(f"--model-class {model_class}: {checkpoint} is a pre-training checkpoint without a task "
                         "head; fine-tune it (python -m megatron_speech.finetune) or export 'pretraining' / 'base'")
    task = None
    if finetuned:
        from megatron_speech.tasks.task import Task

        task = Task.from_config(ft)
        expected = "ctc" if task.kind == "ctc" else "classification"
        if model_class in ("ctc", "classification") and model_class != expected:
            raise ValueError(f"--model-class {model_class}: {checkpoint} was fine-tuned for {task.describe}, a "
                             f"{task.kind} head: use --model-class "
                             f"{'ctc' if task.kind == 'ctc' else 'classification'}")
    head = HeadSpec(task.kind, task.num_outputs, ft.layer_weighting, ft.final_dropout) if task else None
    model = build_model(cfg.model, head=head, pg_collection=single_rank_groups())
    wav2vec2 = model.wav2vec2 if task else model
    load_model_weights(checkpoint, model, use_ema=use_ema)
    hf_state = interop.to_hf(interop.canonical_state_dict(wav2vec2), cfg.model.num_attention_heads)
    head_config = {}
    if model_class in ("ctc", "classification"):  # the fine-tuning SpecAugment, for training in transformers
        head_config = dict(mask_time_prob=ft.mask_prob, mask_time_length=ft.mask_length, mask_time_min_masks=2,
                           mask_feature_prob=ft.mask_channel_prob, mask_feature_length=ft.mask_channel_length)
    if model_class == "ctc":
        head_config.update(vocab_size=task.num_outputs, pad_token_id=0, final_dropout=ft.final_dropout,
                           ctc_zero_infinity=True, ctc_loss_reduction="sum")
    elif model_class == "classification":
        head_config.update(num_labels=task.num_outputs, id2label=dict(enumerate(task.labels)),
                           label2id={c: i for i, c in enumerate(task.labels)},
                           classifier_proj_size=cfg.model.hidden_size, use_weighted_layer_sum=ft.layer_weighting)
    hf_config = interop.config_to_hf(cfg.model, **head_config)
    pre = transformers.Wav2Vec2ForPreTraining(interop.config_to_hf(cfg.model))
    pre.load_state_dict(hf_state, strict=True)  # every tensor, both ways
    encoder_state = pre.wav2vec2.state_dict()
    notes: list[str] = []
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)

    if model_class == "pretraining":
        hf = pre
    elif model_class == "base":
        hf = pre.wav2vec2
    elif model_class == "ctc" and model.layer_sum is not None:
        hf = _encoder_only(hf_config, encoder_state)
        _write_ctc_head_file(out / HEAD_FILE, model, task)
        notes.append(f"transformers has no CTC head over a weighted sum of layers (finetune.layer_weighting): wrote "
                     f"the encoder as Wav2Vec2Model and the head to {out / HEAD_FILE} (see its metadata)")
    elif model_class == "ctc":
        hf = transformers.Wav2Vec2ForCTC(hf_config)
        _load_encoder(hf.wav2vec2, encoder_state)
        with torch.no_grad():
            hf.lm_head.weight.copy_(model.head.proj.weight)
            hf.lm_head.bias.copy_(model.head.proj.bias)
    else:
        hidden = cfg.model.hidden_size
        hf = transformers.Wav2Vec2ForSequenceClassification(hf_config)
        _load_encoder(hf.wav2vec2, encoder_state)
        with torch.no_grad():
            hf.projector.weight.copy_(torch.eye(hidden))
            hf.projector.bias.zero_()
            hf.classifier.weight.copy_(model.head.proj.weight)
            hf.classifier.bias.copy_(model.head.proj.bias)
            if model.layer_sum is not None:
                hf.layer_weights.copy_(model.layer_sum.weight)
    if ft.layer_weighting and model_class in ("ctc", "classification") and \
            int(transformers.__version__.split(".")[0]) < 5:
        notes.append(f"transformers {transformers.__version__} ends hidden_states with the final LayerNorm's output; "
                     "ours (and transformers >= 5) with the last layer's raw output: the weighted sum differs there")
    if finetuned:
        hf.config.update({"megatron_speech_task": task.name, "megatron_speech_label_key": task.label_key})
    hf.to(torch.float32).save_pretrained(out, safe_serialization=True)
    # transformers' extractor normalizes with a fixed eps of 1e-7; we trained with data.normalize_eps. The two
    # differ only for near-silent audio (variance ~1e-5 of full scale).
    extractor = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0,
                                                      do_normalize=cfg.data.normalize, return_attention_mask=True)
    extractor.save_pretrained(out)
    if model_class == "ctc":
        tokenizer = _ctc_tokenizer(task, out)
        transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    return out, notes


def _load_encoder(hf_encoder, state) -> None:
    # transformers' Wav2Vec2Model has masked_spec_embed only when its config masks (mask_time_prob or
    # mask_feature_prob > 0): a fine-tuned export without SpecAugment has none to receive.
    if "masked_spec_embed" not in hf_encoder.state_dict():
        state = {k: v for k, v in state.items() if k != "masked_spec_embed"}
    hf_encoder.load_state_dict(state, strict=True)


def _encoder_only(hf_config, state):
    import transformers

    hf = transformers.Wav2Vec2Model(hf_config)
    _load_encoder(hf, state)
    return hf


def _write_ctc_head_file(path: Path, model, task) -> None:
    from safetensors.torch import save_file

    tensors = {"layer_weights": model.layer_sum.weight.detach().float().contiguous(),
               "lm_head.weight": model.head.proj.weight.detach().float().contiguous(),
               "lm_head.bias": model.head.proj.bias.detach().float().contiguous()}
    metadata = {
        "format": "megatron-speech CTC head over a weighted sum of layers",
        "formula": "logits = hidden @ lm_head.weight.T + lm_head.bias, hidden = sum_i softmax(layer_weights)_i * "
                   "hidden_states[i], hidden_states = Wav2Vec2Model(input_values, attention_mask, "
                   "output_hidden_states=True).hidden_states (num_hidden_layers + 1 tensors)",
        "blank": "output 0 is the CTC blank (the tokenizer's <pad>)",
        "task": task.name, "label_key": task.label_key,
    }
    save_file(tensors, str(path), metadata=metadata)


def _ctc_tokenizer(task, out: Path):
    import transformers

    vocab = {BLANK_TOKEN: 0, **{token: i + 1 for i, token in enumerate(task.labels)}}
    vocab_file = out / "vocab.json"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
    if task.name == "phoneme":  # space-separated phonemes in and out; no phonemizer backend needed for that
        return transformers.Wav2Vec2PhonemeCTCTokenizer(str(vocab_file), do_phonemize=False, phone_delimiter_token=" ",
                                                        word_delimiter_token=None, unk_token="<unk>",
                                                        pad_token=BLANK_TOKEN)
    return transformers.Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="<unk>", pad_token=BLANK_TOKEN,
                                             word_delimiter_token="|", bos_token=None, eos_token=None)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="iter_NNNNNNN/ folder, a save_dir (its latest) or SAVE_DIR/best")
    parser.add_argument("--output", required=True)
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    parser.add_argument("--model-class", default="pretraining", choices=sorted(MODEL_CLASSES))
    args = parser.parse_args(argv)
    try:
        out, notes = export_with_notes(args.checkpoint, args.output, args.ema, args.model_class)
    except ValueError as e:
        print(f"convert_to_hf: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"convert_to_hf: NOTE: {note}")
    what = MODEL_CLASSES[args.model_class]
    if (out / HEAD_FILE).exists() and args.model_class == "ctc":
        what = f"Wav2Vec2Model + {HEAD_FILE}"
    print(f"wrote {out} ({what}{', EMA weights' if args.ema else ''})")
    return 0


if __name__ == "__main__":  # dist_checkpointing may start writer processes that re-import __main__
    sys.exit(main(sys.argv[1:]))
