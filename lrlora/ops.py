"""The σ op: σ(t) elementwise, with gradients for t and for the transfer function's parameters,
in O(t.numel()) memory (never an elements × K tensor).

Two paths, one interface (``sigma(t, transfer, mode=...)``; "auto" picks the cheaper):

* **fast** (default): σ is one scalar function per module, so each call tabulates σ and σ' on a
  uniform grid over [min t, max t] in float64 (1024 points per unit of range × σ's frequency scale,
  at least ``table_size``; on CUDA a fixed size, see make_table) and interpolates linearly per element. The parameter gradients go
  through a weighted histogram of t: h_m = Σ_ij G_ij λ_m(t_ij) (λ the interpolation hat weights),
  then ∂L/∂θ = Σ_m h_m ∂σ(s_m)/∂θ. The table, σ' and ∂σ(s_m)/∂θ come from each basis's closed form
  (φ(u) and dφ/du, u = w·z(s); sin/cos on the uniform grid by angle addition) as M × K matrix-vector
  products, no autograd. This is the exact gradient of the interpolated σ, for every basis.
* **exact**: chunked over k, recomputed in backward. The reference the fast path is tested against.

Both save only t for backward, and work on CPU and CUDA alike. The fast path's per-element passes run
in compiled CPU kernels where a compiler exists (lrlora._kernels), else in pure PyTorch (also on CUDA,
where nothing is read on the host). The fused LR-LoRA layer (lrlora.fused) drives the same ``Table``.
"""

from __future__ import annotations

import math

import torch

from lrlora import _kernels
from lrlora.basis import BASES, EXACT_CHUNK_ELEMENTS, BasisSpec, evaluate, terms

# Elements per chunk of the pure-PyTorch interpolation: bounds its index/weight temporaries.
_CHUNK = 1 << 20
# Table points per unit of (range × resolution scale); 1024 keeps the fast path within ~1e-6 of the
# exact one for values and gradients, every basis (measured; 512 gives ~6e-6, 2048 ~2e-7). On CPU a
# range that would need more than _MAX_TABLE points takes the exact path instead: slower, but never
# silently inaccurate.
_POINTS_PER_UNIT = 1024
_MAX_TABLE = 1 << 21
# On CUDA the table size cannot depend on t's range without reading it on the host (a sync per layer),
# so it is fixed: _CUDA_TABLE points over [min t, max t], accurate (≤ ~1e-6) while range × scale ≤ 32.
_CUDA_TABLE = 1 << 16
# Tests only: take the CUDA form (no host reads, fixed table, pure PyTorch) on CPU, where it can be checked.
DEVICE_SIDE_TABLE_ON_CPU = False
# Table points per pass when building the table: bounds its (points × K) float64 temporaries (~0.8 MB at
# K = 50). 2048 builds an 8k-point table ~30% faster than 512 (fewer op launches; measured).
_TABLE_CHUNK = 2048
# The basis at the table's nodes (φ, dφ/du, z: three M × K float64 matrices) is kept from σ' for the parameter
# gradients up to this many M·K elements (~6 MB); larger tables evaluate it again.
_KEEP_TERMS = 1 << 18


