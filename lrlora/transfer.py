"""Learnable transfer functions σ: R → R, applied elementwise to BA (docs/SOURCES.md, Sec. 3.2-3.3).

    σ(x) = Σ_{k=1..K} a_k · φ_k(x; w_k, x_k),   w_k = softplus(ρ_k) > 0,   x_k on [−L, L]

Every basis (``lrlora.basis``: sinc, gaussian, bspline, fourier, polynomial) has the same 2K learnable scalars
per module (amplitudes ``a`` and raw bandwidths ``rho``), so the basis ablation (paper Table 13) compares
families at matched parameter counts. ``TransferFunction.evaluate`` is the exact reference; its forward
runs the memory-safe op (``lrlora.ops``), which tabulates σ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrlora.basis import BASES, BasisSpec, evaluate, inverse_softplus
from lrlora.ops import sigma

__all__ = ["BASES", "BasisSpec", "TransferFunction", "evaluate"]


class TransferFunction(nn.Module):
    """One learnable σ. Parameters ``a`` [K], ``rho`` [K] (and ``grid`` [K] when learn_grid)."""

    def __init__(
        self,
        basis: str = "sinc",
        K: int = 50,
        L: float = 3.0,
        amplitude_init: str = "zero",
        amplitude_init_std: float = 1e-3,
        bandwidth_init: float = 1.0,
        learn_bandwidth: bool = True,
        learn_grid: bool = False,
        device=None,
    ):
        super().__init__()
        if basis not in BASES:
            raise ValueError(f"unknown basis {basis!r}; choose one of {BASES}")
        if K < 2:
            raise ValueError(f"K (number of basis functions) must be >= 2, got {K}")
        self.spec = BasisSpec(basis, int(K), float(L))
        f32 = dict(device=device, dtype=torch.float32)
        grid = torch.linspace(-L, L, K, **f32)
        if learn_grid:
            self.grid = nn.Parameter(grid)
        else:
            self.register_buffer("grid", grid)
        if amplitude_init == "zero":
            a = torch.zeros(K, **f32)
        elif amplitude_init == "random":
            a = torch.randn(K, **f32) * amplitude_init_std
        else:
            raise ValueError(f"amplitude_init must be 'zero' or 'random', got {amplitude_init!r}")
        self.a = nn.Parameter(a)
        self.rho = nn.Parameter(torch.full((K,), inverse_softplus(bandwidth_init), **f32), requires_grad=learn_bandwidth)

    @property
    def bandwidth(self) -> torch.Tensor:
        return F.softplus(self.rho)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Exact σ(x) (the reference; use for plots and small inputs)."""
        return evaluate(self.spec, x, self.a, self.rho, self.grid)

    def forward(self, t: torch.Tensor, fast: bool = True, table_size: int = 1024) -> torch.Tensor:
        """σ(t) through the memory-safe op (lrlora.ops): fast = the cheaper of table and exact, else exact."""
        return sigma(t, self, mode="auto" if fast else "exact", table_size=table_size)

    def extra_repr(self) -> str:
        return f"basis={self.spec.kind}, K={self.spec.K}, L={self.spec.L}"
