"""The whole LR-LoRA linear as one autograd function that keeps what LoRA keeps.

    y = x (W0 + ΔW)ᵀ + b                          merged form (dropout 0, or eval)
    y = x W0ᵀ + b + (m ⊙ x / (1 − p)) ΔWᵀ         two-path form (dropout p > 0 in training, mask m)
    ΔW = post · (σ(pre · B A) − [center] σ(0))

Through plain autograd every layer keeps t = BA (fp32, for σ's backward) and the merged weight
W0 + ΔW (for the matmul's backward) until its backward runs, i.e. two dense matrices per adapted
layer for the whole depth. This function saves only the input x, what it needs of dropout when p > 0
(the bool mask, or the dropped entries' positions in the sparse-correction form below), and references
to the parameters; its backward recomputes BA, σ and σ'. The extra memory is then a few
dense matrices of the one layer being differentiated, whatever the depth.

Backward, table path (the default for large matrices), with at most three fp32 d_out × d_in matrices
alive at once (t, G_ΔW, grad_t):
  1. t = pre·BA; G_ΔW = post · Gᵀ X̃ (X̃ the dropped input), the inherent dense gradient (App. C).
  2. one fused pass over t: grad_t = pre · G_ΔW ⊙ σ'(t), the histogram that gives the a, ρ (grid)
     gradients, and σ(t) written over G_ΔW once read.
  3. ΔW → W_eff = W0 + ΔW in place; grad_x = G W_eff (two-path: G W0 + m ⊙ (G ΔW)/(1 − p)).
  4. grad_B = grad_t Aᵀ, grad_A = Bᵀ grad_t.
Where the table cannot serve (mode "exact", small matrices under "auto", a range too wide on CPU), the
backward recomputes ΔW through the σ op under autograd instead (same values, more transient memory).

Dropout in the sparse-correction form (CPU, fp32 base weight, p ≤ _SPARSE_DROPOUT_MAX). With s = 1/(1 − p)
and D = (1 − m) ⊙ x the dropped entries (a fraction p of x), x̃ = s (x − D), so
    y      = x (W0 + s ΔW)ᵀ + b − s · D ΔWᵀ
    grad_x = g (W0 + s ΔW) − s · (1 − m) ⊙ (g ΔW)        (g ΔW sampled at the dropped entries only)
    G_ΔW   = s · (gᵀ x − gᵀ D)
one dense matmul forward and two backward, as in the merged form, plus three products that touch only
the dropped entries (an embedding-bag gather forward, a sampled matmul and an embedding-bag for gᵀD
backward): at p = 0.05 they cost ~10–20% of a dense matmul each, where the two-path form pays two more
dense matmuls (step times: benchmarks/results/train_step.json, lrlora_d05). Dropout's draw is then the
dropped entries' flat positions (``draw_dropout``: geometric gaps, the law of one Bernoulli(p) per entry,
O(p·numel) work instead of a mask), which is also what the backward keeps: 8·p bytes per element of x
against the mask's 1.

σ is fp32 whatever the base dtype; ΔW is cast to the base dtype for the merged matmul exactly as the
reference layer does (``LRLoRALinear.forward_reference``), so the two agree to rounding.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lrlora.basis import BasisSpec, evaluate
from lrlora.ops import _kernels_for, make_table, sigma_with, use_table


@dataclass(frozen=True)
class DeltaSpec:
    """The static part of ΔW = post · (σ(pre · BA) − [center] σ(0))."""

    spec: BasisSpec
    pre_scale: float = 1.0
    post_scale: float = 1.0
    center: bool = False
    mode: str = "auto"
    table_size: int = 1024


def sigma_at_zero(spec: BasisSpec, a, rho, grid) -> torch.Tensor:
    """σ(0), float64 exact (as the reference layer's center term, a one-element σ-op call, computes it)."""
    z = torch.zeros(1, dtype=torch.float64, device=a.device)
    return evaluate(spec, z, a.double(), rho.double(), grid.double())


def delta_weight(A, B, a, rho, grid, ds: DeltaSpec) -> torch.Tensor:
    """ΔW through the σ op (differentiable by autograd): the reference form."""
    t = B @ A
    if ds.pre_scale != 1.0:
        t = t * ds.pre_scale
    dw = sigma_with(t, ds.spec, a, rho, grid, ds.mode, ds.table_size)
    if ds.center:
        dw = dw - sigma_with(t.new_zeros(1), ds.spec, a, rho, grid, ds.mode, ds.table_size)
    if ds.post_scale != 1.0:
        dw = dw * ds.post_scale
    return dw


def _lowrank(A, B, ds: DeltaSpec) -> torch.Tensor:
    t = B.detach() @ A.detach()
    if ds.pre_scale != 1.0:
        t.mul_(ds.pre_scale)
    return t


def _finish_delta(val: torch.Tensor, a, rho, grid, ds: DeltaSpec) -> torch.Tensor:
    """In place: σ(t) → post · (σ(t) − [center] σ(0))."""
    if ds.center:
        val.sub_(sigma_at_zero(ds.spec, a.detach(), rho.detach(), grid.detach()).to(val.dtype))
    if ds.post_scale != 1.0:
        val.mul_(ds.post_scale)
    return val


def _merged_weight(weight: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """W0 + ΔW in W0's dtype, as the reference computes it (``weight + dw.to(weight.dtype)``); reuses dw's
    memory when the dtypes agree."""
    if dw.dtype == weight.dtype:
        return dw.add_(weight)
    return weight + dw.to(weight.dtype)


class _Workspace(threading.local):
    """Scratch matrices the fused op reuses on CPU, across layers and steps: two d_out × d_in matrices as large as
    the largest adapted one (t = BA, then grad_t over it, then ΔWᵀ; σ(t), then ΔW and the merged weight over it,
    and G_ΔW in the backward), and with dropout one input-sized buffer (the dropped input X̃). A fresh allocation of that size is a fresh mapping whose pages fault in on first
    touch (glibc returns large freed blocks to the system): on the measured machine that cost more than the
    arithmetic on such a matrix (docs/performance.md). Nothing here outlives one call of the op (no output,
    nothing saved for backward). Per thread and dtype; ``release_workspace()`` frees the calling thread's. GPUs
    have a caching allocator and take fresh tensors."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, slot: str, shape, like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        key = (slot, like.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            self.buffers[key] = buf = torch.empty(n, dtype=like.dtype)
        return buf[:n].view(shape)


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free the fused op's scratch matrices held for the calling thread (they come back on its next call)."""
    _WORKSPACE.buffers.clear()


def _compiled(x, weight, A):
    """The compiled CPU kernels, where the fused op's fast CPU form serves: x, W0 and the adapter in one float
    dtype (fp32 or fp64), no autocast; else None (the general form below)."""
    if not (x.device.type == "cpu" and x.dtype == weight.dtype == A.dtype and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu")):
        return None
    return _kernels_for(x)


def _sigma_zero(ds: DeltaSpec, a, rho, grid) -> float:
    """σ(0) for the centre term (0 without it): the table's closed form at the single node 0."""
    if not ds.center:
        return 0.0
    from lrlora.ops import _table_values

    return float(_table_values(ds.spec, torch.zeros(1, dtype=torch.float64, device=a.device), a, rho, grid)[0])


def _lowrank_into(A, B, ds: DeltaSpec) -> torch.Tensor:
    t = torch.mm(B.detach(), A.detach(), out=_WORKSPACE.get("t", (B.shape[0], A.shape[1]), A))
    if ds.pre_scale != 1.0:
        t.mul_(ds.pre_scale)
    return t


def _merge_into(k, dw, weight, c0, ds: DeltaSpec, pos, s):
    """dw holds σ(t): turn it into the merged weight W0 + s·ΔW in place, and return ΔWᵀ (one contiguous row per
    input, in the workspace's other matrix, t's, which is spent by now) where there are dropped entries."""
    base = weight.detach().contiguous()
    if pos is None or not pos.numel():
        k.finish_delta(dw, base, dw, c0, ds.post_scale, s)
        return None
    k.finish_delta(dw, None, None, c0, ds.post_scale, 1.0)  # ΔW
    dwt = _WORKSPACE.get("t", (dw.shape[1], dw.shape[0]), dw).copy_(dw.t())
    k.finish_delta(dw, base, dw, 0.0, 1.0, s)  # W0 + s·ΔW
    return dwt


def _forward_compiled(k, x, weight, bias, t, table, c0, ds: DeltaSpec, pos, s):
    """The merged form (pos None) or the sparse-correction form in two workspace matrices: ΔW = σ(t) by the table,
    the merged weight W0 + sΔW over it, and − s · D ΔWᵀ over the dropped entries (a compiled kernel)."""
    d_out, d_in = weight.shape
    dw = _WORKSPACE.get("delta", t.shape, t)
    k.interp_into(t, table.vals, table.lo, table.inv, dw)
    dwt = _merge_into(k, dw, weight, c0, ds, pos, s)
    y = F.linear(x, dw, bias)
    if dwt is not None:
        k.drop_forward(y.view(-1, d_out), x.reshape(-1, d_in).contiguous(), dwt, pos, -s)
    return y


def _backward_compiled(k, ctx, g2, x2, weight, A, B, a, rho, grid, pos, s, needs):
    """The backward of ``_forward_compiled``, with its table, in the same two workspace matrices: G_ΔW = gᵀ X̃ (X̃
    the dropped input), one pass over t for σ'·G_ΔW (written over t), the histogram and σ(t) (over G_ΔW), then the
    merged weight, and the input gradient with − s · (1 − m) ⊙ (g ΔW) at the dropped entries only (a compiled
    kernel). Returns grad_x, grad_A, grad_B, [grad_a, grad_rho, grad_grid]."""
    ds, table, c0 = ctx.ds, ctx.table, ctx.c0
    need_x, need_A, need_B, needs_p = needs[0], needs[3], needs[4], needs[5:8]
    grad_x = grad_A = grad_B = None
    grads_p = [None, None, None]
    t = _lowrank_into(A, B, ds)
    gdw = _WORKSPACE.get("delta", t.shape, t)
    if need_A or need_B or any(needs_p):
        xd = x2
        if pos is not None:  # X̃ = s · x with the dropped entries zeroed: Gᵀ X̃ is then one dense product
            xd = torch.mul(x2, s, out=_WORKSPACE.get("input", x2.shape, x2))
            xd.view(-1).index_fill_(0, pos, 0.0)
        torch.mm(g2.t(), xd, out=gdw)
        del xd
        if ds.post_scale != 1.0:
            gdw.mul_(ds.post_scale)
        total = gdw.sum(dtype=torch.float64) if ds.center and any(needs_p) else None
        table.prepare_backward(needs_p)
        grad_t = t if (need_A or need_B) else None  # written over t, block by block, once read
        dtab = table.dvals if grad_t is not None else table.vals
        hist = k.interp_backward_into(t, gdw, table.vals, dtab, table.lo, table.inv, grad_t, need_x, any(needs_p))
        if grad_t is not None:
            if ds.pre_scale != 1.0:
                grad_t.mul_(ds.pre_scale)
            grad_A = B.t() @ grad_t if need_A else None
            grad_B = grad_t @ A.t() if need_B else None
        if hist is not None and hist.numel():
            grads_p = table.param_grads(hist, needs_p)
            if total is not None:
                grads_p = _add_center_grads(grads_p, total, a, rho, grid, needs_p, ds)
    elif need_x:
        k.interp_into(t, table.vals, table.lo, table.inv, gdw)
    if need_x:  # gdw holds σ(t): ΔW, the merged weight over it, the input gradient
        dwt = _merge_into(k, gdw, weight, c0, ds, pos, s)
        grad_x = g2 @ gdw
        if dwt is not None:
            k.drop_grad_input(grad_x, g2.contiguous(), dwt, pos, -s)
    return grad_x, grad_A, grad_B, grads_p


class LRLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, a, rho, grid, ds: DeltaSpec, mask, drop_scale: float):
        # mask: None, the bool keep-mask, or the dropped entries' flat positions (``draw_dropout``); the
        # sparse form keeps positions (8 bytes × p per element of x), the two-path form the bool mask.
        # (and σ's dtype the base's: an fp32 adapter on an fp64 base takes the two-path form)
        sparse = mask is not None and _sparse_dropout(x, weight, drop_scale) and A.dtype == weight.dtype
        if mask is not None:
            mask = _as_positions(mask) if sparse else _as_keep_mask(mask, x)
        k = _compiled(x, weight, A) if (mask is None or sparse) else None
        y = None
        with torch.autocast(x.device.type, enabled=False):  # σ in fp32, never autocast to half
            t = _lowrank_into(A, B, ds) if k is not None else _lowrank(A, B, ds)
            table = make_table(t, ds.spec, a.detach(), rho.detach(), grid.detach(), ds.table_size) if ds.mode != "exact" else None
            if not use_table(t, table, ds.mode):
                table, k = None, None
                dw = delta_weight(A.detach(), B.detach(), a.detach(), rho.detach(), grid.detach(), ds)
            elif k is not None:
                ctx.c0 = _sigma_zero(ds, a, rho, grid)
                y = _forward_compiled(k, x, weight, bias, t, table, ctx.c0, ds, mask, drop_scale if sparse else 1.0)
            else:
                dw = _finish_delta(table.interp(t), a, rho, grid, ds)
            del t
        if y is not None:
            pass
        elif mask is None:
            y = F.linear(x, _merged_weight(weight.detach(), dw), bias)
        elif sparse:
            y = _forward_sparse(x, weight.detach(), bias, dw, _dropped(mask, x.numel() // x.shape[-1], x.shape[-1]),
                                drop_scale)
        else:
            y = F.linear(x, weight, bias) + F.linear(x * mask * drop_scale, dw.to(x.dtype))
        ctx.save_for_backward(x, weight, A, B, a, rho, grid, mask)
        ctx.ds, ctx.drop_scale, ctx.has_bias, ctx.sparse = ds, drop_scale, bias is not None, sparse
        # The table of this forward serves the backward (t = BA is recomputed bit for bit): a few kB per layer.
        ctx.table, ctx.compiled = table, k is not None
        ctx.ydtype = y.dtype  # the matmul's compute dtype (differs from x's under autocast)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, A, B, a, rho, grid, mask = ctx.saved_tensors
        ds, drop_scale = ctx.ds, ctx.drop_scale
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        needs_p = ctx.needs_input_grad[5:8]
        need_sigma = need_A or need_B or any(needs_p)
        cdt = ctx.ydtype
        d_out, d_in = weight.shape
        g2 = g.reshape(-1, d_out).to(cdt)
        x2 = x.reshape(-1, d_in)
        sparse = ctx.sparse
        # The general form's dropped entries (rows, columns, row starts), once for both sparse products below.
        dropped = _dropped(mask, x2.shape[0], d_in) if sparse and not ctx.compiled else None

        def keep_mask():  # the bool keep-mask (None: no dropout), built only where a dense form needs it
            return _as_keep_mask(mask, x) if sparse else mask

        def dropped_input():  # x̃, likewise
            keep = keep_mask()
            return x2 if keep is None else x2 * keep.reshape(-1, d_in) * drop_scale

        grad_x = grad_w = grad_b = grad_A = grad_B = None
        grads_p = [None, None, None]
        with torch.autocast(x.device.type, enabled=False):
            table = ctx.table  # the forward's (None: the forward took the exact path)
            if ctx.compiled:
                grad_x, grad_A, grad_B, grads_p = _backward_compiled(
                    _kernels_for(x), ctx, g2, x2, weight, A, B, a, rho, grid, mask if sparse else None,
                    drop_scale if sparse else 1.0, ctx.needs_input_grad)
            elif table is not None:
                t = _lowrank(A, B, ds)
                if need_sigma:
                    if sparse:
                        gdw = _delta_grad_sparse(g2, x2, dropped, drop_scale)
                    else:
                        gdw = (g2.t() @ dropped_input().to(cdt)).to(t.dtype).contiguous()  # the dense ΔW gradient, as autograd makes it
                    if ds.post_scale != 1.0:
                        gdw.mul_(ds.post_scale)
                    total = gdw.sum(dtype=torch.float64) if ds.center and any(needs_p) else None
                    table.prepare_backward(needs_p)
                    # One pass over t: σ'·G_ΔW, the histogram, and σ(t) written over G_ΔW for grad_x.
                    grad_t, hist = table.backward(t, gdw, need_t=need_A or need_B, need_hist=any(needs_p),
                                                  val_into_g=need_x)
                    del t
                    if need_x:
                        dw = _finish_delta(gdw, a, rho, grid, ds)
                        grad_x = _grad_input_any(g2, weight, dw, mask, drop_scale, cdt, dropped)
                        del dw
                    del gdw
                    if hist is not None:
                        grads_p = table.param_grads(hist, needs_p)
                        if total is not None:
                            grads_p = _add_center_grads(grads_p, total, a, rho, grid, needs_p, ds)
                    if grad_t is not None:
                        if ds.pre_scale != 1.0:
                            grad_t.mul_(ds.pre_scale)
                        grad_A = B.t() @ grad_t if need_A else None
                        grad_B = grad_t @ A.t() if need_B else None
                elif need_x:
                    grad_x = _grad_input_any(g2, weight, _finish_delta(table.interp(t), a, rho, grid, ds), mask,
                                             drop_scale, cdt, dropped)
            else:
                grad_x, grad_A, grad_B, grads_p = _backward_autograd(g2, dropped_input(), weight, A, B, a, rho, grid, ds, keep_mask(),
                                                                     drop_scale, cdt, ctx.needs_input_grad)
        if need_x:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if need_w:
            # W0 is frozen in LR-LoRA; a user who unfreezes it gets the plain linear's gradient.
            grad_w = (g2.t() @ x2.to(cdt)).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0).to(g.dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, *grads_p, None, None, None


# The sparse-correction dropout form's limit: its products over the dropped entries grow with p, the
# two-path form's two extra dense matmuls do not. Measured (one LRLoRALinear forward + backward, 512 tokens,
# Qwen2-0.5B MLP shapes 4864→896 / 896→4864, CPU, 1 thread), sparse vs two-path: p = 0.1: 267 vs 300 ms,
# 217 vs 245 ms; p = 0.2: 308 vs 282 ms, 258 vs 250 ms. So it serves the paper's 0.05 (LLMs) and 0.10 (GLUE).
_SPARSE_DROPOUT_MAX = 0.15


def _sparse_dropout(x, weight, drop_scale: float) -> bool:
    """Whether the sparse-correction form serves: CPU (its sampled matmul is tested there only), one float
    dtype for x and W0 (it merges sΔW into W0, which in half precision would round ΔW to W0's scale,
    unlike the two-path reference), no autocast, and a dropout rate up to _SPARSE_DROPOUT_MAX."""
    p = 1.0 - 1.0 / drop_scale  # to rounding: 1 − 1/(1/(1 − 0.15)) is 0.15000000000000002
    return (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu") and 0.0 < p <= _SPARSE_DROPOUT_MAX + 1e-9)


def draw_dropout(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's draw for ``LRLoRALinearFunction`` (rate p > 0, training): where the sparse-correction form
    serves, the flat positions of the dropped entries of x (int64, ascending), drawn as geometric gaps
    between drops, which is the same law as one Bernoulli(p) per entry in O(p·numel) work; else the bool
    keep-mask."""
    if not _sparse_dropout(x, weight, 1.0 / (1.0 - p)):
        return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
    n, parts, last = x.numel(), [], -1.0
    while True:  # one pass almost always: the draw covers the expected count plus six standard deviations
        left = n - 1 - last
        k = int(left * p + 6.0 * math.sqrt(left * p * (1.0 - p)) + 16)
        pos = torch.empty(k, dtype=torch.float64, device=x.device).geometric_(p).cumsum_(0).add_(last)
        parts.append(pos)
        last = float(pos[-1])
        if last >= n - 1:
            break
    pos = torch.cat(parts)
    # pos ascends strictly (gaps ≥ 1): the entries below n are a prefix, found by one binary search
    return pos[: int(torch.searchsorted(pos, float(n)))].long()


def _as_positions(mask):
    return (~mask).reshape(-1).nonzero().squeeze(1) if mask.dtype == torch.bool else mask


def _as_keep_mask(mask, x):
    if mask is None or mask.dtype == torch.bool:
        return mask
    return torch.ones(x.shape, dtype=torch.bool, device=x.device).view(-1).index_fill_(0, mask, False).view(x.shape)


def _bag_offsets(sorted_keys, count):
    """Where each of 0..count-1 starts in ascending ``sorted_keys`` (embedding-bag offsets)."""
    return torch.searchsorted(sorted_keys, torch.arange(count, device=sorted_keys.device))


class _Dropped(NamedTuple):
    pos: torch.Tensor  # flat positions in x viewed as (n_rows, d_in), ascending
    rows: torch.Tensor
    cols: torch.Tensor
    row_starts: torch.Tensor  # where each row's entries start in pos (embedding-bag offsets)


def _dropped(pos, n_rows: int, d_in: int) -> _Dropped:
    rows = torch.div(pos, d_in, rounding_mode="floor")
    return _Dropped(pos, rows, pos % d_in, _bag_offsets(rows, n_rows))


def _forward_sparse(x, weight, bias, dw, dr: _Dropped, s):
    """y = x (W0 + sΔW)ᵀ + b − s · D ΔWᵀ, D the dropped entries of x; dw (fp32, the caller's) is consumed."""
    d_out, d_in = weight.shape
    x2 = x.reshape(-1, d_in)
    # D ΔWᵀ: row n sums the ΔW columns (rows of ΔWᵀ) of its dropped entries, weighted by their x.
    c = F.embedding_bag(dr.cols, dw.t().contiguous(), dr.row_starts, mode="sum",
                        per_sample_weights=x2.reshape(-1)[dr.pos])
    y = F.linear(x2, dw.mul_(s).add_(weight), bias)
    return y.sub_(c, alpha=s).reshape(*x.shape[:-1], d_out)


def _delta_grad_sparse(g2, x2, dr: _Dropped, s):
    """G_ΔW = s (gᵀx − gᵀD), d_out × d_in contiguous: one dense matmul and an embedding-bag over D's columns."""
    # Row i of (gᵀD)ᵀ sums x[n, i] · g[n] over the dropped entries (n, i) of column i: the entries in column order.
    order = torch.argsort(dr.cols, stable=True)
    gtd_t = F.embedding_bag(dr.rows[order], g2, _bag_offsets(dr.cols[order], x2.shape[1]), mode="sum",
                            per_sample_weights=x2.reshape(-1)[dr.pos[order]])
    return torch.addmm(gtd_t.t(), g2.t(), x2, beta=-s, alpha=s).contiguous()


def _grad_input_any(g2, weight, dw, mask, drop_scale, cdt, dropped: _Dropped | None):
    if dropped is not None:
        return _grad_input_sparse(g2, weight, dw, dropped, drop_scale)
    return _grad_input(g2, weight, dw, mask, drop_scale, cdt)


def _grad_input_sparse(g2, weight, dw, dr: _Dropped, s):
    """grad_x = g (W0 + sΔW) − s (1 − m) ⊙ (g ΔW): g ΔW only at the dropped entries (a sampled matmul);
    dw (the caller's) is consumed."""
    d_in = weight.shape[1]
    rows, cols, pos = dr.rows, dr.cols, dr.pos
    crow = torch.cat([dr.row_starts, rows.new_tensor([rows.numel()])])
    with warnings.catch_warnings():  # torch flags every CSR construction as beta; this one is tested here
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, dw.new_ones(rows.numel()), (g2.shape[0], d_in),
                                          check_invariants=False)  # valid by construction
    # ΔW as the transpose of a contiguous ΔWᵀ: the sampled matmul then reads ΔW's columns contiguously
    # (measured ~2x faster than from ΔW itself, the copy included).
    sampled = torch.sparse.sampled_addmm(pattern, g2, dw.t().contiguous().t(), beta=0.0).values()
    gx = g2 @ dw.mul_(s).add_(weight.detach())
    return gx.view(-1).index_add_(0, pos, sampled.mul_(-s)).view(gx.shape)


def _grad_input(g2, weight, dw, mask, drop_scale, cdt):
    if mask is None:
        return g2 @ _merged_weight(weight.detach(), dw).to(cdt)
    gx = (g2 @ dw.to(cdt)).mul_(mask.reshape(-1, weight.shape[1])).mul_(drop_scale)
    return gx.add_(g2 @ weight.detach().to(cdt))


def _add_center_grads(grads_p, c, a, rho, grid, needs_p, ds):
    """Add −c · ∂σ(0)/∂θ (the center term's gradient; c = Σ G_ΔW), in closed form: the table's parameter
    gradients (lrlora.ops) at the single node 0 with weight −c."""
    from lrlora.ops import _table_param_grads

    zero = torch.zeros(1, dtype=torch.float64, device=a.device)
    extra = _table_param_grads(ds.spec, zero, (-c).reshape(1), (a, rho, grid), needs_p)
    return [gp if e is None else gp + e for gp, e in zip(grads_p, extra)]


def _backward_autograd(g2, xd, weight, A, B, a, rho, grid, ds, mask, drop_scale, cdt, needs):
    """Recompute ΔW through the σ op under autograd (the exact path, or small matrices)."""
    leaves = [p.detach().requires_grad_(bool(n)) for p, n in zip((A, B, a, rho, grid), needs[3:8])]
    with torch.enable_grad():
        dw = delta_weight(*leaves, ds)
    grad_x = _grad_input(g2, weight, dw.detach().clone(), mask, drop_scale, cdt) if needs[0] else None
    wanted = [p for p in leaves if p.requires_grad]
    grads = [None] * 5
    if wanted:
        gdw = (g2.t() @ xd.to(cdt)).float()
        it = iter(torch.autograd.grad(dw, wanted, gdw, allow_unused=True))
        grads = [next(it) if p.requires_grad else None for p in leaves]
        grads = [torch.zeros_like(p) if (gr is None and p.requires_grad) else gr for gr, p in zip(grads, leaves)]
    return grad_x, grads[0], grads[1], grads[2:]