class Table:
    """σ (and lazily σ') tabulated in float64 on the uniform grid s_0..s_{M-1} = lo + m/inv.

    ``lo`` and ``inv`` are Python floats on CPU and 0-dim device tensors on CUDA (no host sync)."""

    def __init__(self, spec: BasisSpec, a, rho, grid, s, lo, inv):
        self.spec, self.params, self.s, self.lo, self.inv = spec, (a, rho, grid), s, lo, inv
        self.m = s.numel()
        self._vals = self._dvals = None
        self._terms = None  # the basis at the nodes, kept from σ' for the parameter gradients (small tables)

    @property
    def vals(self) -> torch.Tensor:
        if self._vals is None:
            self._vals = _table_values(self.spec, self.s, *self.params)
        return self._vals

    @property
    def dvals(self) -> torch.Tensor:
        if self._dvals is None:
            keep = self.m * self.spec.K <= _KEEP_TERMS
            self._dvals, vals, self._terms = _table_derivative(self.spec, self.s, *self.params, keep=keep)
            if self._vals is None:
                self._vals = vals
        return self._dvals

    def interp(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) (t's dtype for float32/float64 t)."""
        k = _kernels_for(t)
        if k is not None:
            return k.interp(t.contiguous(), self.vals, self.lo, self.inv).view(t.shape)
        return _interp_torch(t, self.vals, self.lo, self.inv, self.m)

    def backward(self, t: torch.Tensor, g: torch.Tensor, need_t: bool = True, need_hist: bool = True,
                 val_into_g: bool = False):
        """(g·σ'(t) or None, weighted histogram h_m = Σ g·λ_m(t) in float64 or None), in one pass.
        val_into_g: also overwrite g (t's dtype, contiguous, the caller's own) with σ(t)."""
        k = _kernels_for(t)
        if k is not None:
            if not val_into_g:
                g = g.to(t.dtype).contiguous()
            dtab = self.dvals if need_t else self.vals  # an unused argument when need_t is False
            grad_t, _, hist = k.interp_backward(t.contiguous(), g, self.vals, dtab, self.lo, self.inv,
                                                need_t, val_into_g, need_hist)
            return (grad_t.view(t.shape) if need_t else None), (hist if need_hist else None)
        out = _backward_torch(t, g.to(t.dtype), self.dvals if need_t else None, self.lo, self.inv, self.m, need_hist)
        if val_into_g:
            g.copy_(self.interp(t))
        return out

    def prepare_backward(self, needs) -> None:
        """Kept for the callers' order (σ' before the backward pass); σ' is built on first use, and with it the
        basis at the nodes is kept for ``param_grads`` while the table is small (M·K ≤ _KEEP_TERMS): one basis
        evaluation per backward instead of two."""

    def param_grads(self, hist: torch.Tensor, needs):
        """Σ_m hist_m ∂σ(s_m)/∂θ for θ in (a, rho, grid), None where not needed."""
        terms, self._terms = self._terms, None  # used once: the backward's
        return _table_param_grads(self.spec, self.s, hist, self.params, needs, terms)


def _kernels_for(t: torch.Tensor):
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or DEVICE_SIDE_TABLE_ON_CPU:
        return None
    return _kernels.get()


def make_table(t: torch.Tensor, spec: BasisSpec, a, rho, grid, table_size: int) -> Table | None:
    """The table for this t, or None where it cannot serve (CPU only: t not finite, or its range
    would need more than _MAX_TABLE points): the caller then takes the exact path."""
    if t.numel() == 0:
        return None
    if t.device.type != "cpu" or DEVICE_SIDE_TABLE_ON_CPU:
        # Everything stays on the device: lo/inv are tensors, M is fixed. A NaN/inf in t makes the
        # whole table NaN (so ΔW is NaN, as it would be naively: training has diverged anyway).
        lo, hi = torch.aminmax(t.detach().double())
        pad = 1e-6 * torch.maximum(torch.ones_like(lo), torch.maximum(lo.abs(), hi.abs()))
        lo, hi = lo - pad, hi + pad
        m = max(table_size, _CUDA_TABLE)
        s = lo + (hi - lo) * torch.linspace(0.0, 1.0, m, dtype=torch.float64, device=t.device)
        return Table(spec, a, rho, grid, s, lo, (m - 1) / (hi - lo))
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
    s = torch.linspace(lo, hi, m, dtype=torch.float64, device=t.device)
    # The step as linspace made it, so positions land on the table's own nodes.
    return Table(spec, a, rho, grid, s, lo, (m - 1) / (hi - lo))


def use_table(t: torch.Tensor, table: Table | None, mode: str) -> bool:
    """mode "table": whenever a table can serve; "auto": only when t has more than four times as many
    elements as the table (the table costs M·K basis evaluations whatever the size of t)."""
    return table is not None and (mode == "table" or t.numel() > 4 * table.m)


def _locate(tc: torch.Tensor, lo, inv, m: int):
    """Cell index and fractional position of each element of a chunk of t."""
    # float64 even for float32 t: a float32 position is off by up to ~1e-2 of a cell on the large
    # tables of the finer bases (B-spline, Fourier), which costs σ' about 1e-5 relative.
    pos = tc.double().sub_(lo).mul_(inv)
    idx = pos.floor().clamp_(0, m - 2)
    frac = pos.sub_(idx).clamp_(0.0, 1.0).to(tc.dtype)
    return idx.long(), frac


def _chunks(n: int):
    for i in range(0, n, _CHUNK):
        yield slice(i, i + _CHUNK)


def _interp_torch(t, vals, lo, inv, m):
    cdt = torch.float64 if t.dtype == torch.float64 else torch.float32
    table, slope = vals.to(cdt), (vals[1:] - vals[:-1]).to(cdt)
    out = torch.empty_like(t, dtype=cdt)
    flat_t, flat_o = t.reshape(-1), out.view(-1)
    for c in _chunks(flat_t.numel()):
        idx, frac = _locate(flat_t[c], lo, inv, m)
        flat_o[c] = torch.addcmul(table[idx], frac, slope[idx])
    # NaN/inf elements propagate as they would naively (their clamped position is meaningless).
    return torch.where(torch.isfinite(t), out, t.to(cdt)).to(t.dtype)


def _backward_torch(t, g, dvals, lo, inv, m, need_hist):
    cdt = torch.float64 if t.dtype == torch.float64 else torch.float32
    grad_t = hist = None
    if dvals is not None:
        dtab, dslope = dvals.to(cdt), (dvals[1:] - dvals[:-1]).to(cdt)
        grad_t = torch.empty_like(t, dtype=cdt)
    if need_hist:
        hist = torch.zeros(m, dtype=torch.float64, device=t.device)
    flat_t, flat_g = t.reshape(-1), g.reshape(-1)
    for c in _chunks(flat_t.numel()):
        idx, frac = _locate(flat_t[c], lo, inv, m)
        gc = flat_g[c].to(cdt)
        if grad_t is not None:
            grad_t.view(-1)[c] = gc * torch.addcmul(dtab[idx], frac, dslope[idx])
        if hist is not None:
            # Weighted histogram: each element spreads its upstream gradient onto its two nodes (float64
            # sums: a node gathers up to millions of terms). index_add_ rather than bincount: bincount
            # reads max(idx) on the host, a sync on CUDA.
            gf = (gc * frac).double()
            hist.index_add_(0, idx, gc.double() - gf)
            hist.index_add_(0, idx + 1, gf)
    return (grad_t.to(t.dtype) if grad_t is not None else None), hist


def _table_chunks(s: torch.Tensor):
    step = _TABLE_CHUNK if s.device.type == "cpu" else 1 << 15  # few launches on CUDA
    for i in range(0, s.numel(), step):
        yield slice(i, i + step)


def _basis_terms(spec: BasisSpec, s, w, grid, k0: int, need_du: bool = True):
    """Closed form of every basis as φ(u), u = w·z(s): returns φ, dφ/du, z, dz/ds [c] and dz/dgrid [c]
    (None where σ does not depend on the grid), for s [M, 1] and the k of one chunk (w, grid [c]).
    need_du=False: the sinc basis may skip dφ/du (returned as None); the others return it anyway.
    The same functions as basis.terms (the exact path, which the tests hold the table to)."""
    if spec.kind in ("sinc", "gaussian", "bspline"):
        c = 1.0 / spec.spacing if spec.kind == "bspline" else 1.0
        z = (s - grid) * c
        u = w * z
        if spec.kind == "sinc":
            sn, cs = _sincos_uniform(s, math.pi * w, -math.pi * w * grid)
            pu = math.pi * u
            small = u.abs() < 1e-4
            pu2 = pu.square()
            # Division by zero at u = 0 lands only in the discarded branch of the where.
            phi = torch.where(small, pu2.mul(-1.0 / 6.0).add_(1.0), sn.div_(pu))
            if not need_du:
                return phi, None, z, None, None
            # (cos πu − sinc u)/u cancels for small u: its Taylor form there (−π²u/3 + π⁴u³/30).
            du = torch.where(small, pu2.mul_(-0.1).add_(1.0).mul_(u).mul_(-(math.pi**2) / 3.0), cs.sub_(phi).div_(u))
        elif spec.kind == "gaussian":
            phi = torch.exp(-math.pi * u.square())
            du = -2.0 * math.pi * u * phi
        else:
            au = u.abs()
            inner = au < 1
            phi = torch.where(inner, 2.0 / 3.0 - au.square() + 0.5 * au.pow(3), (2.0 - au).clamp(min=0).pow(3) / 6.0)
            du = torch.where(inner, -2.0 * u + 1.5 * u * au, -0.5 * (2.0 - au).clamp(min=0).square() * torch.sign(u))
        dz = torch.full_like(w, c)
        return phi, du, z, dz, -dz
    k = torch.arange(k0, k0 + w.shape[0], device=s.device, dtype=s.dtype)  # k − 1, zero-based
    if spec.kind == "fourier":
        dz = math.pi * k / (2.0 * spec.L)
        z = (s + spec.L) * dz
        u = w * z
        sn, cs = _sincos_uniform(s, w * dz, w * dz * spec.L)
        return cs, -sn, z, dz, None
    if spec.kind == "polynomial":
        z = (s / spec.L).expand(-1, w.shape[0])
        u = w * z
        n = k.long()
        phi = torch.stack([torch.ones_like(u[:, 0]) if int(j) == 0 else u[:, i].pow(int(j)) for i, j in enumerate(n)], 1)
        du = torch.stack([torch.zeros_like(u[:, 0]) if int(j) == 0 else int(j) * u[:, i].pow(int(j) - 1)
                          for i, j in enumerate(n)], 1)
        return phi, du, z, torch.full_like(w, 1.0 / spec.L), None
    raise ValueError(f"unknown basis {spec.kind!r}; choose one of {BASES}")


def _sincos_uniform(s, c, d):
    """(sin θ, cos θ) of θ_mk = c_k s_m + d_k for s [M, 1] uniformly spaced (every table's grid), by
    angle addition over blocks of ~√M points: ~2√M·K sin/cos evaluations instead of 2M·K, to a few
    ulp of the direct form (sin/cos dominate the table's cost otherwise)."""
    n = s.shape[0]
    if n < 64:
        th = c * s + d
        return torch.sin(th), torch.cos(th)
    b = math.isqrt(n - 1) + 1
    q = -(-n // b)
    step = (s[-1, 0] - s[0, 0]) / (n - 1)
    base = s[0, 0] + step * b * torch.arange(q, dtype=s.dtype, device=s.device)
    ang_a = (c * base.unsqueeze(1) + d).unsqueeze(1)  # [q, 1, K]
    ang_r = (c * (step * torch.arange(b, dtype=s.dtype, device=s.device)).unsqueeze(1)).unsqueeze(0)  # [1, b, K]
    sa, ca, sr, cr = torch.sin(ang_a), torch.cos(ang_a), torch.sin(ang_r), torch.cos(ang_r)
    sn = (sa * cr).add_(ca * sr).reshape(q * b, -1)[:n]
    cs = (ca * cr).sub_(sa * sr).reshape(q * b, -1)[:n]
    return sn, cs


def _f64(a, rho, grid):
    a, rho, grid = a.detach().double(), rho.detach().double(), grid.detach().double()
    return a, torch.nn.functional.softplus(rho), grid, rho


def _sinc_kernels(spec: BasisSpec, s: torch.Tensor):
    """The compiled sinc table (lrlora._kernels: the same closed form, node by node, sin and cos by rotation), where
    it serves: the sinc basis, on CPU; else None (the PyTorch form below)."""
    if spec.kind != "sinc" or s.device.type != "cpu" or DEVICE_SIDE_TABLE_ON_CPU:
        return None
    return _kernels.get()


def _table_values(spec: BasisSpec, s, a, rho, grid) -> torch.Tensor:
    """σ(s) on the table's abscissae, float64, streamed over chunks of s (one M × K matrix-vector product)."""
    a, w, grid, _ = _f64(a, rho, grid)
    k = _sinc_kernels(spec, s)
    if k is not None:
        return k.sinc_table(s.contiguous(), a, w, grid.contiguous(), False)[0]
    return torch.cat([_basis_terms(spec, s[c].unsqueeze(1), w, grid, 0, need_du=False)[0] @ a for c in _table_chunks(s)])


def _table_derivative(spec: BasisSpec, s, a, rho, grid, keep: bool = False):
    """(σ'(s), σ(s), the basis per chunk or None), float64, in closed form: σ' = Σ_k a_k φ_k'(u) w_k dz_k/ds.
    keep: also return each chunk's (φ, dφ/du, z, dz/dgrid) for ``_table_param_grads``."""
    a, w, grid, _ = _f64(a, rho, grid)
    k = _sinc_kernels(spec, s)
    if k is not None:  # the parameter gradients evaluate the basis in the kernel too: nothing to keep
        vals, dvals = k.sinc_table(s.contiguous(), a, w, grid.contiguous(), True)
        return dvals, vals, None
    out, vals, kept = [], [], []
    for c in _table_chunks(s):
        phi, du, z, dz, dzg = _basis_terms(spec, s[c].unsqueeze(1), w, grid, 0)
        vals.append(phi @ a)
        out.append(du @ (a * w * dz))
        if keep:
            kept.append((phi, du, z, dzg))
    return torch.cat(out), torch.cat(vals), (kept if keep else None)


def _table_param_grads(spec: BasisSpec, s, hist, params, needs, terms=None):
    """Σ_m hist_m ∂σ(s_m)/∂θ for θ in (a, rho, grid), in closed form (σ = Σ_k a_k φ(w_k z_k(s))):
    ∂σ/∂a_k = φ_k, ∂σ/∂ρ_k = a_k φ_k'(u) z_k softplus'(ρ_k), ∂σ/∂grid_k = a_k φ_k'(u) w_k dz_k/dgrid_k.
    terms: the basis per chunk as ``_table_derivative(keep=True)`` returns it (else evaluated here)."""
    if not any(needs):
        return [None] * len(params)
    a, w, grid, rho = _f64(*params)
    ga, gw, gg = torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(a)
    k = _sinc_kernels(spec, s)
    if k is not None:  # sinc: z = s − x_k, dz/dgrid = −1
        sums = k.sinc_param_sums(s.contiguous(), hist.contiguous(), w, grid.contiguous())[0]
        ga, gw, gg = sums[0], sums[1], -sums[2]
    for j, c in enumerate(_table_chunks(s) if k is None else ()):
        if terms is not None:
            phi, du, z, dzg = terms[j]
        else:
            phi, du, z, _, dzg = _basis_terms(spec, s[c].unsqueeze(1), w, grid, 0)
        h = hist[c]
        if needs[0]:
            ga += h @ phi
        hdu = h.unsqueeze(1) * du if (needs[1] or needs[2]) else None
        if needs[1]:
            gw += (hdu * z).sum(0)
        if needs[2] and dzg is not None:
            gg += hdu.sum(0) * dzg
    grads = (ga, gw * a * torch.sigmoid(rho), gg * a * w)
    return [g.to(p.dtype) if n else None for g, p, n in zip(grads, params, needs)]


class _SigmaTable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, table, a, rho, grid):
        ctx.save_for_backward(t)
        ctx.table = table
        return table.interp(t)

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        needs_p = ctx.needs_input_grad[2:]
        ctx.table.prepare_backward(needs_p)
        grad_t, hist = ctx.table.backward(t, g, need_t=ctx.needs_input_grad[0], need_hist=any(needs_p))
        grads_p = ctx.table.param_grads(hist, needs_p) if hist is not None else [None] * 3
        return grad_t, None, *grads_p


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
            # Chunks of k as in ``evaluate``: one chunk's graph holds at most EXACT_CHUNK_ELEMENTS
            # elements (a single k for large t), never numel × K.
            spec = ctx.spec
            chunk = max(1, min(spec.K, EXACT_CHUNK_ELEMENTS // max(1, t.numel())))
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
    return terms(spec, t.unsqueeze(-1), torch.nn.functional.softplus(rho[sl]), grid[sl], k0) @ a[sl]


def sigma(t: torch.Tensor, transfer, mode: str = "auto", table_size: int = 1024) -> torch.Tensor:
    """σ(t) for a transfer function (a ``lrlora.TransferFunction``: anything with ``spec``, ``a``, ``rho``, ``grid``).

    mode: "table" (fast path), "exact" (reference), or "auto": the table when t has more elements
    than a few tables (the table costs M·K basis evaluations whatever the size of t), else exact.
    On CPU a non-finite t, or one whose range would need an oversized table, always takes the exact
    path (so NaN/inf propagate as they would naively).
    """
    return sigma_with(t, transfer.spec, transfer.a, transfer.rho, transfer.grid, mode, table_size)


def sigma_with(t, spec: BasisSpec, a, rho, grid, mode: str = "auto", table_size: int = 1024) -> torch.Tensor:
    """``sigma`` with the transfer function's parameters passed explicitly (the fused layer's form)."""
    if mode not in ("auto", "table", "exact"):
        raise ValueError(f"mode must be 'auto', 'table' or 'exact', got {mode!r}")
    table = make_table(t, spec, a, rho, grid, table_size) if mode != "exact" else None
    if use_table(t, table, mode):
        return _SigmaTable.apply(t, table, a, rho, grid)
    return _SigmaExact.apply(t, spec, a, rho, grid)


def sigma_naive(t: torch.Tensor, transfer) -> torch.Tensor:
    """The broadcast form a · φ(w (t[..., None] − x_k)) summed over k: builds numel × K (benchmarks only)."""
    w = torch.nn.functional.softplus(transfer.rho)
    return terms(transfer.spec, t.unsqueeze(-1), w, transfer.grid, 0) @ transfer.a
