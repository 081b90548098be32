"""LR-LoRA as a Hugging Face PEFT method: ``import lrlora.peft`` registers it under the name ``lrlora``.

    import lrlora.peft                                           # registers the method with PEFT
    from lrlora.peft import LRLoRAPeftConfig
    from peft import get_peft_model, PeftModel
    model = get_peft_model(model, LRLoRAPeftConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters(); ...train (Trainer, TRL, your loop)...; model.save_pretrained("out")
    model = PeftModel.from_pretrained(base, "out").merge_and_unload()

Everything PEFT does for LoRA works here: several named adapters (``add_adapter``/``set_adapter``),
``disable_adapter()``, ``merge_adapter``/``unmerge_adapter``, ``merge_and_unload``, ``unload``,
``modules_to_save`` (a new task head), ``PeftModel.from_pretrained``, and ``peft.tuners.lora.convert_to_lora``.

PEFT's own split, in three parts: the config (``LRLoRAPeftConfig``: exactly ``lrlora.LRLoRAConfig``'s fields and
defaults, documented there, and validated by it), the layer (``LRLoRALayer``/``Linear``: per adapter name an
``lrlora.layer.LRLoRAAdapter`` holding A, B and σ, whose forward calls the fused op of ``lrlora.fused`` with the
base layer's weight) and the model (``LRLoRAModel``: which modules to adapt and their σ, by the library's rules
``lrlora.model.find_lrlora_targets`` and ``make_transfers``). ΔW, the forward and the random init are the
library layer's code (``lrlora.layer.LRLoRADelta``), so with one active adapter the output is ``apply_lrlora``'s,
bit for bit.

Saved folder: PEFT's ``adapter_config.json`` (``peft_type: LRLORA``) and ``adapter_model.safetensors``, whose
tensors are the library's (``lrlora.save_adapter``) under PEFT's key scheme; ``library_to_peft`` and
``peft_to_library`` convert between the two folders exactly, without a base model
(``python -m lrlora.peft to-peft LIBRARY_DIR OUT`` / ``to-library PEFT_DIR OUT``).

Only this module imports peft: ``import lrlora`` alone still needs torch and safetensors only.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _ExcludedModule,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
    _maybe_include_all_linear_layers,
    check_adapters_to_merge,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, register_peft_method
from peft.utils.other import AuxiliaryTrainingWrapper
from peft.utils.peft_types import PeftType
from safetensors.torch import load_file, save_file
from torch import nn

from lrlora._atomic import verify_checksums
from lrlora.config import LRLoRAConfig
from lrlora.errors import AdapterError, AdapterNotFound
from lrlora.io import CONFIG as LIB_CONFIG
from lrlora.io import FORMAT as LIB_FORMAT
from lrlora.io import WEIGHTS as LIB_WEIGHTS
from lrlora.io import atomic_directory, read_adapter_config
from lrlora.layer import LRLoRAAdapter, fold, unfold, versions
from lrlora.model import find_lrlora_targets, layer_settings, make_transfers
from lrlora.transfer import TransferFunction

if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):  # the save/load hooks this module overrides
    raise ImportError("lrlora.peft needs peft>=0.21 (tested with 0.21.2): pip install 'peft>=0.21,<0.22'")

NAME = "lrlora"
PREFIX = "lrlora_"
LAYER_ATTR = "lrlora_layer"  # the per-adapter ModuleDict on every PEFT layer; saved keys are …{module}.lrlora_layer.{param}
PEFT_KEY_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


# --- the PeftType member ------------------------------------------------------------------------------------------
def _add_peft_type(name: str) -> PeftType:
    """Add a member to PEFT's ``PeftType`` enum: ``register_peft_method`` only accepts names that are members, and
    PEFT offers no public way for an outside package to add one (PeftType is a closed ``str`` Enum)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    if not isinstance(PeftType(name), enum.Enum) or PeftType[name] is not member:
        raise RuntimeError(f"could not add {name!r} to peft.PeftType; this PEFT version is not supported")
    return member


LRLORA = _add_peft_type(NAME.upper())


