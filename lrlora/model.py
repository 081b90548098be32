"""Put LR-LoRA into any nn.Module, and take it out again.

    model = apply_lrlora(model, LRLoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...train...
    model = merge_and_unload(model)      # a plain model again: zero inference overhead
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from lrlora.config import LRLoRAConfig, resolve_layers
from lrlora.errors import ConfigError
from lrlora.layer import LRLoRALinear
from lrlora.transfer import TransferFunction

# Where the layer index sits in a module name: "model.layers.3.self_attn.q_proj", "encoder.layer.3...",
# "transformer.h.3...", "blocks.3..." (the patterns PEFT's layers_pattern covers), else the first ".N.".
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_ANY_INDEX_RE = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name) or _ANY_INDEX_RE.search(name)
    return int(m.group(1)) if m else None


def matches_target(name: str, targets) -> bool:
    """PEFT's rule: a list matches a name equal to an entry or ending with '.' + entry; a string is a regex
    that must match the whole name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lrlora_modules(model: nn.Module) -> dict[str, LRLoRALinear]:
    """Every adapted layer, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LRLoRALinear)}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _no_match_error(model: nn.Module, targets) -> ConfigError:
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t, linear_names, n=3, cutoff=0.4)})
    hint = f" Did you mean {close}?" if close else ""
    return ConfigError(
        f"no module matches target_modules={targets!r}.{hint} "
        f"The model's nn.Linear modules are named: {linear_names[:40]}"
    )


def _find_targets(model: nn.Module, config: LRLoRAConfig) -> list[tuple[str, nn.Module]]:
    candidates = [
        (n, m)
        for n, m in model.named_modules()
        if n and matches_target(n, config.target_modules) and not isinstance(m, LRLoRALinear) and ".base_layer" not in n
    ]
    if not candidates:
        raise _no_match_error(model, config.target_modules)
    indices = [layer_index(n) for n, _ in candidates]
    known = [i for i in indices if i is not None]
    keep = resolve_layers(config.layers_to_transform, max(known) + 1 if known else 0)
    if keep is not None:
        candidates = [(n, m) for (n, m), i in zip(candidates, indices) if i in keep]
        if not candidates:
            raise ConfigError(
                f"layers_to_transform={config.layers_to_transform!r} leaves no module to adapt "
                f"(matched modules sit in layers {sorted(set(known))})"
            )
    for n, m in candidates:
        if not isinstance(m, nn.Linear):
            raise ConfigError(
                f"target module {n!r} is a {type(m).__name__}, not nn.Linear: LR-LoRA adapts linear layers only; "
                f"narrow target_modules to the linear projections"
            )
        d_out, d_in = m.weight.shape
        if config.r > min(d_out, d_in):
            raise ConfigError(
                f"r={config.r} exceeds min(d_in, d_out)={min(d_out, d_in)} of {n!r} ({d_out}×{d_in}); "
                f"choose r <= {min(d_out, d_in)} or drop this module from target_modules"
            )
    return candidates


def _make_transfers(config: LRLoRAConfig, names: list[str], device) -> dict[str, TransferFunction]:
    """One TransferFunction per module; tied parameters are the same nn.Parameter object (Table 20)."""

    def new():
        return TransferFunction(
            basis=config.basis,
            K=config.K,
            L=config.L,
            amplitude_init=config.amplitude_init,
            amplitude_init_std=config.amplitude_init_std,
            bandwidth_init=config.bandwidth_init,
            learn_bandwidth=config.learn_bandwidth,
            learn_grid=config.learn_grid,
            device=device,
        )

    tied = {"none": (), "bandwidth": ("rho",), "amplitude": ("a",), "grid": ("grid",), "all": ("a", "rho", "grid")}[config.share]
    prototypes: dict[str, TransferFunction] = {}
    out = {}
    for name in names:
        tf = new()
        key = "model" if config.share_by == "model" else name.rsplit(".", 1)[-1]
        proto = prototypes.setdefault(key, tf)
        for p in tied:
            if proto is not tf and isinstance(getattr(proto, p), nn.Parameter):
                setattr(tf, p, getattr(proto, p))
        out[name] = tf
    return out


def apply_lrlora(model: nn.Module, config: LRLoRAConfig) -> nn.Module:
    """Wrap the target linear layers in LRLoRALinear, freeze everything else, return the model (in place).

    Every check runs before the model changes: a ConfigError leaves it as it was."""
    if lrlora_modules(model):
        raise ConfigError("model already has LR-LoRA layers: call merge_and_unload(model) first, or load_adapter onto it")
    for name in config.modules_to_save:
        if not any(n and matches_target(n, [name]) for n, _ in model.named_modules()):
            raise ConfigError(f"modules_to_save entry {name!r} matches no module of the model; name an existing "
                              f"module (e.g. the task head 'classifier') or drop it")
    targets = _find_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(iter(targets))[1].weight.device
    transfers = _make_transfers(config, [n for n, _ in targets], device)
    for name, base in targets:
        layer = LRLoRALinear(
            base,
            r=config.r,
            transfer=transfers[name],
            dropout=config.dropout,
            center=config.center,
            pre_scale=config.pre_scale,
            post_scale=config.post_scale,
            fast=config.fast,
            table_size=config.table_size,
            init_B=config.init_B,
        )
        _set_submodule(model, name, layer)
    for name in config.modules_to_save:
        for n, m in model.named_modules():
            if n and matches_target(n, [name]):
                m.requires_grad_(True)
    model.lrlora_config = config
    return model


def unapply_lrlora(model: nn.Module) -> nn.Module:
    """Take the LR-LoRA layers out without merging: the base model as it was before apply_lrlora."""
    for name, layer in lrlora_modules(model).items():
        if layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    if hasattr(model, "lrlora_config"):
        del model.lrlora_config
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every ΔW into its base weight and put the plain nn.Linear back: nothing of lrlora remains."""
    for name, layer in lrlora_modules(model).items():
        if not layer.merged:
            layer.merge()
        _set_submodule(model, name, layer.base_layer)
    if hasattr(model, "lrlora_config"):
        del model.lrlora_config
    return model


def adapter_parameter_count(model: nn.Module) -> int:
    """Parameters of the adapters alone (A, B, transfer functions), counting tied ones once."""
    seen = {id(p): p for layer in lrlora_modules(model).values() for p in layer.parameters() if p.requires_grad}
    base = {id(p) for layer in lrlora_modules(model).values() for p in layer.base_layer.parameters()}
    return sum(p.numel() for i, p in seen.items() if i not in base)
