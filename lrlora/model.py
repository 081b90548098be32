"""Put LR-LoRA into any nn.Module, and take it out again.

    model = apply_lrlora(model, LRLoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...train...
    model = merge_and_unload(model)      # a plain model again: zero inference overhead
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lrlora.config import LRLoRAConfig
from lrlora.errors import ConfigError
from lrlora.layer import LRLoRADelta, LRLoRALinear
from lrlora.targets import find_targets, layer_index, matches_target
from lrlora.transfer import TransferFunction

__all__ = ["adapter_parameter_count", "apply_lrlora", "layer_index", "layer_settings", "lrlora_modules",
           "find_lrlora_targets", "make_transfers", "matches_target", "merge_and_unload", "merged", "unapply_lrlora"]


def lrlora_modules(model: nn.Module) -> dict[str, LRLoRADelta]:
    """Every LR-LoRA ΔW of the model, by module name: the library's layers (``LRLoRALinear``), or under PEFT
    (lrlora.peft) each adapter's ``{module}.lrlora_layer.{adapter}``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LRLoRADelta)}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def layer_settings(config: LRLoRAConfig) -> dict:
    """The per-layer settings of ΔW (the keyword arguments of LRLoRALinear and LRLoRAAdapter besides σ)."""
    return dict(r=config.r, dropout=config.dropout, center=config.center, pre_scale=config.pre_scale,
                post_scale=config.post_scale, fast=config.fast, table_size=config.table_size, init_B=config.init_B)


def find_lrlora_targets(modules, config: LRLoRAConfig) -> list[tuple[str, nn.Linear]]:
    """The linears ``config`` adapts in ``modules`` (a model or its (name, module) pairs), checked."""
    return find_targets(modules, config.target_modules, r=config.r, layers_to_transform=config.layers_to_transform)


def make_transfers(config: LRLoRAConfig, names: list[str], device) -> dict[str, TransferFunction]:
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
    targets = find_lrlora_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(iter(targets))[1].weight.device
    transfers = make_transfers(config, [n for n, _ in targets], device)
    for name, base in targets:
        layer = LRLoRALinear(base, transfer=transfers[name], **layer_settings(config))
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


@contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every LR-LoRA layer of ``model`` (the library's, or PEFT's ``lrlora`` layers with their
    active adapters) holds W0 + ΔW in its base weight, ΔW computed once on entry: a forward costs the base model's,
    not σ per call. On exit every W0 is back bit for bit (``lrlora.layer.fold``). For evaluation under no_grad:
    a merged layer trains nothing.

        with merged(model), torch.no_grad():
            logits = model(**batch).logits
    """
    done = []
    try:
        for m in model.modules():
            library = isinstance(m, LRLoRALinear)
            peft_layer = hasattr(m, "lrlora_layer") and hasattr(m, "merged_adapters")
            if (library or peft_layer) and not m.merged and not getattr(m, "disable_adapters", False):
                m.merge()
                if m.merged:
                    done.append(m)
        yield model
    finally:
        for m in reversed(done):
            m.unmerge()


def adapter_parameter_count(model: nn.Module) -> int:
    """Parameters of the adapters alone (A, B, transfer functions), counting tied ones once."""
    layers = lrlora_modules(model).values()
    seen = {id(p): p for layer in layers for p in layer.parameters() if p.requires_grad}
    base = {id(p) for layer in layers if hasattr(layer, "base_layer") for p in layer.base_layer.parameters()}
    return sum(p.numel() for i, p in seen.items() if i not in base)
