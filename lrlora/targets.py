"""Which modules an adapter adapts, checked in one place for every method (LR-LoRA, through PEFT or not, the
baselines, and the harness before it builds anything).

    from lrlora.targets import find_targets
    find_targets(model, ["q_proj", "v_proj"], r=8)     # [(name, nn.Linear), ...] or a ConfigError naming the fix

Names follow PEFT's rule (``matches_target``); ``layers_to_transform`` takes the library's placement forms
(``lrlora.config.resolve_layers``: ``odd``, ``last:N``, a list, ...).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn

from lrlora.config import resolve_layers
from lrlora.errors import ConfigError

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


def _named(modules) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs without the layers an adapter already put in (a module's own ``base_layer`` is where
    PEFT and lrlora.layer.AdaptedLinear keep the original)."""
    from lrlora.layer import AdaptedLinear

    pairs = modules.named_modules() if isinstance(modules, nn.Module) else modules
    return [(n, m) for n, m in pairs if n and not isinstance(m, AdaptedLinear) and ".base_layer" not in n]


def _existing_names(pairs) -> list[str]:
    """What a user can write in target_modules: every nn.Linear's last one and two name parts."""
    linear = [n for n, m in pairs if isinstance(m, nn.Linear)]
    return sorted({".".join(n.split(".")[-k:]) for n in linear for k in (1, 2) if not n.split(".")[-1].isdigit()})


def find_targets(modules: nn.Module | Iterable[tuple[str, nn.Module]], target_modules, *, r: int | None = None,
                 layers_to_transform=None, each: bool = False, non_linear: str = "error", who: str = "",
                 setting: str = "target_modules") -> list[tuple[str, nn.Linear]]:
    """The (name, nn.Linear) an adapter adapts in ``modules`` (a model, or its (name, module) pairs), in order.

    ``each``: every entry of the list must match (the harness's check of a backbone's names), else one match is
    enough (PEFT's rule). ``non_linear``: a matched module that is not an nn.Linear is an error ("error") or left
    out ("skip", for methods that PEFT also applies to other layer types). ``r``: no larger than any adapted
    layer's min(d_in, d_out). Raises ConfigError, prefixed ``who: ``, naming ``setting`` and the fix."""
    pre = f"{who}: " if who else ""
    pairs = _named(modules)
    matched = [(n, m) for n, m in pairs if matches_target(n, target_modules)]
    linear = [(n, m) for n, m in matched if isinstance(m, nn.Linear)]
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    missing = [t for t in wanted if not any(matches_target(n, [t]) for n, _ in linear)] if each else []
    if missing or not linear and (non_linear == "skip" or not matched):
        names = _existing_names(pairs)
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        close = sorted({c for t in missing or wanted for c in difflib.get_close_matches(t, leaves, n=3, cutoff=0.4)})
        what = (f"target module(s) {missing} match no nn.Linear" if missing
                else f"no nn.Linear matches {setting}={target_modules!r}")
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(f"{pre}{what}.{hint} Fix {setting}; names that exist here: {', '.join(names[:40])}")
    if non_linear == "error":
        for n, m in matched:
            if not isinstance(m, nn.Linear):
                raise ConfigError(f"{pre}target module {n!r} is a {type(m).__name__}, not nn.Linear: this method "
                                  f"adapts linear layers only; narrow {setting} to the linear projections")
    indices = [layer_index(n) for n, _ in linear]
    known = [i for i in indices if i is not None]
    keep = resolve_layers(layers_to_transform, max(known) + 1 if known else 0)
    missing = sorted(keep - set(known)) if keep is not None and isinstance(layers_to_transform, (int, list, tuple)) else []
    if missing:  # an index past the last layer (or of no matched module) would be dropped in silence
        raise ConfigError(f"{pre}layers_to_transform={layers_to_transform!r} names layer(s) {missing}, which hold no "
                          f"matched module: the model's are layers {sorted(set(known))}")
    if keep is not None:
        linear = [(n, m) for (n, m), i in zip(linear, indices) if i in keep]
        if not linear:
            raise ConfigError(f"{pre}layers_to_transform={layers_to_transform!r} leaves no module to adapt "
                              f"(matched modules sit in layers {sorted(set(known))})")
    if r is not None:
        name, m = min(linear, key=lambda nm: min(nm[1].weight.shape))
        (d_out, d_in), k = m.weight.shape, min(m.weight.shape)
        if r > k:
            raise ConfigError(f"{pre}r={r} exceeds min(d_in, d_out)={k} of {name!r} ({d_out}×{d_in}); choose "
                              f"r <= {k} or drop this module from {setting}")
    return linear