# --- config -------------------------------------------------------------------------------------------------------
def _library_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """LRLoRAConfig's fields with their defaults: one source of truth, so the two configs cannot drift apart."""
    out = []
    for f in dataclasses.fields(LRLoRAConfig):
        if f.default is not dataclasses.MISSING:
            new = dataclasses.field(default=f.default, metadata={"help": "see lrlora.LRLoRAConfig"})
        else:
            new = dataclasses.field(default_factory=f.default_factory, metadata={"help": "see lrlora.LRLoRAConfig"})
        out.append((f.name, f.type, new))
    return out


LIBRARY_FIELDS = tuple(f.name for f in dataclasses.fields(LRLoRAConfig))


def _post_init(self) -> None:
    PeftConfig.__post_init__(self)
    self.peft_type = LRLORA
    if self.modules_to_save is None:  # PEFT's "none" (from JSON or a user); the library's is []
        self.modules_to_save = []
    if isinstance(self.target_modules, (set, tuple)):
        self.target_modules = sorted(self.target_modules)
    self.to_lrlora()  # every check of LRLoRAConfig, with its message


def _to_lrlora(self, **overrides) -> LRLoRAConfig:
    """The library config with the same values (``target_modules=None`` is checked as PEFT fills it in later)."""
    values = {name: getattr(self, name) for name in LIBRARY_FIELDS}
    values["modules_to_save"] = list(values["modules_to_save"] or [])
    if values["target_modules"] is None:
        values["target_modules"] = ["<filled in by PEFT from the model type>"]
    values.update(overrides)
    return LRLoRAConfig(**values)


LRLoRAPeftConfig = dataclasses.make_dataclass(
    "LRLoRAPeftConfig",
    _library_fields(),
    bases=(PeftConfig,),
    namespace={
        "__post_init__": _post_init,
        "to_lrlora": _to_lrlora,
        "__module__": __name__,
        "__doc__": (
            "PEFT config of LR-LoRA: exactly ``lrlora.LRLoRAConfig``'s fields and defaults (each documented there, "
            "with its source in the paper), plus PEFT's own (``task_type``, ``base_model_name_or_path``, "
            "``inference_mode``, ...). ``target_modules`` and ``layers_to_transform`` follow the library's rules "
            "(which accept PEFT's forms); ``target_modules=None`` takes PEFT's LoRA default for the model type."
        ),
    },
)


def peft_config_from(config: LRLoRAConfig, **peft_kwargs) -> LRLoRAPeftConfig:
    """The PEFT config for a library config (``peft_kwargs``: ``task_type``, ``base_model_name_or_path``, ...)."""
    return LRLoRAPeftConfig(**{name: getattr(config, name) for name in LIBRARY_FIELDS}, **peft_kwargs)


