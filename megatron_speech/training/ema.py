"""Exponential moving average of the weights. megatron-core has none: written here, kept in fp32 next to the
(TP-local) parameters it tracks, saved and resharded like the model's own tensors."""

from __future__ import annotations

import torch


class EMA:
    """ema = decay * ema + (1 - decay) * param, after every optimizer step (decay 0 = off)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in [0, 1) (0 turns EMA off)")
        self.decay = decay
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params] if decay > 0 else []

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    @torch.no_grad()
    def update(self) -> None:
        if self.enabled:
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    def by_param(self) -> dict[int, torch.Tensor]:
        """id(parameter) -> its average, to build checkpoint entries that mirror the model's."""
        return {id(p): s for p, s in zip(self.params, self.shadow)}

    @torch.no_grad()
    def copy_to(self, model_params: list[torch.nn.Parameter] | None = None) -> list[torch.Tensor]:
        """Swap the averages into the parameters; returns the previous values for `restore`."""
        backup = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))
        return backup

    @torch.no_grad()
    def restore(self, backup: list[torch.Tensor]) -> None:
        for p, b in zip(self.params, backup):
            p.copy_(b)
