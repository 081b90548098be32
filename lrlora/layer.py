"""Adapted linear layers: one base for every method, and LR-LoRA's ΔW = post_scale · σ(pre_scale · B A) (Eq. 4).

    AdaptedLinear          a frozen nn.Linear (``base_layer``) + a learned ΔW: ``delta_weight()``, ``merge()``/
                           ``unmerge()``, dropout on the adapter's input side only. LR-LoRA and the self-written
                           baselines (baselines/) are subclasses; a subclass gives ``delta_weight()``.
    LRLoRADelta            LR-LoRA's A, B and σ on one d_out × d_in linear and its forward through the fused op
                           (a mixin: the same code whether the layer owns its base layer or PEFT does).
    LRLoRALinear           LRLoRADelta on an AdaptedLinear: the library's layer (``apply_lrlora``).
    LRLoRAAdapter          LRLoRADelta without a base layer: what ``lrlora.peft`` keeps per adapter name.

LR-LoRA's forward (docs/SOURCES.md, App. C):
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


def fold(weight: torch.Tensor, dw: torch.Tensor) -> tuple:
    """W0 ← W0 + ΔW in place (ΔW cast to W0's dtype; dw is consumed). Returns what ``unfold`` needs to give W0
    back bit for bit: the flat positions where (W0 + ΔW) − ΔW rounds to something else than W0, and W0's values
    there (where |ΔW| ≳ |W0| or W0 + ΔW crosses a power of two: a small share of the entries)."""
    d = dw.to(weight.dtype)
    merged = weight + d
    back = d.sub_(merged).neg_()  # (W0 + ΔW) − ΔW, exactly as unfold will compute it
    bad = (back != weight).reshape(-1).nonzero().squeeze(1)
    del back
    if 2 * bad.numel() > weight.numel() or not weight.is_contiguous():  # W0 whole: smaller, or no flat view
        fix = (None, weight.clone())
    else:  # int32 positions where they fit: 8 bytes a recorded entry
        fix = (bad.to(torch.int32) if weight.numel() < 2**31 else bad, weight.reshape(-1)[bad].clone())
    weight.copy_(merged)
    return fix


def unfold(weight: torch.Tensor, dw: torch.Tensor, fix: tuple | None) -> None:
    """W0 ← (W0 + ΔW) − ΔW in place, then the entries ``fold`` recorded: W0 as it was before ``fold``, given the
    same ΔW (fix None: to rounding only)."""
    if fix is not None and fix[0] is None:
        weight.copy_(fix[1])
        return
    weight.sub_(dw.to(weight.dtype))
    if fix is not None:
        weight.view(-1).index_copy_(0, fix[0].long(), fix[1])


def versions(module: nn.Module, skip: tuple = ()) -> tuple:
    """The in-place version counters of a module's tensors besides ``skip``: equal before and after means ΔW
    cannot have changed (so ``unfold``'s record still applies)."""
    ids = {id(t) for t in skip}
    return tuple(t._version for t in (*module.parameters(), *module.buffers()) if id(t) not in ids)


def input_dropout(p: float) -> nn.Module:
    """The adapter path's input-side dropout: nn.Dropout(p), or nn.Identity at p = 0."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class AdaptedLinear(nn.Module):
    """y = base_layer(x) + adapter_forward(dropout(x)); merged: y = base_layer(x) with W0 + ΔW in place.

    The base layer stays frozen and is exposed as PEFT's layers expose it (``weight``, ``bias``,
    ``in_features``, ``out_features``), since model code reads a projection's ``.weight.dtype`` etc."""

    def __init__(self, base_layer: nn.Linear, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.dropout = input_dropout(dropout)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight W0."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW (d_out × d_in), differentiable in the adapter's parameters."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update applied to (already dropped-out) x; low-rank methods override to skip the dense ΔW."""
        return F.linear(x, self.delta_weight().to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.adapter_forward(self.dropout(x))

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← W0 + ΔW: afterwards the layer costs exactly the base matmul."""
        if self.merged:
            raise RuntimeError("already merged: call unmerge() first")
        weight = self.base_layer.weight
        self._unmerge_fix = fold(weight, self.delta_weight())
        self._merged_at = versions(self, (weight,))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 ← W0 − ΔW: the weight of before ``merge`` bit for bit while the adapter has not changed since (else
        to rounding)."""
        if not self.merged:
            raise RuntimeError("not merged: nothing to unmerge")
        weight = self.base_layer.weight
        same = getattr(self, "_merged_at", None) == versions(self, (weight,))
        unfold(weight, self.delta_weight(), getattr(self, "_unmerge_fix", None) if same else None)
        self._unmerge_fix = self._merged_at = None
        self.merged = False


class LRLoRADelta:
    """LR-LoRA on one d_out × d_in linear: ``lora_A`` (r × d_in), ``lora_B`` (d_out × r), σ (``transfer``), the
    settings of ΔW, and the forward through the fused op given the base layer. A mixin on an nn.Module that also
    holds ``dropout`` (``input_dropout``)."""

    def _init_delta(self, d_in: int, d_out: int, r: int, transfer: TransferFunction, *, center: bool = False,
                    pre_scale: float = 1.0, post_scale: float = 1.0, fast: bool = True, table_size: int = 1024,
                    init_B: str = "kaiming", device=None) -> None:
        f32 = dict(device=device, dtype=torch.float32)
        # A Kaiming-uniform(a = √5) as in PEFT's LoRA; B the same ("kaiming") or 0 ("zero"), see
        # LRLoRAConfig.init_B: with a = 0, ΔW = σ(BA) = 0 at init either way.
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **f32))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, **f32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_B == "kaiming":
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        self.transfer = transfer
        self.r, self.center, self.pre_scale, self.post_scale = r, center, pre_scale, post_scale
        self.fast, self.table_size = fast, table_size
        # The fused autograd function (lrlora.fused) by default; False: plain autograd (the reference).
        self.fused = True

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

    def linear(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        """base(x) plus ΔW applied to dropout(x): the fused op, or plain autograd when ``fused`` is False."""
        if not self.fused:
            return self.linear_reference(x, base)
        p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        # All the backward keeps of dropout: the dropped entries' positions or a bool mask (see draw_dropout).
        mask = draw_dropout(x, base.weight, p) if p > 0 else None
        return self.linear_fused(x, base, mask, p)

    def linear_fused(self, x: torch.Tensor, base: nn.Linear, mask: torch.Tensor | None = None,
                     p: float = 0.0) -> torch.Tensor:
        """The memory-lean form (lrlora.fused); ``mask`` the dropout keep-mask or the dropped entries' flat
        positions (None: merged form)."""
        tf = self.transfer
        return LRLoRALinearFunction.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, tf.a, tf.rho, tf.grid,
                                          self.delta_spec(), mask, 1.0 / (1.0 - p))

    def linear_reference(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        """Plain autograd through the σ op: keeps BA and W0 + ΔW per layer for backward (the reference)."""
        dw = self.delta_weight()
        if self.training and isinstance(self.dropout, nn.Dropout):
            return base(x) + F.linear(self.dropout(x), dw.to(x.dtype))
        return F.linear(x, base.weight + dw.to(base.weight.dtype), base.bias)


class LRLoRALinear(LRLoRADelta, AdaptedLinear):
    """A frozen nn.Linear plus ΔW = post_scale · σ(pre_scale · B A), built by ``apply_lrlora``."""

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
        super().__init__(base_layer, dropout)
        self._init_delta(base_layer.in_features, base_layer.out_features, r, transfer, center=center,
                         pre_scale=pre_scale, post_scale=post_scale, fast=fast, table_size=table_size, init_B=init_B,
                         device=base_layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.linear(x, self.base_layer)

    def forward_fused(self, x: torch.Tensor, mask: torch.Tensor | None = None, p: float = 0.0) -> torch.Tensor:
        return self.linear_fused(x, self.base_layer, mask, p)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_reference(x, self.base_layer)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, merged={self.merged}"


class LRLoRAAdapter(LRLoRADelta, nn.Module):
    """LR-LoRA's parameters for one linear of d_in → d_out, without the linear: ``lrlora.peft`` keeps one per
    adapter name beside the base layer PEFT owns (so the base is neither saved, trained nor moved twice)."""

    def __init__(self, d_in: int, d_out: int, r: int, transfer: TransferFunction, dropout: float = 0.0,
                 device=None, **settings):
        nn.Module.__init__(self)
        self._init_delta(d_in, d_out, r, transfer, device=device, **settings)
        self.dropout = input_dropout(dropout)

    def extra_repr(self) -> str:
        return f"in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}, r={self.r}"
