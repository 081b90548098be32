"""What the self-written baselines share: the adapted linear layer (lrlora's), injection, save/load.

    class MyLinear(AdaptedLinear):
        def delta_weight(self): ...
    @register("mine")
    class Mine(SelfWrittenAdapted):
        label = "Mine"
        @classmethod
        def parameters_per_module(cls, d_in, d_out, r=8, **_): return r * (d_in + d_out)
        def make_layer(self, name, linear, r=8, dropout=0.0, **kw): return MyLinear(linear, dropout, ...)

The layer is `lrlora.layer.AdaptedLinear`, LR-LoRA's own base: the frozen `base_layer`, `delta_weight()`,
`merge()`/`unmerge()`, dropout on the adapter's input side only. Files: `adapter.safetensors` (adapter tensors,
persistent buffers such as rank masks, and the `modules_to_save` heads) + the `baselines_meta.json` kwargs;
frozen random bases are regenerated from their seed, not stored.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from baselines.core import AdaptedModel, alpha_or_default, is_head_param
from lrlora.errors import AdapterError
from lrlora.layer import AdaptedLinear
from lrlora.targets import find_targets

WEIGHTS_FILE = "adapter.safetensors"


def kaiming_(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """LoRA's A init (kaiming-uniform, a=√5, i.e. U(±1/√fan_in)), optionally from a seeded generator."""
    bound = 1.0 / math.sqrt(t.shape[-1])
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


class LowRankLinear(AdaptedLinear):
    """LoRA-shaped factors: A (r × d_in, kaiming), B (d_out × r, zero) and a scaling α/r."""

    def __init__(self, base_layer, r: int, lora_alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base_layer, dropout)
        self.r = r
        self.scaling = alpha_or_default(r, lora_alpha) / r
        w = base_layer.weight
        self.lora_A = nn.Parameter(kaiming_(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))


def inject(model: nn.Module, target_modules, make_layer) -> dict[str, AdaptedLinear]:
    """Replace every nn.Linear whose name matches `target_modules` (PEFT's suffix rule) by make_layer(name, linear).

    All new layers are built before the first is put in, so a failing make_layer leaves the model unchanged."""
    out = {name: make_layer(name, linear) for name, linear in find_targets(model, target_modules, non_linear="skip")}
    for name, layer in out.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return out


class SelfWrittenAdapted(AdaptedModel):
    """Body of the methods written here; a subclass gives `make_layer` (and optionally a schedule)."""

    def make_layer(self, name: str, linear: nn.Linear, **kwargs) -> AdaptedLinear:
        raise NotImplementedError

    def _apply(self, model, target_modules=None, modules_to_save=None, **kwargs):
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

    def layers(self) -> dict[str, AdaptedLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, AdaptedLinear)}

    @torch.no_grad()
    def delta_weights(self):
        return {n: m.delta_weight().detach().float().clone() for n, m in self.layers().items()}

    def merge(self) -> None:
        for m in self.layers().values():
            if not m.merged:
                m.merge()

    def unmerge(self) -> None:
        for m in self.layers().values():
            if m.merged:
                m.unmerge()

    def merge_and_unload(self) -> nn.Module:
        self.merge()
        for name, m in self.layers().items():
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


class LowRankAdapted(SelfWrittenAdapted):
    """A self-written method on LoRA-shaped factors (its layers are LowRankLinear): LoRA's count, r·(d_in + d_out)."""

    @classmethod
    def parameters_per_module(cls, d_in, d_out, r=8, **_):
        return r * (d_in + d_out)
