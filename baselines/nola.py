"""NoLA: A and B as linear combinations of frozen random bases; only the mixing coefficients train.

    handle = apply_adapter(model, name="nola", r=8, num_basis_A=64, num_basis_B=64, target_modules=[...])

A = Σ_i α_i A_i (A_i ∈ R^{r×d_in}), B = Σ_j β_j B_j (B_j ∈ R^{d_out×r}), ΔW = (α/r)·BA
(UCDvision/NOLA). Bases: kaiming-uniform, regenerated from `seed` and the module name (so not
saved); β = 0 at init so ΔW = 0, α ~ U(±1/√k). Trainable per module: num_basis_A + num_basis_B.
The bases are kept in memory (k·r·(d_in + d_out) floats per module); the official code regenerates
them chunk by chunk to save memory, which this version does not do.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from baselines.core import alpha_or_default, register
from baselines.layers import AdapterLinear, SelfWrittenAdapted, kaiming_


class NoLALinear(AdapterLinear):
    def __init__(self, base_layer, r, num_basis_A, num_basis_B, lora_alpha=None, dropout=0.0, seed=0):
        super().__init__(base_layer, dropout)
        self.r, self.scaling = r, alpha_or_default(r, lora_alpha) / r
        w = base_layer.weight
        gen = torch.Generator().manual_seed(int(seed))
        basis_a = kaiming_(torch.empty(num_basis_A, r, self.in_features), gen)
        basis_b = kaiming_(torch.empty(num_basis_B, self.out_features, r), gen)
        self.register_buffer("basis_A", basis_a.to(w.device, w.dtype), persistent=False)
        self.register_buffer("basis_B", basis_b.to(w.device, w.dtype), persistent=False)
        bound = num_basis_A**-0.5
        coef_a = torch.empty(num_basis_A).uniform_(-bound, bound, generator=gen)
        self.nola_alpha = nn.Parameter(coef_a.to(w.device, w.dtype))
        self.nola_beta = nn.Parameter(torch.zeros(num_basis_B, device=w.device, dtype=w.dtype))

    def factors(self):
        a = torch.einsum("k,kri->ri", self.nola_alpha, self.basis_A)
        b = torch.einsum("k,kor->or", self.nola_beta, self.basis_B)
        return a, b

    def delta_weight(self):
        a, b = self.factors()
        return self.scaling * (b @ a)

    def adapter_forward(self, x):
        a, b = self.factors()
        return self.scaling * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))


@register("nola")
class NoLA(SelfWrittenAdapted):
    def make_layer(self, name, linear, r=8, num_basis_A=64, num_basis_B=64, lora_alpha=None, dropout=0.0,
                   seed=0):
        layer_seed = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        return NoLALinear(linear, r, num_basis_A, num_basis_B, lora_alpha, dropout, layer_seed)
