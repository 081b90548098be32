"""NoLA: A and B as linear combinations of frozen random bases; only the mixing coefficients train.

    handle = apply_adapter(model, name="nola", r=8, num_basis_A=64, num_basis_B=64, target_modules=[...])

A = Σ_i α_i A_i (A_i ∈ R^{r×d_in}), B = Σ_j β_j B_j (B_j ∈ R^{d_out×r}), ΔW = (α/r)·BA
(UCDvision/NOLA). Bases: kaiming-uniform, never stored: like the official code, every forward and
every backward regenerates them from the seed, `_GROUP` bases at a time, so a module holds only its
k_A + k_B coefficients and at most `_GROUP` bases exist at once (at Qwen2-0.5B scale, r = 8, k = 64,
storing them would take ~1.6 GB). Each group has its own seed derived from `seed`, the module name,
the factor and the group index, so the bases do not depend on the device or on how often they are
drawn. β = 0 at init so ΔW = 0, α ~ U(±1/√k). Trainable per module: num_basis_A + num_basis_B.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from baselines.core import alpha_or_default, register
from baselines.layers import SelfWrittenAdapted, kaiming_
from lrlora.layer import AdaptedLinear

# Bases drawn per group: bounds the transient memory to _GROUP bases of one factor.
_GROUP = 8


def _group_seed(seed: int, factor: int, group: int) -> int:
    return (int(seed) * 1_000_003 + factor * 7_919 + group) % 2**63


def _basis_group(seed: int, factor: int, group: int, count: int, shape, device, dtype) -> torch.Tensor:
    """Bases group·_GROUP … group·_GROUP + count − 1 of one factor: [count, *shape], kaiming-uniform."""
    gen = torch.Generator(device=device).manual_seed(_group_seed(seed, factor, group))
    return kaiming_(torch.empty(count, *shape, device=device), gen).to(dtype)


class _MixedBasis(torch.autograd.Function):
    """Σ_i c_i · basis_i, the bases regenerated from the seed in forward and again in backward."""

    @staticmethod
    def forward(ctx, coef, seed, factor, shape):
        out = torch.zeros(shape, device=coef.device, dtype=coef.dtype)
        for g0 in range(0, coef.numel(), _GROUP):
            c = coef[g0 : g0 + _GROUP]
            bases = _basis_group(seed, factor, g0 // _GROUP, c.numel(), shape, coef.device, coef.dtype)
            out += torch.tensordot(c, bases, dims=1)
        ctx.seed, ctx.factor, ctx.shape = seed, factor, shape
        ctx.save_for_backward(coef)
        return out

    @staticmethod
    def backward(ctx, grad):
        (coef,) = ctx.saved_tensors
        parts = []
        for g0 in range(0, coef.numel(), _GROUP):
            n = min(_GROUP, coef.numel() - g0)
            bases = _basis_group(ctx.seed, ctx.factor, g0 // _GROUP, n, ctx.shape, coef.device, coef.dtype)
            parts.append(torch.tensordot(bases, grad.to(coef.dtype), dims=len(ctx.shape)))
        return torch.cat(parts), None, None, None


class NoLALinear(AdaptedLinear):
    def __init__(self, base_layer, r, num_basis_A, num_basis_B, lora_alpha=None, dropout=0.0, seed=0):
        super().__init__(base_layer, dropout)
        self.r, self.scaling = r, alpha_or_default(r, lora_alpha) / r
        self.seed = int(seed)
        w = base_layer.weight
        gen = torch.Generator().manual_seed(self.seed)
        bound = num_basis_A**-0.5
        coef_a = torch.empty(num_basis_A).uniform_(-bound, bound, generator=gen)
        self.nola_alpha = nn.Parameter(coef_a.to(w.device, w.dtype))
        self.nola_beta = nn.Parameter(torch.zeros(num_basis_B, device=w.device, dtype=w.dtype))

    def _all_bases(self, factor: int, k: int, shape) -> torch.Tensor:
        p = self.nola_alpha
        return torch.cat([_basis_group(self.seed, factor, g0 // _GROUP, min(_GROUP, k - g0), shape, p.device, p.dtype)
                          for g0 in range(0, k, _GROUP)])

    @property
    def basis_A(self) -> torch.Tensor:
        """The A bases [k_A, r, d_in], regenerated (for inspection; training never materialises them all)."""
        return self._all_bases(0, self.nola_alpha.numel(), (self.r, self.in_features))

    @property
    def basis_B(self) -> torch.Tensor:
        return self._all_bases(1, self.nola_beta.numel(), (self.out_features, self.r))

    def factors(self):
        a = _MixedBasis.apply(self.nola_alpha, self.seed, 0, (self.r, self.in_features))
        b = _MixedBasis.apply(self.nola_beta, self.seed, 1, (self.out_features, self.r))
        return a, b

    def delta_weight(self):
        a, b = self.factors()
        return self.scaling * (b @ a)

    def adapter_forward(self, x):
        a, b = self.factors()
        return self.scaling * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))


@register("nola")
class NoLA(SelfWrittenAdapted):
    label = "NoLA"
    budget_knob = "num_basis"  # k_A = k_B

    @classmethod
    def parameters_per_module(cls, d_in, d_out, num_basis_A=64, num_basis_B=64, **_):
        return num_basis_A + num_basis_B

    @classmethod
    def budget_kwargs(cls, value):
        return {"num_basis_A": value, "num_basis_B": value}

    def make_layer(self, name, linear, r=8, num_basis_A=64, num_basis_B=64, lora_alpha=None, dropout=0.0,
                   seed=0):
        layer_seed = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        return NoLALinear(linear, r, num_basis_A, num_basis_B, lora_alpha, dropout, layer_seed)
