"""The task metric of a fine-tuned checkpoint on a test set.

    python -m megatron_speech.evaluate --checkpoint CKPT --manifest M [--ema] [--output PRED.jsonl]
                                       [--metrics-json OUT.json] [--max-tokens N]

CKPT: a fine-tuning save_dir (its latest checkpoint), SAVE_DIR/best (train.keep_best) or an iter_NNNNNNN/ folder;
its stored config names the task, label key and vocabulary. M: preprocessed shards (a
PREFIX_{train,valid}.manifest.jsonl of tools/preprocess_audio.py), or a manifest of audio files with labels (a
JSONL of {"path": ..., "<label key>": ...} with paths relative to it, a fairseq TSV, or a folder), decoded exactly
as preprocessing does (mono, 16 kHz, int16) and normalized as in training. Files that fail to decode and
utterances without the label are counted and reported, not silently dropped. Runs in one process at TP=1 in
fp32 (any training layout loads).

Prints one line per metric (PER; WER and CER; accuracy and unweighted accuracy) and, last, the same as one JSON
object. --output writes one JSON line per utterance: id, reference, hypothesis.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")


def evaluate_checkpoint(checkpoint: str, manifest: str, use_ema: bool = False, output: str | None = None,
                        max_tokens: int | None = None) -> dict[str, Any]:
    """Metrics of `checkpoint` on `manifest` (see the module docstring), plus what was skipped."""
    import torch

    from megatron_speech.checkpoint.model_io import checkpoint_config, load_model_weights
    from megatron_speech.data.finetune_data import eval_batches, min_samples_for, open_manifest, select_labeled
    from megatron_speech.models.wav2vec2.factory import HeadSpec, build_model
    from megatron_speech.parallel.initialize import single_rank_groups
    from megatron_speech.tasks import metrics as task_metrics
    from megatron_speech.tasks.task import Task
    from megatron_speech.training.finetune_step import batch_stats, task_loss
    from megatron_speech.training.step import to_device

    cfg = checkpoint_config(checkpoint)
    if cfg.finetune.task == "none":
        raise ValueError(f"{checkpoint} is not a fine-tuned checkpoint (finetune.task is 'none'): fine-tune it first "
                         "with python -m megatron_speech.finetune")
    task = Task.from_config(cfg.finetune)
    head = HeadSpec(task.kind, task.num_outputs, cfg.finetune.layer_weighting, cfg.finetune.final_dropout)
    model = build_model(cfg.model, head=head, pg_collection=single_rank_groups()).eval()
    load_model_weights(checkpoint, model, use_ema=use_ema)

    source = open_manifest(manifest, min_samples_for(cfg.data, cfg.model))
    split = select_labeled(source, task.label_key, None, manifest)
    longest = int(split.lengths.max())
    cfg.data.max_tokens = max(max_tokens or cfg.data.max_tokens, longest)
    cfg.data.num_workers = 0  # decoded files live in this process's memory
    names = task_metrics.stat_names(task)
    totals = torch.zeros(len(names), dtype=torch.float64)
    rows = []
    with torch.no_grad():
        for batch in eval_batches(split, task, cfg):
            batch = to_device(batch)
            logits = model(batch["waveform"], padding_mask=batch["padding_mask"])
            loss, infeasible = task_loss(task, logits, batch)
            totals += batch_stats(task, logits, batch, loss, infeasible, 1.0, with_scores=True).cpu()
            if output:
                real = (~batch["padding_mask"]).sum(1).tolist()
                for uid, ref, hyp in zip(batch["ids"], batch["references"],
                                         task_metrics.decode(task, logits, real), strict=True):
                    rows.append({"id": uid, "reference": ref, "hypothesis": " ".join(hyp) if task.kind == "ctc"
                                 else hyp})
    result: dict[str, Any] = {"task": task.name, "label_key": task.label_key, "checkpoint": str(checkpoint),
                              "manifest": manifest,
                              **task_metrics.metrics(task, dict(zip(names, totals.tolist(), strict=True)))}
    result["num_skipped"] = len(source.lengths) - len(split.indices) + getattr(source, "num_skipped", 0)
    result["num_rejected_files"] = len(getattr(source, "rejects", []))
    if output:
        with open(output, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="iter_NNNNNNN/ folder, a save_dir (its latest) or SAVE_DIR/best")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--output", help="per-utterance hypotheses (JSON lines)")
    parser.add_argument("--metrics-json", help="also write the result object to this file")
    parser.add_argument("--max-tokens", type=int, help="padded samples per batch (default: the checkpoint's)")
    args = parser.parse_args(argv)
    from megatron_speech.training.monitor import setup_logging

    setup_logging(0)  # our INFO lines (what was skipped) only; megatron's CPU chatter off
    for pattern in (".*load_state_dict.*is deprecated.*", ".*ShardedTensor.*"):
        warnings.filterwarnings("ignore", message=pattern)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.manifest, args.ema, args.output, args.max_tokens)
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    what = f"{result['task']} ({result['label_key']})"
    skipped = result["num_skipped"] + result["num_rejected_files"]
    print(f"{what} on {args.manifest}: {int(result['num_utterances'])} utterances"
          + (f", {skipped} skipped (no label, too short, or undecodable)" if skipped else ""))
    for key in ("per", "wer", "cer", "accuracy", "unweighted_accuracy", "loss"):
        if key in result:
            print(f"  {key:<20} {result[key]:.4f}")
    print(json.dumps(result))
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":  # dist_checkpointing may start processes that re-import __main__
    sys.exit(main(sys.argv[1:]))
