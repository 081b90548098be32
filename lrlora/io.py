"""Save and load an LR-LoRA adapter: ``adapter_model.safetensors`` + ``adapter_config.json``.

    save_adapter(model, "out/adapter")
    model = load_adapter(base_model, "out/adapter")   # applies LR-LoRA first if the model has none

Writes go through `lrlora._atomic.atomic_directory`: built aside and swapped in, so a crash never leaves a
half-written adapter; a non-empty folder that is not an adapter of ours is refused, never emptied.
Loading validates everything (config, module shapes, tensors) before it changes the model, and restores the
saved `center`/`pre_scale`/`post_scale`/`dropout` onto a model that already has LR-LoRA layers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lrlora._atomic import (  # noqa: F401 (re-exported)
    atomic_directory,
    atomic_file,
    atomic_json,
    atomic_write,
    recover_interrupted_swap,
    verify_checksums,
)
from lrlora.config import LRLoRAConfig
from lrlora.errors import AdapterError, AdapterNotFound
from lrlora.layer import input_dropout
from lrlora.model import apply_lrlora, find_lrlora_targets, lrlora_modules, unapply_lrlora
from lrlora.targets import matches_target

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
FORMAT = "lrlora-adapter/1"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A, B, transfer parameters (and learnable grids), plus modules_to_save; tied tensors once."""
    config: LRLoRAConfig = model.lrlora_config
    saved_prefixes = tuple(n + "." for n, _ in model.named_modules() if n and matches_target(n, config.modules_to_save))
    keep = {}
    for name, p in model.named_parameters():  # a tied parameter comes once, under its first name
        in_adapter = name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or ".transfer." in name
        if in_adapter or name.startswith(saved_prefixes):
            keep[name] = p.detach().contiguous()
    return keep


def is_adapter_folder(directory: Path) -> bool:
    """True for a folder an adapter save of this repository wrote (ours to replace)."""
    directory = Path(directory)
    if (directory / "baselines_meta.json").is_file():
        return True
    try:
        return json.loads((directory / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    layers = lrlora_modules(model)
    if not layers:
        raise AdapterError("save_adapter: the model has no LR-LoRA layers (apply_lrlora first)")
    directory = Path(directory)
    meta = {
        "format": FORMAT,
        "config": model.lrlora_config.to_dict(),
        "modules": {n: list(m.base_layer.weight.shape) for n, m in layers.items()},
    }
    with atomic_directory(directory, is_ours=is_adapter_folder, what="adapter folder") as tmp:
        save_file({k: v.cpu() for k, v in adapter_state_dict(model).items()}, tmp / WEIGHTS, metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    recover_interrupted_swap(directory)
    if not directory.is_dir():
        raise AdapterNotFound(f"adapter folder {directory} does not exist: pass the folder save_adapter wrote")
    path = directory / CONFIG
    if not path.is_file():
        raise AdapterNotFound(f"{path} not found: is {directory} an adapter folder written by save_adapter?")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is corrupt ({e}); re-save the adapter with save_adapter") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise AdapterError(f"{path} has format {got!r}, expected {FORMAT!r}: not an LR-LoRA adapter")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("modules"), dict):
        raise AdapterError(f"{path} lacks its 'config' or 'modules' entry; re-save the adapter with save_adapter")
    return meta


# Settings that live on the layers, not in tensors: restored from the saved config when loading onto a model
# that already has LR-LoRA layers (else that model's values would silently stay and change the outputs).
RESTORED = ("center", "pre_scale", "post_scale", "dropout", "fast", "table_size")
# Settings that only decide the layout or the initial values: tensors overwrite them.
INIT_ONLY = ("init_B", "amplitude_init", "amplitude_init_std", "bandwidth_init")


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if not (directory / WEIGHTS).is_file():
        raise AdapterNotFound(f"{directory / WEIGHTS} not found: the adapter folder is incomplete; re-save it")
    if verify_checksums(directory):  # a payload corrupted under an intact header would otherwise load
        raise AdapterError(f"{directory / WEIGHTS} is unreadable or corrupt (its sha256 differs from the one "
                           f"recorded when it was saved); restore the adapter folder from a copy or re-save it")
    try:
        return load_file(directory / WEIGHTS)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise AdapterError(f"{directory / WEIGHTS} is unreadable or corrupt ({e}); re-save the adapter") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Restore a saved adapter onto ``model`` (the same base model it was trained on), exactly.

    Everything is checked before the model changes: a failure (AdapterError) leaves it as it was."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    try:
        saved = LRLoRAConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{directory / CONFIG} holds an invalid config ({e}); re-save the adapter") from None
    state = _read_weights(directory)
    saved_shapes = {n: tuple(s) for n, s in meta["modules"].items()}
    existing = lrlora_modules(model)
    if existing:
        current = model.lrlora_config.to_dict()
        differ = sorted(k for k, v in saved.to_dict().items()
                        if k not in RESTORED + INIT_ONLY and current.get(k) != v)
        if differ:
            raise AdapterError(
                f"the model's LR-LoRA layers differ from the adapter in {directory} in "
                f"{', '.join(f'{k} ({current.get(k)!r} vs saved {saved.to_dict()[k]!r})' for k in differ)}; "
                f"load it onto the plain base model instead")
        model_shapes = {n: tuple(m.base_layer.weight.shape) for n, m in existing.items()}
    else:
        try:
            model_shapes = {n: tuple(m.weight.shape) for n, m in find_lrlora_targets(model, saved)}
        except (TypeError, ValueError) as e:
            raise AdapterError(f"adapter in {directory} does not fit this model: {e}") from None
    if saved_shapes != model_shapes:
        diff = sorted(set(saved_shapes.items()) ^ set(model_shapes.items()))[:6]
        raise AdapterError(
            f"adapter in {directory} was saved for other module shapes than this model has "
            f"(first differences, (module, shape): {diff}); load it onto the base model it was trained on"
        )
    if not existing:
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        apply_lrlora(model, saved)
    try:
        params = dict(model.named_parameters())
        missing = sorted(set(adapter_state_dict(model)) - set(state))
        if missing:
            raise AdapterError(f"adapter in {directory} lacks tensors {missing[:5]}; it was saved with another config")
        for name, tensor in state.items():
            if name not in params:
                raise AdapterError(f"adapter tensor {name!r} has no place in this model; load it onto the model it "
                                   f"came from")
            if params[name].shape != tensor.shape:
                raise AdapterError(f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, model has "
                                   f"{tuple(params[name].shape)}; the adapter was saved for another model")
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"adapter tensor {name!r} in {directory} holds NaN/inf: the run that saved it "
                                   f"diverged; retrain it")
    except AdapterError:
        if not existing:  # put the model back as it was
            unapply_lrlora(model)
            for n, p in model.named_parameters():
                p.requires_grad_(grads.get(n, p.requires_grad))
        raise
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    for layer in lrlora_modules(model).values():
        layer.center, layer.pre_scale, layer.post_scale = saved.center, saved.pre_scale, saved.post_scale
        layer.fast, layer.table_size = saved.fast, saved.table_size
        layer.dropout = input_dropout(saved.dropout)
    model.lrlora_config = saved
    return model
