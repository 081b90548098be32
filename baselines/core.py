"""One adapter interface for every method: the method contract, its registry, `apply_adapter`, `load_adapted`.

    from baselines import apply_adapter, load_adapted
    handle = apply_adapter(model, name="lora", r=8, target_modules=["query", "value"])
    ...train handle.model, calling handle.on_step(step, total_steps) after every optimizer step...
    handle.save("out/adapter"); handle2 = load_adapted(fresh_base_model, "out/adapter")

A method is a subclass of `AdaptedModel` registered under its name with `@register`, in any module of this
package: `methods()` imports them all, so nothing lists the methods. The class carries everything the rest of
the repository asks of a method: its display `label` (tables), its config checks (`validate`, run by the
harness before anything loads), its parameter count per adapted linear (`parameters_per_module`, which
`match_budget` inverts along `budget_knob`) and its body (`_apply`, `delta_weights`, save/load).
`save` writes the method's own files plus `baselines_meta.json` (method name + kwargs), which is what
`load_adapted` dispatches on.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from lrlora._atomic import atomic_directory, dumps_strict, recover_interrupted_swap, verify_checksums
from lrlora.errors import AdapterError, AdapterNotFound, ConfigError
from lrlora.io import is_adapter_folder
from lrlora.targets import find_targets

META_FILE = "baselines_meta.json"

ADAPTERS: dict[str, type[AdaptedModel]] = {}


def register(name: str):
    """Class decorator: `@register("lora")` makes `apply_adapter(model, name="lora", ...)` build it. `name` is the
    method's YAML (conf/adapter/<name>.yaml); the class's own `label` (else `name`) is its name in tables."""

    def deco(cls):
        if ADAPTERS.get(name, cls) is not cls:
            raise ValueError(f"adapter {name!r} registered twice")
        cls.method = name
        cls.label = cls.__dict__.get("label", name)
        ADAPTERS[name] = cls
        return cls

    return deco


def methods() -> dict[str, type[AdaptedModel]]:
    """Every method, by name: importing each module of this package fills the registry (`@register`), as the
    evaluation protocols fill theirs. A module run as `python -m baselines.<module>` is not imported twice."""
    package = sys.modules[__name__.rpartition(".")[0]]
    running = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    for module in pkgutil.iter_modules(package.__path__):
        name = f"{package.__name__}.{module.name}"
        if name != running:
            importlib.import_module(name)
    return ADAPTERS


def get_method(name: str) -> type[AdaptedModel]:
    known = methods()
    if name not in known:
        raise ConfigError(f"unknown adapter {name!r}; known: {sorted(known)}")
    return known[name]


def is_head_param(param_name: str, modules_to_save: Iterable[str] | None) -> bool:
    """True for parameters of a `modules_to_save` module (e.g. the classifier), under PEFT's wrapper too."""
    dotted = "." + param_name
    return any(f".{key}." in dotted for key in (modules_to_save or ()))


def alpha_or_default(r: int, alpha: float | None) -> float:
    """α defaults to 2r for every method here: the RandLoRA/LLM-Adapters harness the paper reuses (docs/SOURCES.md)."""
    return 2 * r if alpha is None else alpha