# --- which modules, and their σ: decided once per adapter, on the model as it is --------------------------------
def unwrapped_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's (name, module) pairs as the plain model had them: a module another adapter already wraps
    (a PEFT layer) is its base layer, a ``modules_to_save`` copy is its original, and their insides are left out."""
    wrapped: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or name.startswith(wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            module, wrapped = module.get_base_layer(), wrapped + (name + ".",)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            module, wrapped = getattr(module, "original_module", module), wrapped + (name + ".",)
        yield name, module


# --- the PEFT layer -------------------------------------------------------------------------------------------------
class LRLoRALayer(BaseTunerLayer):
    """A base nn.Linear plus, per adapter name, LR-LoRA's A, B and σ (an ``lrlora.layer.LRLoRAAdapter`` in
    ``lrlora_layer``): ΔW and the forward are ``lrlora.layer.LRLoRADelta``'s, the op ``lrlora.fused``'s."""

    adapter_layer_names = (LAYER_ATTR,)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.lrlora_layer = nn.ModuleDict({})
        # parameters the library creates frozen (e.g. ρ with learn_bandwidth=False): PEFT's set_adapter would
        # otherwise switch every parameter of an active adapter to requires_grad=True
        self._lrlora_frozen: dict[str, list[str]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, transfer: TransferFunction, inference_mode: bool = False,
                     **settings) -> None:
        """Add adapter ``adapter_name``: σ given (it may be tied to other modules' σ), A and B drawn here
        (``settings``: ``lrlora.model.layer_settings``)."""
        base = self.get_base_layer()
        adapter = LRLoRAAdapter(base.in_features, base.out_features, transfer=transfer, device=base.weight.device,
                                **settings)
        self._lrlora_frozen[adapter_name] = [n for n, p in adapter.named_parameters() if not p.requires_grad]
        self.lrlora_layer[adapter_name] = adapter
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # Device only: A, B and σ's parameters stay fp32 whatever the base dtype (σ in fp32).
        if adapter_name not in self.lrlora_layer:
            return
        weight = self.get_base_layer().weight
        target = device if device is not None else weight.device
        if target.type != "meta" and not any(p.device.type == "meta" for p in self.lrlora_layer[adapter_name].parameters()):
            self.lrlora_layer[adapter_name].to(target)

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        super()._freeze_non_trainable_peft_weights(adapter_names)
        if adapter_names is None:
            adapter_names = list(self._lrlora_frozen)
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for name in adapter_names:
            if name in self.lrlora_layer:
                for param in self._lrlora_frozen.get(name, ()):
                    self.lrlora_layer[name].get_parameter(param).requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._lrlora_frozen.pop(adapter_name, None)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = post_scale · σ(pre_scale · BA) (fp32, d_out × d_in) of one adapter."""
        return self.lrlora_layer[adapter].delta_weight()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # ΔW is a dense matrix added to W0, so peft.tuners.lora.convert_to_lora's truncated SVD applies.
        return True


class Linear(nn.Module, LRLoRALayer):
    """LR-LoRA on an nn.Linear (the only layer type the method adapts)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, transfer: TransferFunction,
                 inference_mode: bool = False, **settings) -> None:
        super().__init__()
        LRLoRALayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, transfer, inference_mode=inference_mode, **settings)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W0 ← W0 + ΔW for the given (default: active) adapters."""
        weight = self.get_base_layer().weight
        fixes = self.__dict__.setdefault("_lrlora_unmerge", {})
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lrlora_layer:
                continue
            with torch.no_grad():
                delta = self.get_delta_weight(name)
                if safe_merge and not torch.isfinite(weight + delta.to(weight.dtype)).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                fixes[name] = (fold(weight, delta), versions(self.lrlora_layer[name]))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W0 ← W0 − ΔW for every merged adapter, the last merged first: bit for bit the weight of before
        ``merge`` while the adapters have not changed since (else to rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        fixes = self.__dict__.setdefault("_lrlora_unmerge", {})
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lrlora_layer:
                fix, at = fixes.pop(name, (None, None))
                with torch.no_grad():
                    unfold(weight, self.get_delta_weight(name),
                           fix if at == versions(self.lrlora_layer[name]) else None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.lrlora_layer]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        if len(active) == 1:  # the fused op: W0 and ΔW in one matmul (or two with dropout), as the library layer
            return self.lrlora_layer[active[0]].linear(x, base)
        y = self.base_layer(x, *args, **kwargs)
        return y + sum(self.lrlora_layer[name].linear(x, base) - y for name in active)

    def __repr__(self) -> str:
        return "lrlora." + super().__repr__()


# --- the tuner model --------------------------------------------------------------------------------------------------
class LRLoRAModel(BaseTuner):
    """Creates an LR-LoRA model (ΔW = σ(BA), arXiv 2606.04325) from a model; built by ``peft.get_peft_model``.

    Which modules an adapter adapts is the library's rule (``lrlora.model.find_lrlora_targets``: the same
    placement, checks and error messages as ``apply_lrlora``), decided once per adapter before PEFT replaces a
    module, together with each module's σ (``make_transfers``: tied across modules for ``share=...``)."""

    prefix: str = PREFIX
    tuner_layer_cls = LRLoRALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config = self.peft_config[adapter_name]
        if config.target_modules is None:  # PEFT's default for the model type, as for LoRA
            config = self._prepare_adapter_config(config, self.get_model_config(model))
        target_modules = config.target_modules
        if isinstance(target_modules, str) and target_modules == "all-linear":
            target_modules = sorted(_maybe_include_all_linear_layers(dataclasses.replace(config), model).target_modules)
        library = config.to_lrlora(target_modules=target_modules, modules_to_save=[])
        targets = find_lrlora_targets(unwrapped_modules(model), library)
        # σ for every module before any A, B: the library's order of random draws, so both give the same init
        transfers = make_transfers(library, [n for n, _ in targets], targets[0][1].weight.device)
        self._new = (transfers, layer_settings(library))
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        finally:
            self._new = None

    def _check_target_module_exists(self, config, key: str):
        # PEFT's rule first: a modules_to_save module is never also adapted; then the library's choice
        for m in config.modules_to_save or ():
            if key == m or key.endswith("." + m) or f".{m}." in f".{key}.":
                return _ExcludedModule()
        if getattr(self, "_new", None) is None:
            raise RuntimeError("LRLoRAModel matches targets only while injecting an adapter")
        return key in self._new[0]

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key=None, **kwargs):
        transfers, settings = self._new
        if current_key not in transfers:
            raise ValueError(f"LR-LoRA did not choose module {current_key!r}; adapt it through target_modules")
        if isinstance(target, LRLoRALayer):
            target.update_layer(adapter_name, transfers[current_key], inference_mode=config.inference_mode, **settings)
            return
        new_module = Linear(target, adapter_name, transfers[current_key], inference_mode=config.inference_mode,
                            **settings)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    # Saved tensors: the parameters only (as lrlora.save_adapter), each tied parameter once (under its first name);
    # loading puts a tied tensor back under every name, so the folder maps 1:1 onto the library's.
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        params = {n.removeprefix("_fsdp_wrapped_module.") for n, _ in model.named_parameters()}
        return {k: v for k, v in selected.items() if k in params}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # …q_proj.lrlora_layer.default.transfer.a -> …q_proj.lrlora_layer.transfer.a (PEFT's rule only removes
        # the name when it is the last or second-to-last part)
        return key.replace(f".{LAYER_ATTR}.{adapter_name}.", f".{LAYER_ATTR}.", 1)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        groups = defaultdict(list)
        for n, p in model.named_parameters(remove_duplicate=False):
            groups[id(p)].append(n)
        for names in groups.values():
            present = [n for n in names if n in remapped]
            for n in names if present else ():
                remapped.setdefault(n, remapped[present[0]])
        # buffers (σ's fixed grid) follow from the config and are not saved, as in the library: keep the model's
        param_names = {n for names in groups.values() for n in names}
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        for k, v in _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes).items():
            if k not in param_names:
                remapped.setdefault(k, v)
        return remapped


