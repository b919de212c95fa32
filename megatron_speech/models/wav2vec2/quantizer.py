"""Gumbel product quantizer (fairseq's GumbelVectorQuantizer, combine_groups=False)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    codevectors: torch.Tensor
    """[N, codevector_dim] the selected codevectors (straight-through in training)."""
    codes: torch.Tensor
    """[N, G] the selected entry of each group (int64), used to spot distractors equal to their positive."""
    prob_sum: torch.Tensor
    """[G, V] sum over the N inputs of the soft code probabilities (fp32): the diversity-loss statistic."""
    hard_count: torch.Tensor
    """[G, V] how often each entry was selected (fp32): the code-perplexity metric."""


class GumbelVectorQuantizer(nn.Module):
    """Features [N, input_dim] -> one of V codevectors per group G, concatenated to [N, codevector_dim].

    Returns sums, not means, so that statistics can be summed over TP ranks and micro-batches before the
    perplexity is taken (docs/design.md §3).
    """

    def __init__(self, input_dim: int, num_groups: int, num_vars: int, codevector_dim: int):
        super().__init__()
        if codevector_dim % num_groups:
            raise ValueError(f"codevector_dim={codevector_dim} must be divisible by num_groups={num_groups}")
        self.num_groups, self.num_vars = num_groups, num_vars
        # [1, G*V, D/G]: transformers' layout, so the HF key map needs no reshape.
        self.codevectors = nn.Parameter(torch.empty(1, num_groups * num_vars, codevector_dim // num_groups))
        self.weight_proj = nn.Linear(input_dim, num_groups * num_vars)
        nn.init.uniform_(self.codevectors)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.temperature = 2.0
        """Set by the trainer every step: max(max_t * decay^step, min_t) (fairseq's schedule)."""
        self.gumbel_noise = True
        """False makes training deterministic (hard argmax, straight-through): used by parallel-equality tests."""

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        n = x.shape[0]
        logits = self.weight_proj(x).float().view(n, self.num_groups, self.num_vars)  # [N, G, V]
        codes = logits.argmax(dim=-1)  # [N, G]
        hard = F.one_hot(codes, self.num_vars).to(logits.dtype)
        soft = torch.softmax(logits, dim=-1)
        if self.training:
            if self.gumbel_noise:
                # The noise is drawn on this rank's local frames: callers run it under the TP RNG tracker.
                probs = F.gumbel_softmax(logits, tau=self.temperature, hard=True, dim=-1)
                codes = probs.argmax(dim=-1)
                hard = probs.detach()
            else:
                probs = hard - soft.detach() + soft  # straight-through without noise
        else:
            probs = hard
        # [N, G, V] x [G, V, D/G] -> [N, G, D/G]
        book = self.codevectors.view(self.num_groups, self.num_vars, -1)
        codevectors = torch.einsum("ngv,gvd->ngd", probs.to(book.dtype), book).reshape(n, book.shape[0] * book.shape[2])
        return QuantizerOutput(codevectors=codevectors, codes=codes, prob_sum=soft.sum(0), hard_count=hard.sum(0))


def perplexity(prob_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Sum over groups of exp(entropy) of the mean distribution prob_sum / count ([G, V] -> scalar)."""
    p = prob_sum / count.clamp(min=1)
    # p * log(p) with the log clamped: xlogy's gradient is NaN at p == 0 (an unused code, or no masked frames)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-30))).sum(-1)).sum()
