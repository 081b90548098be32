"""LRLoRAConfig: every knob of LR-LoRA, with its source in the paper or marked **open**.

    from lrlora import LRLoRAConfig, apply_lrlora
    model = apply_lrlora(model, LRLoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))

Names follow PEFT where PEFT has one (``r``, ``target_modules``, ``layers_to_transform``,
``modules_to_save``) and the paper's symbols otherwise (``K``, ``L``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from lrlora.basis import BASES
from lrlora.errors import ConfigError

SHARING = ("none", "bandwidth", "amplitude", "grid", "all")
SHARE_BY = ("model", "module_type")


@dataclass
class LRLoRAConfig:
    r: int = 8
    """Base rank of B (d_out×r) and A (r×d_in). Paper: 16/32/64 (Table 1), 4 (GLUE, Table 2); Table 12 sweeps 4-64."""

    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names to adapt. A list matches a module whose name equals an entry or ends with ``.entry``;
    a string is a regex matched against the full name (as in PEFT). Default: App. E.1's decoder set.
    This is also the placement filter by module type (attention-only / MLP-only, Table 23)."""

    layers_to_transform: list[int] | str | None = None
    """Placement by depth (Table 23): None/"all", "odd", "even", "first:N", "last:N", or a list of layer indices."""

    K: int = 50
    """Number of basis functions (Table 10: 50; Table 3 / F.1 sweep 10, 25, 50, 100)."""

    L: float = 3.0
    """Basis centres x_k evenly spaced on [−L, L] (Table 10: 3)."""

    basis: str = "sinc"
    """Transfer-function family: sinc (paper default), gaussian, bspline, fourier, polynomial (Table 13)."""

    dropout: float = 0.0
    """Input-side dropout on the adapter path (Table 10: 0.05 LLMs, 0.10 GLUE, 0.0 vision). With p > 0 in
    training the layer needs the adapter path apart from W0 (docs/SOURCES.md, 'Dropout and the merged forward');
    lrlora.fused computes it as one dense matmul plus a correction over the dropped entries for p ≤ 0.15 (CPU)."""

    init_B: str = "kaiming"
    """**open**, and a deviation from the paper's init read literally (B = 0, as in LoRA; docs/SOURCES.md): B Kaiming-uniform like A.
    ΔW = σ(BA) is still 0 at init, because a = 0 makes σ ≡ 0. With B = 0 instead, BA ≡ 0 and the grid is
    symmetric about 0, so every pair a_k, a_{-k} gets the same gradient, σ stays even, σ'(0) = 0 and B never
    receives a gradient: ΔW stays the rank-one σ(0)·11ᵀ (measured in the README: chance accuracy on the demo).
    "zero" reproduces that reconstruction."""

    amplitude_init: str = "zero"
    """a_k init: "zero" (Table 10, gives ΔW = 0 at init) or "random" (Table 3's ablation)."""

    amplitude_init_std: float = 1e-3
    """Std of the "random" amplitude init. **open**: the paper says "small random" only."""

    bandwidth_init: float = 1.0
    """Initial w_k = softplus(ρ_k) (Table 10: 1.0, i.e. ρ = log(e − 1))."""

    learn_bandwidth: bool = True
    """Learn w_k (default) or fix w ≡ bandwidth_init (Table 3 'Fixed' ablation)."""

    learn_grid: bool = False
    """Learn the centres x_k. **open**: implied by Table 20's 'share grid points'; off by default."""

    center: bool = False
    """**open**: use σ(x) − σ(0), removing the constant offset σ(0)·11ᵀ that appears once a ≠ 0. Paper: off."""

    pre_scale: float = 1.0
    """**open**: ΔW = σ(pre_scale · BA). The paper applies no α/r."""

    post_scale: float = 1.0
    """**open**: ΔW = post_scale · σ(BA)."""

    share: str = "none"
    """Tie transfer parameters across modules (Table 20): none (per-module, default), bandwidth, amplitude,
    grid (needs learn_grid), all."""

    share_by: str = "model"
    """Scope of sharing: "model" (one σ everywhere) or "module_type" (one σ per module name, e.g. all q_proj)."""

    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules left trainable and saved with the adapter (e.g. ["classifier"] for a new task head)."""

    fast: bool = True
    """σ through the tabulated fast path (default) or the exact chunked path (lrlora.ops)."""

    table_size: int = 1024
    """Minimum table points of the fast path (more are used automatically when σ oscillates faster)."""

    def __post_init__(self):
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.basis not in BASES:
            raise ConfigError(f"unknown basis {self.basis!r}; choose one of {', '.join(BASES)}")
        if self.share not in SHARING:
            raise ConfigError(f"unknown sharing scope {self.share!r}; choose one of {', '.join(SHARING)}")
        if self.share_by not in SHARE_BY:
            raise ConfigError(f"unknown share_by {self.share_by!r}; choose one of {', '.join(SHARE_BY)}")
        if self.share == "grid" and not self.learn_grid:
            raise ConfigError("share='grid' ties learnable grids; set learn_grid=True (fixed grids are identical already)")
        if self.init_B not in ("kaiming", "zero"):
            raise ConfigError(f"init_B must be 'kaiming' or 'zero', got {self.init_B!r}")
        if self.center and self.amplitude_init == "zero" and self.init_B == "zero":
            # σ(BA) − σ(0) with a = 0 and B = 0: ∂ΔW/∂a_k = φ_k(0) − φ_k(0) = 0 and σ' ≡ 0, so no
            # parameter ever receives a gradient and ΔW stays 0 for good.
            raise ConfigError(
                "center=True with amplitude_init='zero' and init_B='zero' never trains (every gradient is zero "
                "at init); use init_B='kaiming' or amplitude_init='random'"
            )
        for name in ("r", "K", "table_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name} must be an integer, got {v!r}")
        for name in ("L", "dropout", "pre_scale", "post_scale", "bandwidth_init", "amplitude_init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
        if self.amplitude_init not in ("zero", "random"):
            raise ConfigError(f"amplitude_init must be 'zero' or 'random', got {self.amplitude_init!r}")
        if int(self.K) < 2:
            raise ConfigError(f"K must be >= 2 (at least two basis functions), got {self.K}")
        if int(self.r) < 1:
            raise ConfigError(f"r must be a positive integer, got {self.r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.bandwidth_init <= 0:
            raise ConfigError(f"bandwidth_init must be > 0, got {self.bandwidth_init}")
        if self.L <= 0:
            raise ConfigError(f"L must be > 0, got {self.L}")
        if not self.target_modules:
            raise ConfigError("target_modules is empty: name the linear layers to adapt, e.g. ['q_proj', 'v_proj']")
        _check_layers(self.layers_to_transform)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LRLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown LRLoRAConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


_LAYER_SPEC = re.compile(r"^(all|odd|even|first:\d+|last:\d+)$")


def _check_layers(spec):
    if spec is None or isinstance(spec, (list, tuple)):
        return
    if isinstance(spec, int):
        return
    if not _LAYER_SPEC.match(str(spec)):
        raise ConfigError(f"layers_to_transform={spec!r}: use None, 'all', 'odd', 'even', 'first:N', 'last:N' or a list of ints")


def resolve_layers(spec, num_layers: int) -> set[int] | None:
    """The set of layer indices a placement spec selects, or None for all layers."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, int):
        return {spec}
    if isinstance(spec, (list, tuple)):
        return {int(i) for i in spec}
    if spec == "odd":
        return set(range(1, num_layers, 2))
    if spec == "even":
        return set(range(0, num_layers, 2))
    kind, n = spec.split(":")
    n = int(n)
    return set(range(min(n, num_layers))) if kind == "first" else set(range(max(0, num_layers - n), num_layers))