def schedule_steps(value: float | int, total_steps: int) -> int:
    """A schedule point given as a step count, or as a fraction of the run when it is a float below 1."""
    return int(value * total_steps) if isinstance(value, float) and value < 1 else int(value)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class AdaptedModel:
    """A model with one adapter method applied; the harness talks only to this.

    A method subclasses it (or `baselines.layers.SelfWrittenAdapted`, `baselines.peft_methods.PeftAdapted`),
    gives `label`, `parameters_per_module` and its body (`_apply`, `delta_weights`, `merge_and_unload`,
    `_save_files`, `_load`), and extends `validate` when it has settings to check."""

    method: str = "?"  # set by @register
    label: str = "?"  # the method's name in tables and figures (the paper's spelling); set by @register
    budget_knob: str = "r"  # the setting `match_budget` turns to meet a parameter budget
    # VeRA's r is the size of its shared random projections, which the paper sets above the layer width.
    rank_may_exceed_layer: bool = False

    def __init__(self, model: nn.Module, **kwargs):
        self.check_kwargs(model, kwargs)  # before anything changes: a failed apply leaves the model as it was
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

    # --- the method's facts, read without a model ------------------------------------------------------------
    @classmethod
    def validate(cls, kwargs: dict) -> None:
        """The checks that need no model (the harness runs them before loading anything): r a positive integer, a
        dropout in [0, 1), target_modules given. A method extends it with its own settings. Raises ConfigError
        naming the fix."""
        check_rank_value(cls.method, kwargs.get("r"))
        p = kwargs.get("dropout")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1):
            raise ConfigError(f"{cls.method}: dropout={p!r} must be a number in [0, 1)")
        if not kwargs.get("target_modules"):
            raise ConfigError(f"{cls.method}: target_modules is required (e.g. ['query', 'value'])")

    @classmethod
    def parameters_per_module(cls, d_in: int, d_out: int, **kwargs) -> int:
        """Trainable parameters the method adds to one adapted d_in → d_out linear, given its kwargs (defaults as
        the method's): the formula tests/test_baselines.py holds the real count to, and `match_budget` inverts."""
        raise NotImplementedError(f"{cls.__name__} gives no parameter formula")

    @classmethod
    def budget_kwargs(cls, value: int) -> dict:
        """The kwargs that set `budget_knob` to `value`."""
        return {cls.budget_knob: value}

    @classmethod
    def check_kwargs(cls, model: nn.Module, kwargs: dict) -> None:
        """`validate`, then the targets on the model: at least one nn.Linear matches target_modules and r is no
        larger than any of them (lrlora.targets.find_targets). Raises ConfigError naming the fix."""
        cls.validate(kwargs)
        r = None if cls.rank_may_exceed_layer else kwargs.get("r")
        find_targets(model, kwargs["target_modules"], r=r, non_linear="skip", who=cls.method)

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

    def sigma_arguments(self) -> dict[str, torch.Tensor]:
        """Module name -> the argument of an elementwise σ applied to a low-rank product (LR-LoRA: pre_scale · BA),
        for the mechanism diagnostics (lrlora.mechanism); empty for methods without one."""
        return {}

    def training_state(self) -> dict:
        """State a method keeps outside its trainable tensors (rank schedules, importance scores, its RNG):
        the training checkpoint stores it, so a resumed run continues exactly."""
        return {}

    def load_training_state(self, state: dict) -> None:
        """Restore what `training_state` returned."""

    def save(self, directory: str | os.PathLike) -> None:
        """Write the adapter atomically (lrlora._atomic.atomic_directory): a non-empty folder that is not an
        adapter of ours is refused (UnsafeWrite), never emptied; in one of ours only our files are replaced."""
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise AdapterError(f"refusing to save a diverged adapter: {bad[0]} holds NaN/inf")
        with atomic_directory(directory, is_ours=is_adapter_folder, what="adapter folder") as tmp:
            self._save_files(tmp)
            meta = {"name": self.name, "kwargs": _jsonable(self.kwargs)}
            (tmp / META_FILE).write_text(dumps_strict(meta, indent=2, sort_keys=True))

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
    return get_method(name)(model, **kwargs)


def check_rank_value(method: str, r) -> None:
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ConfigError(f"{method}: r={r!r} must be a positive integer (e.g. adapter.r=8)")


def read_meta(directory: str | os.PathLike) -> dict:
    """The `baselines_meta.json` of an adapter folder (or, for a folder PEFT's save_pretrained wrote outside the
    harness, e.g. a Trainer run, the same facts from its adapter_config.json); AdapterError if it is neither."""
    directory = Path(directory)
    recover_interrupted_swap(directory)
    if not directory.is_dir():
        raise AdapterNotFound(f"adapter folder {directory} does not exist: pass the folder a run saved "
                           f"(outputs/runs/RUN/adapter)")
    path = directory / META_FILE
    peft_config = directory / "adapter_config.json"
    if not path.is_file() and peft_config.is_file():
        try:
            cfg = json.loads(peft_config.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise AdapterError(f"{peft_config} is corrupt ({e}); re-save the adapter") from None
        if isinstance(cfg, dict) and "peft_type" in cfg:
            keys = ("r", "target_modules", "modules_to_save")
            return {"name": str(cfg["peft_type"]).lower(), "kwargs": {k: cfg[k] for k in keys if k in cfg}}
    if not path.is_file():
        raise AdapterNotFound(f"{directory} is not an adapter folder written by baselines (no {META_FILE}) nor "
                           f"by PEFT's save_pretrained; pass the adapter/ folder of a run")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not isinstance(
                meta.get("kwargs"), dict):
            raise ValueError("needs 'name' and 'kwargs'")
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is corrupt ({e}); re-save the adapter") from None
    return meta


def load_adapted(base_model: nn.Module, directory: str | os.PathLike) -> AdaptedModel:
    """Rebuild the handle that `AdaptedModel.save(directory)` wrote, on a fresh copy of the base model."""
    meta = read_meta(directory)
    bad = verify_checksums(directory)  # a payload corrupted under an intact header would otherwise load
    if bad:
        raise AdapterError(f"{Path(directory) / bad[0]} is corrupt (its sha256 differs from the one recorded when it "
                           f"was saved); restore the adapter folder from a copy, or re-train the run")
    try:
        return get_method(meta["name"])._load(base_model, Path(directory), meta["kwargs"])
    except (OSError, RuntimeError, KeyError) as e:  # a weights file missing, truncated or of other shapes
        hint = (" (an LR-LoRA folder in PEFT's format: import lrlora.peft before PEFT reads it)"
                if str(e).strip("'\"") == "LRLORA" else "")
        raise AdapterError(f"could not load the adapter in {directory}: {str(e).splitlines()[0][:300]}{hint}; "
                           f"re-save it, or load it onto the base model it was trained on") from None
