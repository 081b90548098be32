"""LRLoRALinear: a frozen nn.Linear plus ΔW = post_scale · σ(pre_scale · B A) (paper Eq. 4).

Forward (docs/SOURCES.md, App. C):
  * dropout p = 0, or eval:   y = x (W0 + ΔW)ᵀ + b                 one merged matmul
  * p > 0 in training:        y = x W0ᵀ + b + dropout(x) ΔWᵀ       dropout stays input-side; computed as
    x (W0 + ΔW/(1 − p))ᵀ + b minus the dropped entries' share (one dense matmul and a sparse one) for
    p ≤ 0.15 on CPU, as two matmuls otherwise (lrlora.fused)
σ is always computed in fp32 (A, B and the transfer parameters are fp32 whatever the base dtype).

The forward runs through one autograd function (lrlora.fused) that saves only x (and the dropout
mask, or the dropped entries' positions) and recomputes BA, σ and σ' in backward, so the memory above LoRA does not grow with depth;
``layer.fused = False`` takes plain autograd through the σ op (``forward_reference``) instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lrlora.fused import DeltaSpec, LRLoRALinearFunction, draw_dropout
from lrlora.transfer import TransferFunction


class LRLoRALinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        transfer: TransferFunction,
        dropout: float = 0.0,
        center: bool = False,
        pre_scale: float = 1.0,
        post_scale: float = 1.0,
        fast: bool = True,
        table_size: int = 1024,
        init_B: str = "kaiming",
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LRLoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        d_out, d_in = base_layer.weight.shape
        f32 = dict(device=base_layer.weight.device, dtype=torch.float32)
        # A Kaiming-uniform(a = √5) as in PEFT's LoRA; B the same ("kaiming") or 0 ("zero"), see
        # LRLoRAConfig.init_B: with a = 0, ΔW = σ(BA) = 0 at init either way.
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **f32))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, **f32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_B == "kaiming":
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        self.transfer = transfer
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.center, self.pre_scale, self.post_scale = r, center, pre_scale, post_scale
        self.fast, self.table_size = fast, table_size
        self.merged = False
        # The fused autograd function (lrlora.fused) by default; False: plain autograd (the reference).
        self.fused = True

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight W0 (as PEFT's layers expose it): model code reads a projection's .weight.dtype etc."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def lowrank_product(self) -> torch.Tensor:
        """B A (fp32), the argument of σ before pre-scaling."""
        return self.lora_B @ self.lora_A

    def delta_weight(self) -> torch.Tensor:
        """ΔW (fp32, d_out × d_in), differentiable in A, B and the transfer parameters."""
        t = self.lowrank_product()
        if self.pre_scale != 1.0:
            t = t * self.pre_scale
        dw = self.transfer(t, fast=self.fast, table_size=self.table_size)
        if self.center:
            # Through the same op as σ(BA), so that σ(BA) − σ(0) is exactly 0 where BA = 0.
            dw = dw - self.transfer(t.new_zeros(1), fast=self.fast, table_size=self.table_size)
        if self.post_scale != 1.0:
            dw = dw * self.post_scale
        return dw

    def delta_spec(self) -> DeltaSpec:
        return DeltaSpec(self.transfer.spec, float(self.pre_scale), float(self.post_scale), bool(self.center),
                         "auto" if self.fast else "exact", int(self.table_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if not self.fused:
            return self.forward_reference(x)
        p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        # All the backward keeps of dropout: the dropped entries' positions or a bool mask (see draw_dropout).
        mask = draw_dropout(x, self.base_layer.weight, p) if p > 0 else None
        return self.forward_fused(x, mask, p)

    def forward_fused(self, x: torch.Tensor, mask: torch.Tensor | None = None, p: float = 0.0) -> torch.Tensor:
        """The memory-lean form (lrlora.fused); ``mask`` the dropout keep-mask or the dropped entries' flat
        positions (None: merged form)."""
        base, tf = self.base_layer, self.transfer
        return LRLoRALinearFunction.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, tf.a, tf.rho, tf.grid,
                                          self.delta_spec(), mask, 1.0 / (1.0 - p))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain autograd through the σ op: keeps BA and W0 + ΔW per layer for backward (the reference)."""
        base = self.base_layer
        dw = self.delta_weight()
        if self.training and isinstance(self.dropout, nn.Dropout):
            return base(x) + F.linear(self.dropout(x), dw.to(x.dtype))
        return F.linear(x, base.weight + dw.to(base.weight.dtype), base.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← W0 + ΔW: afterwards the layer costs exactly the base matmul."""
        if self.merged:
            raise RuntimeError("already merged: call unmerge() first")
        self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 ← W0 − ΔW (exact to fp32 rounding; to bf16/fp16 rounding for half-precision bases)."""
        if not self.merged:
            raise RuntimeError("not merged: nothing to unmerge")
        self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, merged={self.merged}"
