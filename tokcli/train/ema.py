"""Exponential moving average of a model's trainable parameters (like LitEma with a fixed decay).

shadow <- shadow + (1 - decay) * (param - shadow) after every optimizer step. Frozen parameters (e.g. the stage-2
encoder) and buffers have no shadow: ``averaged_state_dict`` takes them from the live model.

With ``warmup`` the decay after update number t (counted from 0) is min(decay, (1 + t) / (10 + t)), LitEma's
``use_num_upates`` rule: without it the shadow still holds decay^t of the random initialisation after t steps
(22 % after 1,500 steps at 0.999), which ruins short runs.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0) -> None:
        """Fold in the current parameters; ``step`` = number of earlier updates (for the warm-up)."""
        d = self.decay_at(step)
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - d)

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state_dict with every shadowed parameter replaced by its average (for export)."""
        sd = model.state_dict()
        return {k: (self.shadow[k] if k in self.shadow else v).detach().clone() for k, v in sd.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise ValueError(f"EMA state does not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
        for k, v in state.items():
            self.shadow[k].copy_(v)
