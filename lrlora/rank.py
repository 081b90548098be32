"""Stable rank (paper Eq. 5) and the per-module rank report (Sec. 4.4, App. G.2)."""

from __future__ import annotations

import torch
from torch import nn

from lrlora.model import lrlora_modules
from lrlora.targets import layer_index


def stable_rank(m: torch.Tensor) -> float:
    """‖M‖_F² / ‖M‖_2²: a smooth lower bound on rank (1 for rank one). 0.0 for the zero matrix."""
    s = torch.linalg.svdvals(m.detach().float())
    return float((s.square().sum() / s[0].square()).item()) if s.numel() and s[0] > 0 else 0.0


def normalized_spectrum(m: torch.Tensor, top: int | None = None) -> list[float]:
    """Singular values divided by the largest (App. G.2), optionally only the first ``top``."""
    s = torch.linalg.svdvals(m.detach().float())
    s = s / s[0] if s.numel() and s[0] > 0 else s
    return s[:top].tolist() if top else s.tolist()


@torch.no_grad()
def mechanism(delta: torch.Tensor, r: int, sigma_arg: torch.Tensor | None = None) -> dict:
    """Whether a learned update uses more than its nominal rank, and how far LR-LoRA's σ is from affine.

    ``energy_beyond_r`` = Σ_{i>r} s_i² / Σ s_i² over ΔW's singular values: 0 for a rank-r update (LoRA's, always),
    and for LR-LoRA whenever σ is near-linear on the values it sees. With ``sigma_arg`` (LR-LoRA's argument of σ,
    pre_scale · BA): its ``t_absmax`` and ``t_rms``, ``ba_stable_rank`` (the stable rank of the argument, i.e. of BA:
    what ΔW's stable rank is measured against), and ``linear_residual`` = ‖ΔW − (c0·11ᵀ + c1·t)‖_F / ‖ΔW‖_F
    for the least-squares c0, c1 — 0 when σ acts as an affine map on those values, i.e. ΔW is LoRA's BA up to
    scale plus a constant. A zero ΔW gives 0.0 for both ratios (nothing learned, nothing beyond r)."""
    d = delta.detach().double()
    s2 = torch.linalg.svdvals(d).square()
    total = float(s2.sum())
    out = {"energy_beyond_r": float(s2[r:].sum()) / total if total > 0 else 0.0}
    if sigma_arg is not None:
        t = sigma_arg.detach().double().reshape(-1)
        y = d.reshape(-1)
        design = torch.stack([torch.ones_like(t), t], dim=1)
        coef = torch.linalg.lstsq(design, y.unsqueeze(1)).solution  # (c0, c1)
        resid = y - (design @ coef).squeeze(1)
        norm = float(y.norm())
        out.update(t_absmax=float(t.abs().max()), t_rms=float(t.square().mean().sqrt()),
                   ba_stable_rank=stable_rank(sigma_arg),
                   linear_residual=float(resid.norm()) / norm if norm > 0 else 0.0)
    return out


@torch.no_grad()
def rank_report(model: nn.Module, top: int | None = 32) -> list[dict]:
    """Per adapted module: name, module type, layer index, shape, stable rank of ΔW and of BA,
    ΔW's normalised singular values (the first ``top``; None for all), and the mechanism diagnostics
    (``mechanism``: energy beyond r, the range of σ's argument, the distance from an affine σ)."""
    rows = []
    for name, layer in lrlora_modules(model).items():
        dw = layer.delta_weight().float()
        rows.append(
            {
                "module": name,
                "module_type": name.rsplit(".", 1)[-1],
                "layer": layer_index(name),
                "shape": list(dw.shape),
                "stable_rank_delta": stable_rank(dw),
                "stable_rank_ba": stable_rank(layer.lowrank_product()),
                "singular_values": normalized_spectrum(dw, top),
                **mechanism(dw, layer.r, sigma_argument(layer)),
            }
        )
    return rows


def sigma_argument(layer) -> torch.Tensor:
    """LR-LoRA's argument of σ on one layer: pre_scale · B A (fp32)."""
    return layer.lowrank_product() * layer.pre_scale
