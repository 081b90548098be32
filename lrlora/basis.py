"""The basis families of σ and the exact evaluation: pure functions of (spec, x, a, rho, grid), no module.

    σ(x) = Σ_{k=1..K} a_k · φ_k(x; w_k, x_k),   w_k = softplus(ρ_k) > 0,   x_k on [−L, L]

    sinc        φ = sinc(w (x − x_k))                 normalised sinc, the paper's default (Sec. 3.2)
    gaussian    φ = exp(−π (w (x − x_k))²)            RBF; same π-normalisation as torch.sinc (∫φ = 1 at w = 1)
    bspline     φ = B3(w (x − x_k) / h)               cubic cardinal B-spline, h the grid spacing:
                                                      at w = 1 the classic uniform spline basis
    fourier     φ = cos(w π (k−1) (x + L) / 2L)       half-range cosine series on [−L, L]; w scales each frequency
    polynomial  φ = (w x / L)^(k−1)                   monomials with a learnable per-term scale

``evaluate`` is the exact reference: pure torch ops, differentiable, chunked over k so it never holds an
elements × K tensor for large inputs. The learnable module is ``lrlora.transfer.TransferFunction``; the fast
path (``lrlora.ops``) tabulates the same functions; both import from here (and this file from neither).
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BASES = ("sinc", "gaussian", "bspline", "fourier", "polynomial")

# Chunk the exact evaluation over k so that one chunk holds at most this many elements (or one k).
EXACT_CHUNK_ELEMENTS = 1 << 18


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


def terms(spec: BasisSpec, x: torch.Tensor, w: torch.Tensor, grid: torch.Tensor, k0: int) -> torch.Tensor:
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
    chunk = max(1, min(spec.K, EXACT_CHUNK_ELEMENTS // max(1, x.numel())))
    xs = x.unsqueeze(-1)
    out = None
    for k0 in range(0, spec.K, chunk):
        sl = slice(k0, k0 + chunk)
        part = terms(spec, xs, w[sl], grid[sl], k0) @ a[sl]
        out = part if out is None else out + part
    return out


def inverse_softplus(y: float) -> float:
    """ρ with softplus(ρ) = y; bandwidth 1.0 gives log(e − 1) as in App. E.1."""
    if y <= 0:
        raise ValueError(f"bandwidth_init must be > 0, got {y}")
    return y + math.log(-math.expm1(-y))
