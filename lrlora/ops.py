"""The σ op: σ(t) elementwise, with gradients for t and for the transfer function's parameters,
in O(t.numel()) memory (never an elements × K tensor).

Two paths, one interface (``sigma(t, transfer, mode=...)``; "auto" picks the cheaper):

* **fast** (default): σ is one scalar function per module, so each call tabulates σ and σ' on a
  uniform grid over [min t, max t] in float64 (2048 points per unit of range × σ's frequency scale,
  at least ``table_size``) and interpolates linearly per element. The parameter gradients go
  through a weighted histogram of t: h_m = Σ_ij G_ij λ_m(t_ij) (λ the interpolation hat weights),
  then ∂L/∂θ = Σ_m h_m ∂σ(s_m)/∂θ, by autograd on the small table. This is the exact gradient of
  the interpolated σ, and works unchanged for every basis.
* **exact**: chunked over k, recomputed in backward. The reference the fast path is tested against.

Both save only t for backward, and work on CPU and CUDA alike.
"""

from __future__ import annotations

import math

import torch

from lrlora.transfer import _EXACT_CHUNK_ELEMENTS, BasisSpec, TransferFunction, _terms, evaluate

# Elements per chunk of the interpolation: bounds the index/weight temporaries (int64 + fp32).
_CHUNK = 1 << 18
# Table points per unit of (range × resolution scale); 2048 keeps linear-interpolation error of a
# unit-amplitude sinc near 1e-7. A range that would need more than _MAX_TABLE points takes the exact
# path instead: slower, but never silently inaccurate.
_POINTS_PER_UNIT = 2048
_MAX_TABLE = 1 << 21
# Table points per pass when building the table: bounds its (points × K) temporaries to ~1 MB.
_TABLE_CHUNK = 2048


def _table_grid(t: torch.Tensor, spec: BasisSpec, rho: torch.Tensor, table_size: int):
    """The float64 abscissae s_0..s_{M-1} covering [min t, max t]; None if t is not finite or its range
    would need more than _MAX_TABLE points."""
    lo, hi = torch.aminmax(t.detach())
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    # Widen a degenerate range (e.g. t ≡ 0 at init, when B = 0) so the step is never zero.
    pad = 1e-6 * max(1.0, abs(lo), abs(hi))
    lo, hi = lo - pad, hi + pad
    w_max = float(torch.nn.functional.softplus(rho.detach()).max())
    want = math.ceil(_POINTS_PER_UNIT * (hi - lo) * spec.resolution_scale(w_max))
    if want > _MAX_TABLE:
        return None
    m = max(table_size, want)
    return torch.linspace(lo, hi, m, dtype=torch.float64, device=t.device)


def _locate(tc: torch.Tensor, lo: float, step: float, m: int):
    """Cell index and fractional position of each element of a chunk of t."""
    # float64 even for float32 t: a float32 position is off by up to ~1e-2 of a cell on the large
    # tables of the finer bases (B-spline, Fourier), which costs σ' about 1e-5 relative.
    pos = tc.double().sub_(lo).mul_(1.0 / step)
    idx = pos.floor().clamp_(0, m - 2)
    frac = pos.sub_(idx).clamp_(0.0, 1.0).to(tc.dtype)
    return idx.long(), frac


def _interp(table: torch.Tensor, slope: torch.Tensor, idx: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    return table[idx] + frac * slope[idx]


def _table_chunks(s: torch.Tensor):
    for i in range(0, s.numel(), _TABLE_CHUNK):
        yield slice(i, i + _TABLE_CHUNK)


def _table_values(spec: BasisSpec, s, a, rho, grid) -> torch.Tensor:
    """σ(s) on the table's abscissae, float64, streamed over chunks of s."""
    a, rho, grid = a.double(), rho.double(), grid.double()
    return torch.cat([evaluate(spec, s[c], a, rho, grid) for c in _table_chunks(s)])


def _table_derivative(spec: BasisSpec, s, a, rho, grid) -> torch.Tensor:
    """σ'(s), float64. σ(s_m) depends on s_m alone, so the gradient of a chunk's sum is σ' elementwise."""
    a, rho, grid = a.detach().double(), rho.detach().double(), grid.detach().double()
    out = []
    for c in _table_chunks(s):
        sc = s[c].detach().requires_grad_()
        with torch.enable_grad():
            (d,) = torch.autograd.grad(evaluate(spec, sc, a, rho, grid).sum(), sc)
        out.append(d)
    return torch.cat(out)


def _table_param_grads(spec: BasisSpec, s, hist, params, needs):
    """Σ_m hist_m ∂σ(s_m)/∂θ for θ in (a, rho, grid): autograd on the table, streamed over chunks of s."""
    leaves = [p.detach().double().requires_grad_(n) for p, n in zip(params, needs)]
    wanted = [x for x in leaves if x.requires_grad]
    acc = [torch.zeros_like(x) for x in wanted]
    for c in _table_chunks(s):
        with torch.enable_grad():
            grads = torch.autograd.grad(evaluate(spec, s[c], *leaves), wanted, hist[c], allow_unused=True)
        for j, gj in enumerate(grads):
            if gj is not None:
                acc[j] += gj
    it = iter(acc)
    return [next(it).to(p.dtype) if n else None for p, n in zip(params, needs)]


class _SigmaTable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, spec, s, a, rho, grid):
        with torch.no_grad():
            vals = _table_values(spec, s, a, rho, grid)
        lo, step, m = float(s[0]), float(s[1] - s[0]), s.numel()
        cdt = torch.float64 if t.dtype == torch.float64 else torch.float32
        table, slope = vals.to(cdt), (vals[1:] - vals[:-1]).to(cdt)
        out = torch.empty_like(t, dtype=cdt)
        flat_t, flat_o = t.reshape(-1), out.view(-1)
        for i in range(0, flat_t.numel(), _CHUNK):
            idx, frac = _locate(flat_t[i : i + _CHUNK], lo, step, m)
            flat_o[i : i + _CHUNK] = _interp(table, slope, idx, frac)
        ctx.save_for_backward(t, a, rho, grid)
        ctx.spec, ctx.s = spec, s
        return out.to(t.dtype)

    @staticmethod
    def backward(ctx, g):
        t, a, rho, grid = ctx.saved_tensors
        spec, s = ctx.spec, ctx.s
        need_t = ctx.needs_input_grad[0]
        needs_p = ctx.needs_input_grad[3:]
        lo, step, m = float(s[0]), float(s[1] - s[0]), s.numel()
        cdt = torch.float64 if t.dtype == torch.float64 else torch.float32
        if need_t:
            dvals = _table_derivative(spec, s, a, rho, grid)
            dtab, dslope = dvals.to(cdt), (dvals[1:] - dvals[:-1]).to(cdt)
            grad_t = torch.empty_like(t, dtype=cdt)
            flat_gt = grad_t.view(-1)
        hist = torch.zeros(m, dtype=torch.float64, device=t.device) if any(needs_p) else None
        flat_t, flat_g = t.reshape(-1), g.reshape(-1)
        for i in range(0, flat_t.numel(), _CHUNK):
            idx, frac = _locate(flat_t[i : i + _CHUNK], lo, step, m)
            gc = flat_g[i : i + _CHUNK].to(cdt)
            if need_t:
                flat_gt[i : i + _CHUNK] = gc * _interp(dtab, dslope, idx, frac)
            if hist is not None:
                gf = gc * frac
                # Weighted histogram: each element spreads its upstream gradient onto its two nodes
                # (float64 weights: a node sums up to millions of terms).
                hist += torch.bincount(idx, weights=(gc - gf).double(), minlength=m)
                hist[1:] += torch.bincount(idx, weights=gf.double(), minlength=m)[:-1]
        grads_p = _table_param_grads(spec, s, hist, (a, rho, grid), needs_p) if hist is not None else [None] * 3
        return (grad_t.to(t.dtype) if need_t else None), None, None, *grads_p


