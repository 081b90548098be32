"""Save and load an LR-LoRA adapter: ``adapter_model.safetensors`` + ``adapter_config.json``.

    save_adapter(model, "out/adapter")
    model = load_adapter(base_model, "out/adapter")   # applies LR-LoRA first if the model has none

Writes go to a temporary folder renamed into place, so a crash never leaves a half-written adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lrlora.config import LRLoRAConfig
from lrlora.model import apply_lrlora, lrlora_modules, matches_target

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
FORMAT = "lrlora-adapter/1"


@contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``directory``; when the block succeeds it takes ``directory``'s
    place whole, when it fails it vanishes and ``directory`` is left as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    layers = lrlora_modules(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LR-LoRA layers (apply_lrlora first)")
    directory = Path(directory)
    meta = {
        "format": FORMAT,
        "config": model.lrlora_config.to_dict(),
        "modules": {n: list(m.base_layer.weight.shape) for n, m in layers.items()},
    }
    with atomic_directory(directory) as tmp:
        save_file({k: v.cpu() for k, v in adapter_state_dict(model).items()}, tmp / WEIGHTS, metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} an adapter folder written by save_adapter?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e}); re-save the adapter with save_adapter") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Restore a saved adapter onto ``model`` (the same base model it was trained on), exactly."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    if not lrlora_modules(model):
        apply_lrlora(model, LRLoRAConfig.from_dict(meta["config"]))
    layers = lrlora_modules(model)
    saved_shapes = {n: tuple(s) for n, s in meta["modules"].items()}
    model_shapes = {n: tuple(m.base_layer.weight.shape) for n, m in layers.items()}
    if saved_shapes != model_shapes:
        diff = sorted(set(saved_shapes.items()) ^ set(model_shapes.items()))[:6]
        raise ValueError(
            f"adapter in {directory} was saved for other module shapes than this model has "
            f"(first differences, (module, shape): {diff}); load it onto the base model it was trained on"
        )
    try:
        state = load_file(directory / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{directory / WEIGHTS} is unreadable or corrupt ({e}); re-save the adapter") from e
    params = dict(model.named_parameters())
    missing = sorted(set(adapter_state_dict(model)) - set(state))
    if missing:
        raise ValueError(f"adapter in {directory} lacks tensors {missing[:5]}...; it was saved with another config")
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in params:
                raise ValueError(f"adapter tensor {name!r} has no place in this model; load it onto the model it came from")
            if params[name].shape != tensor.shape:
                raise ValueError(f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, model has {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    return model
