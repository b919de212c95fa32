"""One fine-tuning step, the analogue of step.py: micro-batches through megatron-core's
forward_backward_no_pipelining with per-token loss normalization, where the "tokens" are utterances.

Loss normalization: the loss is summed over the micro-batch's utterances (CTC: each utterance's negative
log-likelihood over its whole label sequence, fairseq's `sentence_avg`; classification: the cross-entropy of each
utterance) and divided by the global utterance count of the step (one all-reduce before it, step.agree), so
the update is the mean per utterance over the global batch whatever the DP layout and the micro-batch sizes, and
backward magnitudes are a mean's (fp16's loss scale: step.py). On a TP group every rank runs the head on the same
gathered sequence (models/wav2vec2/heads.py) and reports 1/tp of the loss: the gradients then add up to one copy
(encoder through the gather's reduce-scatter, head through the TP sum of partial gradients), and summing reported
numbers over all ranks gives global totals.
CTC alignments that cannot exist (more tokens + repeats than frames) contribute 0 (zero_infinity) and are counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.utils import get_attr_wrapped_model

from megatron_speech.parallel.initialize import compute_device
from megatron_speech.tasks import metrics as task_metrics
from megatron_speech.tasks.task import Task
from megatron_speech.training import step as pretrain_step
from megatron_speech.training.step import to_device


def task_loss(task: Task, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss summed over the batch's utterances, number of infeasible CTC alignments), in fp32."""
    if task.kind == "ctc":
        real_frames = (~batch["padding_mask"]).sum(dim=1)
        log_probs = logits.float().log_softmax(dim=-1).transpose(0, 1)  # [B, F, V] -> [F, B, V]
        per_utterance = F.ctc_loss(log_probs, batch["targets"], real_frames, batch["target_lengths"], blank=0,
                                   reduction="none", zero_infinity=True)
        infeasible = (batch["target_min_frames"] > real_frames).sum().to(torch.float64)
        return per_utterance.sum(), infeasible
    loss = F.cross_entropy(logits.float(), batch["targets"], ignore_index=-1, reduction="sum")
    return loss, torch.zeros((), dtype=torch.float64, device=logits.device)


def batch_stats(task: Task, logits: torch.Tensor, batch: dict[str, Any], loss_sum: torch.Tensor,
                infeasible: torch.Tensor, share: float, with_scores: bool) -> torch.Tensor:
    """float64 [len(COMMON)] (or [len(stat_names(task))] with scores): this rank's `share` of the batch's sums."""
    real_frames = (~batch["padding_mask"]).sum(dim=1)
    values = [loss_sum.detach().double(), float(real_frames.numel()), float(real_frames.sum()),
              float(batch["num_samples"]), infeasible]
    if with_scores:
        predictions = task_metrics.decode(task, logits, real_frames.tolist())
        scores = task_metrics.score(task, predictions, batch["references"])
        values += [scores[name] for name in task_metrics.stat_names(task)[len(task_metrics.COMMON):]]
    # on the logits' device: the stats are all-reduced, and NCCL takes GPU tensors only
    stats = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=logits.device) for v in values])
    stats[1:] *= share  # the loss is already this rank's share
    return stats


def loss_func(task: Task, share: float, with_scores: bool, normalizer: float, batch: dict[str, Any],
              logits: torch.Tensor):
    """megatron's 3-tuple: (this rank's share of the loss sum / the step's global utterance count, utterances of the
    micro-batch, stats to sum)."""
    loss_sum, infeasible = task_loss(task, logits, batch)
    loss = loss_sum * share
    count = torch.tensor(batch["padding_mask"].shape[0], dtype=torch.int, device=logits.device)  # same on all TP ranks
    return loss / normalizer, count, {"stats": batch_stats(task, logits, batch, loss, infeasible, share, with_scores)}


def forward_step(task: Task, with_scores: bool, batch_iterator, model, normalizer: float = 1.0):
    """Waveform positionally (Float16Module casts positional inputs only), masks and LayerDrop's skips by keyword."""
    batch = to_device(next(batch_iterator))
    share = 1.0 / get_attr_wrapped_model(model, "tp_group").size()
    logits = model(batch["waveform"], padding_mask=batch["padding_mask"], mask=batch.get("mask"),
                   channel_mask=batch.get("channel_mask"), skip_layers=batch.get("skip_layers", ()))
    return logits, partial(loss_func, task, share, with_scores, normalizer, batch)


def run_micro_batches(model, task: Task, batches: list[dict[str, Any]], forward_only: bool = False,
                      with_scores: bool = False, normalizer: float = 1.0) -> torch.Tensor:
    """Forward (and backward) over micro-batches, each loss divided by `normalizer` (the step's global utterance
    count); this rank's summed stats."""
    return pretrain_step.run_micro_batches(model, batches, forward_only, partial(forward_step, task, with_scores),
                                           normalizer)


def global_sums(task: Task, stats: torch.Tensor, with_scores: bool) -> dict[str, float]:
    """All-reduce a stats vector over every rank (a collective: every rank calls it); named sums."""
    stats = stats.clone()
    if dist.is_initialized():
        dist.all_reduce(stats)
    names = task_metrics.stat_names(task) if with_scores else list(task_metrics.COMMON)
    return dict(zip(names, stats.tolist(), strict=True))


def train_step(model, optimizer, task: Task, batches: list[dict[str, Any]], stop: bool = False) -> dict[str, Any]:
    """Forward/backward over this DP rank's micro-batches, then one optimizer step unless the global loss or a
    gradient is not finite (skipped on every rank alike, as pre-training's step.train_step). `stop` as there.
    Returns loss, counts, whether it updated, the grad norm, `nonfinite` (None, "loss" or "gradient") and `stop`."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    (utterances,), stop = pretrain_step.agree([float(sum(b["padding_mask"].shape[0] for b in batches))], stop)
    sums = global_sums(task, run_micro_batches(model, task, batches, normalizer=max(utterances, 1.0)),
                       with_scores=False)
    loss = sums["loss_sum"] / max(sums["num_utterances"], 1.0)
    return {"loss": loss, **pretrain_step.apply_update(model, optimizer, loss),
            "num_samples": sums["num_samples"], "num_utterances": sums["num_utterances"],
            "num_infeasible": sums["num_infeasible"], "stop": stop}


def evaluate(model, task: Task, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Task metrics over evaluation batches (this rank's share; a collective), model in eval mode meanwhile."""
    batches = list(batches)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if batches:
            stats = run_micro_batches(model, task, batches, forward_only=True, with_scores=True)
        else:
            stats = torch.zeros(len(task_metrics.stat_names(task)), dtype=torch.float64, device=compute_device())
    model.train(was_training)
    return task_metrics.metrics(task, global_sums(task, stats, with_scores=True))
