"""The task metric of a fine-tuned checkpoint on test sets, per set and per language; or two such runs compared.

    python -m megatron_speech.evaluate --checkpoint CKPT --manifest M [--manifest M2 ...] [--ema] [--max-tokens N]
                                       [--decoder greedy|beam] [--beam-width N] [--lm FILE] [--lm-weight A]
                                       [--word-score B] [--unk-score C] [--decode-workers N] [--output-dir DIR]
                                       [--output PRED.jsonl] [--metrics-json OUT.json]
    python -m megatron_speech.evaluate --compare RUN_A RUN_B [--resamples 1000] [--confidence 0.95] [--seed 0]
                                       [--metrics-json OUT.json]

Evaluation:
  --checkpoint CKPT  a fine-tuning save_dir (its latest checkpoint), SAVE_DIR/best (train.keep_best) or an
                     iter_NNNNNNN/ folder; its stored config names the task, label key and vocabulary. Runs in
                     one process at TP=1 in fp32 (any training layout loads).
  --manifest M       a test set, repeatable (each is a "set" of the results): preprocessed shards (a
                     PREFIX_{train,valid}.manifest.jsonl of tools/preprocess_audio.py), or a manifest of audio files
                     with labels (a JSONL of {"path": ..., "<label key>": ..., "language": ...} with paths relative
                     to it, a fairseq TSV, or a folder), decoded exactly as preprocessing does (mono, 16 kHz, int16)
                     and normalized as in training. Files that fail to decode and utterances without the label are
                     counted and reported, not silently dropped.
  --ema              evaluate the EMA weights.
  --max-tokens N     padded samples per batch (default: the checkpoint's data.max_tokens).
  --decoder          CTC tasks: greedy (best path, default; what validation during training reports) or beam
                     (prefix beam search by pyctcdecode; megatron_speech/tasks/decoding.py).
  --beam-width N     beam: prefixes kept per frame (default 100, pyctcdecode's).
  --lm FILE          beam, asr only: a KenLM n-gram word LM, ARPA text or KenLM binary (needs the kenlm module:
                     pip install 'megatron-speech[lm]'), trained on text normalized as training normalizes it
                     (lower case; letters, digits, apostrophes). An ARPA file also gives the decoder its unigrams.
  --lm-weight A      beam with LM: weight of the LM log-probability (pyctcdecode's alpha; default 0.5).
  --word-score B     beam with LM: score added per word (pyctcdecode's beta; default 1.5).
  --unk-score C      beam with LM: log score added to a finished word outside the LM's unigrams and, while the
                     search prunes (not scaled by --lm-weight), to a partial word no unigram starts with: the LM
                     is also a lexicon (pyctcdecode's unk_score_offset; default -10).
                     --lm-weight 0 --word-score 0 --unk-score 0 decodes as without --lm.
  --decode-workers N beam: processes decoding each batch's utterances in parallel (default 0: in this process;
                     pyctcdecode is pure Python, so a large test set wants about one per free CPU core).
  --output-dir DIR   writes DIR/hypotheses.jsonl (per utterance) and DIR/metrics.json (the result object).
  --output FILE      the per-utterance JSONL alone; --metrics-json FILE: the result object alone.

Prints one line per metric (PER; WER and CER; accuracy and unweighted accuracy) for all utterances, then per set
(when several) and per language (when the manifests carry a "language" label), and last the result as one JSON
object: the overall metrics at top level, "per_set" and "per_language" breakdowns, the decoder, skipped counts.
Per-utterance rows: id, set (the manifest's file name), language (or null), task, reference, hypothesis (phonemes
joined by spaces, asr's normalized words, or the class), unit_edits and num_units (phonemes; characters of the
normalized text; for a class 1 when wrong, of 1), and for asr word_edits and num_words: any corpus rate is a ratio
of their sums.

Comparison (--compare RUN_A RUN_B; each RUN an --output-dir or a per-utterance file): per group (overall, each set,
each language) and metric, the corpus rates of A and B and the relative error reduction of B over A, (A - B) / A,
with a paired bootstrap percentile interval over utterances (--resamples, --confidence, --seed). Runs over different
utterances or references are refused with an error naming them (megatron_speech/tasks/compare.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

from megatron_speech.tasks import decoding
from megatron_speech.tasks.decoding import DecoderSpec

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")


def evaluate_checkpoint(checkpoint: str, manifests: str | list[str], use_ema: bool = False,
                        output: str | None = None, max_tokens: int | None = None,
                        decoder: DecoderSpec | None = None) -> dict[str, Any]:
    """Metrics of `checkpoint` on `manifests` (see the module docstring), plus what was skipped. output: the
    per-utterance JSONL to write."""
    import torch

    from megatron_speech.checkpoint.model_io import checkpoint_config, load_model_weights
    from megatron_speech.data.finetune_data import eval_batches, min_samples_for, open_manifest, select_labeled
    from megatron_speech.models.wav2vec2.factory import HeadSpec, build_model
    from megatron_speech.parallel.initialize import single_rank_groups
    from megatron_speech.tasks import metrics as task_metrics
    from megatron_speech.tasks.decoding import build_decoder
    from megatron_speech.tasks.task import Task
    from megatron_speech.training.finetune_step import batch_stats, task_loss
    from megatron_speech.training.step import to_device

    manifests = [manifests] if isinstance(manifests, str) else list(manifests)
    decoder = decoder or DecoderSpec()
    cfg = checkpoint_config(checkpoint)
    if cfg.finetune.task == "none":
        raise ValueError(f"{checkpoint} is not a fine-tuned checkpoint (finetune.task is 'none'): fine-tune it first "
                         "with python -m megatron_speech.finetune")
    task = Task.from_config(cfg.finetune)
    if task.kind != "ctc" and decoder.kind != "greedy":
        raise ValueError(f"--decoder {decoder.kind}: task {task.name!r} is a classification (argmax only)")
    decode = build_decoder(task, decoder) if task.kind == "ctc" else None  # fails fast: before the model loads
    head = HeadSpec(task.kind, task.num_outputs, cfg.finetune.layer_weighting, cfg.finetune.final_dropout)
    model = build_model(cfg.model, head=head, pg_collection=single_rank_groups()).eval()
    load_model_weights(checkpoint, model, use_ema=use_ema)
    cfg.data.num_workers = 0  # decoded files live in this process's memory
    common = len(task_metrics.COMMON)

    rows: list[dict[str, Any]] = []
    predictions: list[Any] = []
    per_set: dict[str, Any] = {}
    totals = torch.zeros(common, dtype=torch.float64)
    num_skipped = num_rejected = 0
    budget = cfg.data.max_tokens
    try:
        for manifest in manifests:
            set_name = os.path.basename(manifest.rstrip("/"))
            if set_name in per_set:
                raise ValueError(f"--manifest {manifest}: two test sets named {set_name!r}; give distinct file names")
            source = open_manifest(manifest, min_samples_for(cfg.data, cfg.model))
            split = select_labeled(source, task.label_key, None, manifest)
            languages = {source.id(int(i)): source.labels(int(i)).get("language") for i in split.indices}
            cfg.data.max_tokens = max(max_tokens or budget, int(split.lengths.max()))  # per set: its longest fits
            set_totals = torch.zeros(common, dtype=torch.float64)
            first = len(rows)
            with torch.no_grad():
                for batch in eval_batches(split, task, cfg):
                    batch = to_device(batch)
                    logits = model(batch["waveform"], padding_mask=batch["padding_mask"])
                    loss, infeasible = task_loss(task, logits, batch)
                    set_totals += batch_stats(task, logits, batch, loss, infeasible, 1.0, with_scores=False).cpu()
                    real = (~batch["padding_mask"]).sum(1).tolist()
                    hyps = decode(logits, real) if decode else task_metrics.decode(task, logits, real)
                    for uid, ref, hyp in zip(batch["ids"], batch["references"], hyps, strict=True):
                        predictions.append(hyp)
                        rows.append({"id": uid, "set": set_name, "language": languages.get(uid), "task": task.name,
                                     "reference": ref, "hypothesis": hypothesis_text(task, hyp),
                                     **task_metrics.utterance_scores(task, hyp, ref)})
            skipped = len(source.lengths) - len(split.indices) + getattr(source, "num_skipped", 0)
            rejected = len(getattr(source, "rejects", []))
            per_set[set_name] = {**group_metrics(task, rows[first:], predictions[first:], set_totals.tolist()),
                                 "manifest": manifest, "num_skipped": skipped, "num_rejected_files": rejected}
            totals += set_totals
            num_skipped, num_rejected = num_skipped + skipped, num_rejected + rejected
    finally:
        if hasattr(decode, "close"):
            decode.close()  # beam search's worker processes
    result: dict[str, Any] = {"task": task.name, "label_key": task.label_key, "checkpoint": str(checkpoint),
                              "manifest": manifests[0] if len(manifests) == 1 else manifests,
                              "decoder": decoder.describe() if task.kind == "ctc" else "argmax",
                              **group_metrics(task, rows, predictions, totals.tolist()),
                              "num_skipped": num_skipped, "num_rejected_files": num_rejected}
    if len(manifests) > 1:
        result["per_set"] = per_set
    langs = sorted({r["language"] for r in rows if r["language"]})
    if langs:
        result["per_language"] = {}
        for lang in langs:
            picked = [k for k, row in enumerate(rows) if row["language"] == lang]
            result["per_language"][lang] = group_metrics(task, [rows[k] for k in picked],
                                                         [predictions[k] for k in picked])
    if output:
        with open(output, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return result


def hypothesis_text(task, prediction) -> str:
    """As a per-utterance row shows a prediction: asr's words, phonemes joined by spaces (transformers' decode of
    either), or the class."""
    if task.kind != "ctc":
        return prediction
    return " ".join(task.words(prediction) if task.name == "asr" else prediction)


def group_metrics(task, rows, predictions, common: list[float] | None = None) -> dict[str, Any]:
    """Metrics of some utterances from their predictions; with `common` (summed COMMON stats) also the loss, else
    without it (the loss is summed per batch, not per utterance)."""
    from megatron_speech.tasks import metrics as task_metrics

    stats = dict(zip(task_metrics.COMMON, common or [0.0] * len(task_metrics.COMMON), strict=True))
    stats["num_utterances"] = float(len(rows))
    stats.update(task_metrics.score(task, list(predictions), [r["reference"] for r in rows]))
    out = task_metrics.metrics(task, stats)
    if common is None:
        out.pop("loss")
    return out


def _print_metrics(title: str, result: dict[str, Any]) -> None:
    print(title)
    for key in ("per", "wer", "cer", "accuracy", "unweighted_accuracy", "loss"):
        if key in result:
            print(f"  {key:<20} {result[key]:.4f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="iter_NNNNNNN/ folder, a save_dir (its latest) or SAVE_DIR/best")
    parser.add_argument("--manifest", action="append", help="a test set (repeatable)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--max-tokens", type=int, help="padded samples per batch (default: the checkpoint's)")
    parser.add_argument("--decoder", choices=("greedy", "beam"), default="greedy", help="CTC decoding")
    parser.add_argument("--beam-width", type=int, default=decoding.DEFAULT_BEAM_WIDTH, help="beam: prefixes per frame")
    parser.add_argument("--lm", help="beam (asr): KenLM n-gram word LM, ARPA or binary")
    parser.add_argument("--lm-weight", type=float, default=decoding.DEFAULT_LM_WEIGHT, help="beam: LM weight (alpha)")
    parser.add_argument("--word-score", type=float, default=decoding.DEFAULT_WORD_SCORE, help="per-word score (beta)")
    parser.add_argument("--unk-score", type=float, default=decoding.DEFAULT_UNK_SCORE, help="OOV word score")
    parser.add_argument("--decode-workers", type=int, default=0, help="beam: decoding processes")
    parser.add_argument("--output-dir", help="write hypotheses.jsonl and metrics.json here")
    parser.add_argument("--output", help="per-utterance hypotheses and error counts (JSON lines)")
    parser.add_argument("--metrics-json", help="also write the result object to this file")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two evaluate runs")
    parser.add_argument("--resamples", type=int, default=1000, help="--compare: bootstrap resamples")
    parser.add_argument("--confidence", type=float, default=0.95, help="--compare: interval coverage")
    parser.add_argument("--seed", type=int, default=0, help="--compare: bootstrap seed")
    args = parser.parse_args(argv)
    if args.compare:
        if args.checkpoint or args.manifest:
            parser.error("--compare takes two finished runs, not --checkpoint / --manifest")
    elif not (args.checkpoint and args.manifest):
        parser.error("give --checkpoint and --manifest (or --compare RUN_A RUN_B)")
    if args.lm and args.decoder != "beam":
        parser.error("--lm needs --decoder beam")
    if not 0 < args.confidence < 1 or args.resamples < 1:
        parser.error("--confidence must lie in (0, 1) and --resamples be at least 1")
    try:
        result = run_compare(args) if args.compare else run_evaluate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False))
    if args.metrics_json:
        with open(args.metrics_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
    return 0


def run_compare(args) -> dict[str, Any]:
    from megatron_speech.tasks.compare import compare_runs, format_comparison, read_run

    result = compare_runs(read_run(args.compare[0]), read_run(args.compare[1]), args.resamples, args.seed,
                          args.confidence)
    result["a"], result["b"] = args.compare
    print(f"A = {args.compare[0]}\nB = {args.compare[1]}")
    print("\n".join(format_comparison(result)))
    return result


def run_evaluate(args) -> dict[str, Any]:
    from megatron_speech.tasks.compare import HYPOTHESES
    from megatron_speech.training.monitor import setup_logging

    setup_logging(0)  # our INFO lines (what was skipped) only; megatron's CPU chatter off
    for pattern in (".*load_state_dict.*is deprecated.*", ".*ShardedTensor.*"):
        warnings.filterwarnings("ignore", message=pattern)
    spec = DecoderSpec(args.decoder, args.beam_width, args.lm, args.lm_weight, args.word_score, args.unk_score,
                       args.decode_workers)
    output = args.output
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        if output:
            raise ValueError("give --output-dir or --output, not both (the directory holds hypotheses.jsonl)")
        output = os.path.join(args.output_dir, HYPOTHESES)
    result = evaluate_checkpoint(args.checkpoint, args.manifest, args.ema, output, args.max_tokens, spec)
    skipped = result["num_skipped"] + result["num_rejected_files"]
    _print_metrics(f"{result['task']} ({result['label_key']}) on {', '.join(args.manifest)}, {result['decoder']}: "
                   f"{int(result['num_utterances'])} utterances"
                   + (f", {skipped} skipped (no label, too short, or undecodable)" if skipped else ""), result)
    for group, key in (("set", "per_set"), ("language", "per_language")):
        for name, sub in result.get(key, {}).items():
            _print_metrics(f"{group} {name}: {int(sub['num_utterances'])} utterances", sub)
    if args.output_dir:
        with open(os.path.join(args.output_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
    return result


if __name__ == "__main__":  # dist_checkpointing may start processes that re-import __main__
    sys.exit(main(sys.argv[1:]))