class _SigmaExact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, spec, a, rho, grid):
        # The reference computes in float64 whatever t's dtype: torch.sinc's float32 backward cancels
        # catastrophically near u = 0 (errors ~1e-5 relative), which the reference must not inherit.
        with torch.no_grad():
            out = evaluate(spec, t.double(), a.double(), rho.double(), grid.double()).to(t.dtype)
        ctx.save_for_backward(t, a, rho, grid)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, g):
        t, a, rho, grid = ctx.saved_tensors
        originals = (t, a, rho, grid)
        g = g.double()
        leaves = [x.detach().double().requires_grad_(n) for x, n in zip(originals, ctx.needs_input_grad[:1] + ctx.needs_input_grad[2:])]
        wanted = [x for x in leaves if x.requires_grad]
        grads = [None] * 4
        if wanted:
            # Chunks of k as in ``evaluate``: one chunk's graph holds at most _EXACT_CHUNK_ELEMENTS
            # elements (a single k for large t), never numel × K.
            spec = ctx.spec
            chunk = max(1, min(spec.K, _EXACT_CHUNK_ELEMENTS // max(1, t.numel())))
            acc = [torch.zeros_like(x) for x in wanted]
            for k0 in range(0, spec.K, chunk):
                with torch.enable_grad():
                    term = _terms_chunk(spec, leaves, k0, chunk)
                    for j, gk in enumerate(torch.autograd.grad(term, wanted, g, allow_unused=True)):
                        if gk is not None:
                            acc[j] += gk
            it = iter(acc)
            grads = [next(it).to(o.dtype) if x.requires_grad else None for x, o in zip(leaves, originals)]
        return grads[0], None, grads[1], grads[2], grads[3]


def _terms_chunk(spec, leaves, k0, chunk):
    """Σ_{k in chunk} a_k φ_k(t), differentiable in all leaves (the same terms as ``evaluate``)."""
    t, a, rho, grid = leaves
    sl = slice(k0, k0 + chunk)
    return _terms(spec, t.unsqueeze(-1), torch.nn.functional.softplus(rho[sl]), grid[sl], k0) @ a[sl]


def sigma(t: torch.Tensor, transfer: TransferFunction, mode: str = "auto", table_size: int = 1024) -> torch.Tensor:
    """σ(t) for a transfer function.

    mode: "table" (fast path), "exact" (reference), or "auto": the table when t has more elements
    than a few tables (the table costs M·K basis evaluations whatever the size of t), else exact.
    A non-finite t, or one whose range would need an oversized table, always takes the exact path
    (so NaN/inf propagate as they would naively).
    """
    if mode not in ("auto", "table", "exact"):
        raise ValueError(f"mode must be 'auto', 'table' or 'exact', got {mode!r}")
    spec, a, rho, grid = transfer.spec, transfer.a, transfer.rho, transfer.grid
    s = _table_grid(t, spec, rho, table_size) if mode != "exact" and t.numel() > 0 else None
    if s is not None and (mode == "table" or t.numel() > 4 * s.numel()):
        return _SigmaTable.apply(t, spec, s, a, rho, grid)
    return _SigmaExact.apply(t, spec, a, rho, grid)


def sigma_naive(t: torch.Tensor, transfer: TransferFunction) -> torch.Tensor:
    """The broadcast form a · φ(w (t[..., None] − x_k)) summed over k: builds numel × K (benchmarks only)."""
    return _terms(transfer.spec, t.unsqueeze(-1), transfer.bandwidth, transfer.grid, 0) @ transfer.a