if LRLORA not in __import__("peft").mapping.PEFT_TYPE_TO_CONFIG_MAPPING:  # importing twice registers once
    register_peft_method(name=NAME, config_cls=LRLoRAPeftConfig, model_cls=LRLoRAModel, prefix=PREFIX)


# --- conversion between the library's folder and PEFT's, exact and without a base model -----------------------------
def _peft_key(library_key: str, modules: list[str]) -> str:
    owner = max((m for m in modules if library_key.startswith(m + ".")), key=len, default=None)
    if owner is None:  # a modules_to_save tensor
        return PEFT_KEY_PREFIX + library_key
    return f"{PEFT_KEY_PREFIX}{owner}.{LAYER_ATTR}.{library_key[len(owner) + 1:]}"


def _library_key(peft_key: str) -> str:
    key = peft_key.removeprefix(PEFT_KEY_PREFIX)
    owner, sep, param = key.rpartition(f".{LAYER_ATTR}.")
    return f"{owner}.{param}" if sep else key


def _check_sums(src) -> None:
    bad = verify_checksums(src)
    if bad:
        raise AdapterError(f"{Path(src) / bad[0]} is corrupt (its sha256 differs from the one recorded when it was "
                           f"saved); restore the adapter folder from a copy or re-save it")


def library_to_peft(src: str | os.PathLike, out: str | os.PathLike, **peft_kwargs) -> Path:
    """A library adapter folder (``lrlora.save_adapter``) -> a PEFT folder ``PeftModel.from_pretrained`` loads.

    ``peft_kwargs`` go to the PEFT config, e.g. ``base_model_name_or_path=...``, ``task_type="SEQ_CLS"``."""
    meta = read_adapter_config(src)
    _check_sums(src)
    config = peft_config_from(LRLoRAConfig.from_dict(meta["config"]), **peft_kwargs)
    modules = list(meta["modules"])
    state = load_file(str(Path(src) / LIB_WEIGHTS))
    with atomic_directory(out) as tmp:
        save_file({_peft_key(k, modules): v for k, v in state.items()}, str(tmp / PEFT_WEIGHTS),
                  metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
    return Path(out)


def peft_to_library(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A PEFT folder of this method (``save_pretrained``) -> a library folder that ``lrlora.load_adapter`` loads."""
    src = Path(src)
    if not (src / PEFT_CONFIG).is_file() or not (src / PEFT_WEIGHTS).is_file():
        raise AdapterNotFound(f"{src} lacks {PEFT_CONFIG} or {PEFT_WEIGHTS}: is it a folder save_pretrained wrote?")
    try:
        raw = json.loads((src / PEFT_CONFIG).read_text())
    except ValueError as e:
        raise AdapterError(f"{src / PEFT_CONFIG} is corrupt ({e}); re-save the adapter") from None
    if raw.get("peft_type") != LRLORA.value:
        raise AdapterError(f"{src} holds a {raw.get('peft_type')!r} adapter, not an LR-LoRA one ({LRLORA.value!r})")
    _check_sums(src)
    config = LRLoRAPeftConfig.from_pretrained(str(src)).to_lrlora()
    state = load_file(str(src / PEFT_WEIGHTS))
    library = {_library_key(k): v for k, v in state.items()}
    # the module shapes the library checks on load: B is d_out × r, A is r × d_in (the library's own key names)
    owners = sorted({_library_key(k).rsplit(".", 1)[0] for k in state if k.endswith(f".{LAYER_ATTR}.lora_A")})
    modules = {m: [library[f"{m}.lora_B"].shape[0], library[f"{m}.lora_A"].shape[1]] for m in owners}
    meta = {"format": LIB_FORMAT, "config": config.to_dict(), "modules": modules}
    with atomic_directory(out) as tmp:
        save_file(library, str(tmp / LIB_WEIGHTS), metadata={"format": LIB_FORMAT})
        (tmp / LIB_CONFIG).write_text(json.dumps(meta, indent=2))
    return Path(out)


def main(argv=None) -> Path:
    """python -m lrlora.peft to-peft LIBRARY_DIR OUT [--task-type SEQ_CLS] | to-library PEFT_DIR OUT"""
    from lrlora import cli

    ap = cli.ArgumentParser(prog="python -m lrlora.peft", description="Convert LR-LoRA adapter folders "
                            "between the library's format (lrlora.save_adapter) and PEFT's, exactly.")
    sub = ap.add_subparsers(dest="command", required=True)
    to_peft = sub.add_parser("to-peft", help="library folder -> PEFT folder")
    to_peft.add_argument("src")
    to_peft.add_argument("out")
    to_peft.add_argument("--task-type", help="PEFT task type, e.g. SEQ_CLS or CAUSAL_LM")
    to_peft.add_argument("--base-model-name-or-path", help="recorded in adapter_config.json")
    to_library = sub.add_parser("to-library", help="PEFT folder -> library folder")
    to_library.add_argument("src")
    to_library.add_argument("out")
    args = ap.parse_args(argv)
    if args.command == "to-peft":  # the input's faults and a refused output are typed errors: one line each
        out = library_to_peft(args.src, args.out, task_type=args.task_type,
                              base_model_name_or_path=args.base_model_name_or_path)
    else:
        out = peft_to_library(args.src, args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    from lrlora import cli

    cli.run(main)


__all__ = [
    "LRLORA",
    "LRLoRALayer",
    "LRLoRAModel",
    "LRLoRAPeftConfig",
    "Linear",
    "library_to_peft",
    "main",
    "peft_config_from",
    "peft_to_library",
    "unwrapped_modules",
]
