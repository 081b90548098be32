"""DyLoRA: LoRA trained under a random truncation of its rank (huawei-noah/Efficient-NLP, DyLoRA/loralib).

    handle = apply_adapter(model, name="dylora", r=8, target_modules=["query", "value"], eval_rank=None)

Each optimizer step (`on_step`) draws one rank b ∈ {1..r} for every layer; training uses the
first b rows of A / columns of B, scaled by (α/r)·√(r/b) (docs/SOURCES.md), so any prefix is a
usable adapter afterwards. Evaluation, merging and ΔW use `eval_rank` (default r).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from baselines.core import register
from baselines.layers import LowRankAdapted, LowRankLinear


class DyLoRALinear(LowRankLinear):
    def __init__(self, base_layer, r, lora_alpha=None, dropout=0.0, eval_rank=None):
        super().__init__(base_layer, r, lora_alpha, dropout)
        self.train_rank = r
        self.eval_rank = r if eval_rank is None else int(eval_rank)

    def active_rank(self) -> int:
        return self.train_rank if self.training else self.eval_rank

    def _factors(self):
        b = self.active_rank()
        return self.lora_A[:b], self.lora_B[:, :b], self.scaling * math.sqrt(self.r / b)

    def delta_weight(self) -> torch.Tensor:
        a, b, s = self._factors()
        return s * (b @ a)

    def adapter_forward(self, x):
        a, b, s = self._factors()
        return s * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    @torch.no_grad()
    def merge(self):  # merging uses the evaluation rank whatever the mode
        was, self.training = self.training, False
        try:
            super().merge()
        finally:
            self.training = was

    @torch.no_grad()
    def unmerge(self):
        was, self.training = self.training, False
        try:
            super().unmerge()
        finally:
            self.training = was


@register("dylora")
class DyLoRA(LowRankAdapted):
    label = "DyLoRA"

    def _apply(self, model, seed=0, **kwargs):
        self._gen = torch.Generator().manual_seed(int(seed))
        self.model = super()._apply(model, **kwargs)
        self._sample()
        return self.model

    def make_layer(self, name, linear, r=8, lora_alpha=None, dropout=0.0, eval_rank=None):
        return DyLoRALinear(linear, r, lora_alpha, dropout, eval_rank)

    def _sample(self):
        layers = list(self.layers().values())
        b = int(torch.randint(1, layers[0].r + 1, (1,), generator=self._gen))
        for m in layers:
            m.train_rank = b

    def on_step(self, step, total_steps):
        self._sample()  # the rank for the next step

    def training_state(self):
        return {"generator": self._gen.get_state(), "train_rank": next(iter(self.layers().values())).train_rank}

    def load_training_state(self, state):
        self._gen.set_state(state["generator"])
        for m in self.layers().values():
            m.train_rank = state["train_rank"]
