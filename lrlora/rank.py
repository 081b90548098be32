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
def rank_report(model: nn.Module, top: int | None = 32) -> list[dict]:
    """Per adapted module: name, module type, layer index, shape, stable rank of ΔW and of BA,
    and ΔW's normalised singular values (the first ``top``; None for all)."""
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
            }
        )
    return rows
