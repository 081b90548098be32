"""SineLoRA: ΔW = (α/r)·sin(ω·BA)/s (public code samy-ji/Sine-Low-Rank; PEFT PR #2457, closed).

    handle = apply_adapter(model, name="sinelora", r=8, target_modules=["query", "value"], omega=200.0)

Defaults from the PR: ω = 200, s = √d_in. B = 0 at init, so ΔW = sin(0) = 0. Unlike the PR,
dropout is applied on the adapter's input side (docs/SOURCES.md).
"""

from __future__ import annotations

import math

import torch

from baselines.core import register
from baselines.layers import LowRankAdapted, LowRankLinear


class SineLoRALinear(LowRankLinear):
    def __init__(self, base_layer, r, lora_alpha=None, dropout=0.0, omega=200.0, s=None):
        super().__init__(base_layer, r, lora_alpha, dropout)
        self.omega = float(omega)
        self.s = math.sqrt(self.in_features) if s is None else float(s)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * torch.sin(self.omega * (self.lora_B @ self.lora_A)) / self.s


@register("sinelora")
class SineLoRA(LowRankAdapted):
    label = "SineLoRA"

    def make_layer(self, name, linear, r=8, lora_alpha=None, dropout=0.0, omega=200.0, s=None):
        return SineLoRALinear(linear, r, lora_alpha, dropout, omega, s)
