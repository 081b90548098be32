"""Learnable transfer functions σ: R → R, applied elementwise to BA (docs/SOURCES.md, Sec. 3.2-3.3).

    σ(x) = Σ_{k=1..K} a_k · φ_k(x; w_k, x_k),   w_k = softplus(ρ_k) > 0,   x_k on [−L, L]

Every basis has the same 2K learnable scalars per module (amplitudes ``a`` and raw bandwidths
``rho``), so the basis ablation (paper Table 13) compares families at matched parameter counts:

    sinc        φ = sinc(w (x − x_k))                 normalised sinc, the paper's default (Sec. 3.2)
    gaussian    φ = exp(−π (w (x − x_k))²)            RBF; same π-normalisation as torch.sinc (∫φ = 1 at w = 1)
    bspline     φ = B3(w (x − x_k) / h)               cubic cardinal B-spline, h the grid spacing:
                                                      at w = 1 the classic uniform spline basis
    fourier     φ = cos(w π (k−1) (x + L) / 2L)       half-range cosine series on [−L, L]; w scales each frequency
    polynomial  φ = (w x / L)^(k−1)                   monomials with a learnable per-term scale

``evaluate`` is the exact reference: pure torch ops, differentiable, chunked over k so it never
holds an elements × K tensor for large inputs. The fast path (``lrlora.ops``) tabulates it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BASES = ("sinc", "gaussian", "bspline", "fourier", "polynomial")

# Chunk the exact evaluation over k so that one chunk holds at most this many elements (or one k).
_EXACT_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class BasisSpec:
    """The static part of a transfer function: which basis, how many terms, on what interval."""

    kind: str
    K: int
    L: float

    @property
    def spacing(self) -> float:
        return 2.0 * self.L / (self.K - 1)

    def resolution_scale(self, w_max: float) -> float:
        """Roughly how many oscillations σ can make per unit of x: sets the fast path's table size."""
        if self.kind in ("sinc", "gaussian"):
            return w_max
        if self.kind == "bspline":
            return w_max / self.spacing
        if self.kind == "fourier":
            return w_max * (self.K - 1) / (2.0 * self.L)
        return w_max * (self.K - 1) / self.L  # polynomial


def _cubic_bspline(u: torch.Tensor) -> torch.Tensor:
    au = u.abs()
    inner = 2.0 / 3.0 - au.square() + 0.5 * au.pow(3)
    outer = (2.0 - au).clamp(min=0).pow(3) / 6.0
    return torch.where(au < 1, inner, outer)


def _terms(spec: BasisSpec, x: torch.Tensor, w: torch.Tensor, grid: torch.Tensor, k0: int) -> torch.Tensor:
    """φ_k(x) for the k in one chunk: x [..., 1], w and grid [c] -> [..., c]. k0 is the chunk's first k."""
    if spec.kind == "sinc":
        return torch.sinc(w * (x - grid))
    if spec.kind == "gaussian":
        return torch.exp(-math.pi * (w * (x - grid)).square())
    if spec.kind == "bspline":
        return _cubic_bspline(w * (x - grid) / spec.spacing)
    k = torch.arange(k0, k0 + w.shape[0], device=x.device, dtype=x.dtype)  # k − 1, zero-based
    if spec.kind == "fourier":
        return torch.cos(w * math.pi * k * (x + spec.L) / (2.0 * spec.L))
    if spec.kind == "polynomial":
        z = w * x / spec.L
        # Multiply up explicitly: pow's backward at z = 0 with exponent 0 gives 0·inf = NaN.
        out = [torch.ones_like(z[..., :1]) if int(n) == 0 else z[..., j : j + 1].pow(int(n)) for j, n in enumerate(k)]
        return torch.cat(out, dim=-1)
    raise ValueError(f"unknown basis {spec.kind!r}; choose one of {BASES}")


def evaluate(spec: BasisSpec, x: torch.Tensor, a: torch.Tensor, rho: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Exact σ(x) for any shape of x, differentiable in x, a, rho and grid. Memory O(x.numel() · chunk)."""
    w = F.softplus(rho)
    chunk = max(1, min(spec.K, _EXACT_CHUNK_ELEMENTS // max(1, x.numel())))
    xs = x.unsqueeze(-1)
    out = None
    for k0 in range(0, spec.K, chunk):
        sl = slice(k0, k0 + chunk)
        part = _terms(spec, xs, w[sl], grid[sl], k0) @ a[sl]
        out = part if out is None else out + part
    return out


def inverse_softplus(y: float) -> float:
    """ρ with softplus(ρ) = y; bandwidth 1.0 gives log(e − 1) as in App. E.1."""
    if y <= 0:
        raise ValueError(f"bandwidth_init must be > 0, got {y}")
    return y + math.log(-math.expm1(-y))


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
        from lrlora.ops import sigma

        return sigma(t, self, mode="auto" if fast else "exact", table_size=table_size)

    def extra_repr(self) -> str:
        return f"basis={self.spec.kind}, K={self.spec.K}, L={self.spec.L}"
