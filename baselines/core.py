"""One adapter interface for every method: the registry, `apply_adapter`, `load_adapted`.

    from baselines import apply_adapter, load_adapted
    handle = apply_adapter(model, name="lora", r=8, target_modules=["query", "value"])
    ...train handle.model, calling handle.on_step(step, total_steps) after every optimizer step...
    handle.save("out/adapter"); handle2 = load_adapted(fresh_base_model, "out/adapter")

Every method is a subclass of `AdaptedModel` registered under its name with `@register`.
`save` writes the method's own files plus `baselines_meta.json` (method name + kwargs),
which is what `load_adapted` dispatches on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from lrlora.io import atomic_directory
from lrlora.model import matches_target  # noqa: F401  (PEFT's target rule, one definition for the repo)

META_FILE = "baselines_meta.json"

ADAPTERS: dict[str, Callable[..., AdaptedModel]] = {}


def register(name: str):
    """Class decorator: `@register("lora")` makes `apply_adapter(model, name="lora", ...)` build it."""

    def deco(cls):
        if name in ADAPTERS:
            raise ValueError(f"adapter {name!r} registered twice")
        cls.method = name
        ADAPTERS[name] = cls
        return cls

    return deco


def _lookup(name: str):
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[name]


def is_head_param(param_name: str, modules_to_save: Iterable[str] | None) -> bool:
    """True for parameters of a `modules_to_save` module (e.g. the classifier), under PEFT's wrapper too."""
    dotted = "." + param_name
    return any(f".{key}." in dotted for key in (modules_to_save or ()))


def alpha_or_default(r: int, alpha: float | None) -> float:
    """α defaults to 2r for every method here: the RandLoRA/LLM-Adapters harness the paper reuses (BASELINES.md)."""
    return 2 * r if alpha is None else alpha


def schedule_steps(value: float | int, total_steps: int) -> int:
    """A schedule point given as a step count, or as a fraction of the run when it is a float below 1."""
    return int(value * total_steps) if isinstance(value, float) and value < 1 else int(value)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class AdaptedModel:
    """A model with one adapter method applied; the harness talks only to this.

    Subclasses implement `_apply`, `delta_weights`, `merge_and_unload`, `_save_files`, `_load`.
    """

    method: str = "?"

    def __init__(self, model: nn.Module, **kwargs):
        self.name = self.method
        self.kwargs = dict(kwargs)
        self.modules_to_save = list(kwargs.get("modules_to_save") or [])
        # Counted before injection: PEFT's modules_to_save copies and the adapters are not backbone.
        self._total = count_parameters(model)
        self.model = self._apply(model, **kwargs)

    @classmethod
    def _bare(cls, base_model: nn.Module, kwargs: dict) -> AdaptedModel:
        """A handle with everything set except `.model` (for `_load`)."""
        self = cls.__new__(cls)
        self.name, self.kwargs = cls.method, dict(kwargs)
        self.modules_to_save = list(kwargs.get("modules_to_save") or [])
        self._total = count_parameters(base_model)
        return self

    # --- to implement -------------------------------------------------------------------------
    def _apply(self, model: nn.Module, **kwargs) -> nn.Module:
        raise NotImplementedError

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Module name -> dense ΔW (d_out × d_in, fp32, detached), the update the adapter adds to W0."""
        raise NotImplementedError

    def merge_and_unload(self) -> nn.Module:
        raise NotImplementedError

    def _save_files(self, directory: Path) -> None:
        raise NotImplementedError

    @classmethod
    def _load(cls, base_model: nn.Module, directory: Path, kwargs: dict) -> AdaptedModel:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        """Adapter parameters that train (heads in `modules_to_save` excluded): the '% trainable' numerator."""
        return sum(
            p.numel()
            for n, p in self.model.named_parameters()
            if p.requires_grad and not is_head_param(n, self.modules_to_save)
        )

    def total_parameters(self) -> int:
        """Backbone parameters, without adapters."""
        return self._total

    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_parameters() / self.total_parameters()

    def on_step(self, step: int, total_steps: int) -> None:
        """Called by the harness after every optimizer step, before `zero_grad` (AdaLoRA needs the grads)."""

    def extra_results(self) -> dict:
        """Method-specific facts for the results file (e.g. final per-layer ranks)."""
        return {}

    def save(self, directory: str | os.PathLike) -> None:
        """Write the adapter atomically: into a temp dir next to `directory`, then rename over it."""
        with atomic_directory(directory) as tmp:
            self._save_files(tmp)
            meta = {"name": self.name, "kwargs": _jsonable(self.kwargs)}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, trainable={self.trainable_parameters():,}, "
            f"total={self.total_parameters():,})"
        )


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def apply_adapter(model: nn.Module, name: str, **kwargs) -> AdaptedModel:
    """Adapt `model` in place with method `name` (kwargs = the adapter YAML minus `name`)."""
    return _lookup(name)(model, **kwargs)


def read_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / META_FILE
    peft_config = Path(directory) / "adapter_config.json"
    if not path.exists() and peft_config.exists():
        cfg = json.loads(peft_config.read_text())
        if "peft_type" in cfg:  # written by PEFT's save_pretrained outside the harness (e.g. a Trainer run)
            keys = ("r", "target_modules", "modules_to_save")
            return {"name": str(cfg["peft_type"]).lower(), "kwargs": {k: cfg[k] for k in keys if k in cfg}}
    return json.loads(path.read_text())


def load_adapted(base_model: nn.Module, directory: str | os.PathLike) -> AdaptedModel:
    """Rebuild the handle that `AdaptedModel.save(directory)` wrote, on a fresh copy of the base model."""
    meta = read_meta(directory)
    return _lookup(meta["name"])._load(base_model, Path(directory), meta["kwargs"])
