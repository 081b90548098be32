"""What the self-written baselines share: the wrapped linear layer, injection, save/load.

    class MyLinear(AdapterLinear):
        def delta_weight(self): ...
    @register("mine")
    class Mine(SelfWrittenAdapted):
        def make_layer(self, name, linear, r=8, dropout=0.0, **kw): return MyLinear(linear, dropout, ...)

Same shape as `lrlora`'s layer: the frozen `base_layer`, `delta_weight()`, `merge()`/`unmerge()`,
dropout on the adapter's input side only. Files: `adapter.safetensors` (adapter tensors, persistent
buffers such as rank masks, and the `modules_to_save` heads) + the `baselines_meta.json` kwargs;
frozen random bases are regenerated from their seed, not stored.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from baselines.core import AdaptedModel, alpha_or_default, is_head_param, matches_target
from lrlora.errors import AdapterError, ConfigError

WEIGHTS_FILE = "adapter.safetensors"


class AdapterLinear(nn.Module):
    """y = base_layer(x) + adapter(dropout(x)); merged: y = base_layer(x) with W0 + ΔW in place."""

    def __init__(self, base_layer: nn.Linear, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def weight(self):  # some model code reads `.weight` of a projection
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW, d_out × d_in."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update applied to (already dropped-out) x; low-rank methods override to skip the dense ΔW."""
        return F.linear(x, self.delta_weight().to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.adapter_forward(self.dropout(x))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            w += self.delta_weight().to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w -= self.delta_weight().to(w.dtype)
            self.merged = False


def kaiming_(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """LoRA's A init (kaiming-uniform, a=√5, i.e. U(±1/√fan_in)), optionally from a seeded generator."""
    bound = 1.0 / math.sqrt(t.shape[-1])
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


class LowRankLinear(AdapterLinear):
    """LoRA-shaped factors: A (r × d_in, kaiming), B (d_out × r, zero) and a scaling α/r."""

    def __init__(self, base_layer, r: int, lora_alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base_layer, dropout)
        self.r = r
        self.scaling = alpha_or_default(r, lora_alpha) / r
        w = base_layer.weight
        self.lora_A = nn.Parameter(kaiming_(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))


def inject(model: nn.Module, target_modules, make_layer) -> dict[str, AdapterLinear]:
    """Replace every nn.Linear whose name matches `target_modules` (PEFT's suffix rule) by make_layer(name, linear).

    All new layers are built before the first is put in, so a failing make_layer leaves the model unchanged."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches_target(n, target_modules)]
    if not names:
        raise ConfigError(f"no nn.Linear matches target_modules={list(target_modules)}")
    out = {name: make_layer(name, model.get_submodule(name)) for name in names}
    for name, layer in out.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return out


class SelfWrittenAdapted(AdaptedModel):
    """Body of the methods written here; a subclass gives `make_layer` (and optionally a schedule)."""

    def make_layer(self, name: str, linear: nn.Linear, **kwargs) -> AdapterLinear:
        raise NotImplementedError

    def _apply(self, model, target_modules=None, modules_to_save=None, **kwargs):
        if not target_modules:
            raise ConfigError(f"{self.method}: target_modules is required")
        layers = inject(model, target_modules, lambda n, lin: self.make_layer(n, lin, **kwargs))
        for p in model.parameters():  # after inject: a failure there leaves the model as it was
            p.requires_grad_(False)
        for layer in layers.values():
            for pname, p in layer.named_parameters():
                if not pname.startswith("base_layer."):
                    p.requires_grad_(True)
        for pname, p in model.named_parameters():
            if is_head_param(pname, modules_to_save):
                p.requires_grad_(True)
        return model

    def layers(self) -> dict[str, AdapterLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, AdapterLinear)}

    @torch.no_grad()
    def delta_weights(self):
        return {n: m.delta_weight().detach().float().clone() for n, m in self.layers().items()}

    def merge(self) -> None:
        for m in self.layers().values():
            m.merge()

    def unmerge(self) -> None:
        for m in self.layers().values():
            m.unmerge()

    def merge_and_unload(self) -> nn.Module:
        for name, m in self.layers().items():
            m.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, m.base_layer)
        return self.model

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Everything the adapter owns: its tensors outside `base_layer`, and the `modules_to_save` heads."""
        names = list(self.layers())
        state = {}
        for k, v in self.model.state_dict().items():
            rest = next((k[len(n) + 1:] for n in names if k.startswith(n + ".")), None)
            own = rest is not None and not rest.startswith("base_layer.")
            if own or is_head_param(k, self.modules_to_save):
                state[k] = v.detach().contiguous().clone()
        return state

    def _save_files(self, directory: Path) -> None:
        save_file(self.adapter_state(), str(directory / WEIGHTS_FILE))

    @classmethod
    def _load(cls, base_model, directory, kwargs):
        path = Path(directory) / WEIGHTS_FILE
        try:  # read (and so check) the file before the model changes
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for a truncated file
            raise AdapterError(f"{path} is missing or unreadable ({str(e)[:200]}); re-save the adapter") from None
        self = cls(base_model, **kwargs)  # rebuilds the structure (and the seeded frozen bases)
        missing = set(self.adapter_state()) - set(state)
        if missing:
            raise AdapterError(f"{directory}: missing adapter tensors {sorted(missing)[:5]}")
        unexpected = self.model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise AdapterError(f"{directory}: tensors this {cls.method} model does not have: {unexpected[:5]}")
        return self
