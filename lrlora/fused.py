"""The whole LR-LoRA linear as one autograd function that keeps what LoRA keeps.

    y = x (W0 + ΔW)ᵀ + b                          merged form (dropout 0, or eval)
    y = x W0ᵀ + b + (m ⊙ x / (1 − p)) ΔWᵀ         two-path form (dropout p > 0 in training, mask m)
    ΔW = post · (σ(pre · B A) − [center] σ(0))

Through plain autograd every layer keeps t = BA (fp32, for σ's backward) and the merged weight
W0 + ΔW (for the matmul's backward) until its backward runs, i.e. two dense matrices per adapted
layer for the whole depth. This function saves only the input x, the dropout mask (bool) when p > 0,
and references to the parameters; its backward recomputes BA, σ and σ'. The extra memory is then a few
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

σ is fp32 whatever the base dtype; ΔW is cast to the base dtype for the merged matmul exactly as the
reference layer does (``LRLoRALinear.forward_reference``), so the two agree to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lrlora.ops import make_table, sigma_with, use_table
from lrlora.transfer import BasisSpec, evaluate


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


class LRLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, a, rho, grid, ds: DeltaSpec, mask, drop_scale: float):
        with torch.autocast(x.device.type, enabled=False):  # σ in fp32, never autocast to half
            t = _lowrank(A, B, ds)
            table = make_table(t, ds.spec, a.detach(), rho.detach(), grid.detach(), ds.table_size) if ds.mode != "exact" else None
            if use_table(t, table, ds.mode):
                dw = _finish_delta(table.interp(t), a, rho, grid, ds)
            else:
                dw = delta_weight(A.detach(), B.detach(), a.detach(), rho.detach(), grid.detach(), ds)
            del t
        if mask is None:
            y = F.linear(x, _merged_weight(weight.detach(), dw), bias)
        else:
            y = F.linear(x, weight, bias) + F.linear(x * mask * drop_scale, dw.to(x.dtype))
        ctx.save_for_backward(x, weight, A, B, a, rho, grid, mask)
        ctx.ds, ctx.drop_scale, ctx.has_bias = ds, drop_scale, bias is not None
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
        xd = x2 if mask is None else x2 * mask.reshape(-1, d_in) * drop_scale
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        grads_p = [None, None, None]
        with torch.autocast(x.device.type, enabled=False):
            t = _lowrank(A, B, ds)
            table = make_table(t, ds.spec, a.detach(), rho.detach(), grid.detach(), ds.table_size) if ds.mode != "exact" else None
            if use_table(t, table, ds.mode):
                if need_sigma:
                    gdw = (g2.t() @ xd.to(cdt)).to(t.dtype).contiguous()  # the dense ΔW gradient, as autograd makes it
                    if ds.post_scale != 1.0:
                        gdw.mul_(ds.post_scale)
                    total = gdw.sum(dtype=torch.float64) if ds.center and any(needs_p) else None
                    table.prepare_backward(needs_p)
                    # One pass over t: σ'·G_ΔW, the histogram, and σ(t) written over G_ΔW for grad_x.
                    grad_t, hist = table.backward(t, gdw, need_t=need_A or need_B, need_hist=any(needs_p),
                                                  val_into_g=need_x)
                    del t
                    if need_x:
                        grad_x = _grad_input(g2, weight, _finish_delta(gdw, a, rho, grid, ds), mask, drop_scale, cdt)
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
                    grad_x = _grad_input(g2, weight, _finish_delta(table.interp(t), a, rho, grid, ds), mask,
                                         drop_scale, cdt)
            else:
                grad_x, grad_A, grad_B, grads_p = _backward_autograd(g2, xd, weight, A, B, a, rho, grid, ds, mask,
                                                                     drop_scale, cdt, ctx.needs_input_grad)
        if need_x:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if need_w:
            # W0 is frozen in LR-LoRA; a user who unfreezes it gets the plain linear's gradient.
            grad_w = (g2.t() @ x2.to(cdt)).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0).to(g.dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, *grads_p, None, None, None


def _grad_input(g2, weight, dw, mask, drop_scale, cdt):
    if mask is None:
        return g2 @ _merged_weight(weight.detach(), dw).to(cdt)
    gx = (g2 @ dw.to(cdt)).mul_(mask.reshape(-1, weight.shape[1])).mul_(drop_scale)
    return gx.add_(g2 @ weight.detach().to(cdt))


def _add_center_grads(grads_p, c, a, rho, grid, needs_p, ds):
    """Add −c · ∂σ(0)/∂θ (the center term's gradient; c = Σ G_ΔW)."""
    leaves = [p.detach().double().requires_grad_(bool(n)) for p, n in zip((a, rho, grid), needs_p)]
    wanted = [x for x in leaves if x.requires_grad]
    with torch.enable_grad():
        z = torch.zeros(1, dtype=torch.float64, device=a.device)
        extra = iter(torch.autograd.grad(evaluate(ds.spec, z, *leaves), wanted, -c.reshape(1), allow_unused=True))
    out = []
    for gp, p, n in zip(grads_p, (a, rho, grid), needs_p):
        if n:
            e = next(extra)
            gp = gp if e is None else gp + e.to(p.dtype)
        out.append(gp)
    return out


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
