"""Run identity: `{backbone}__{adapter}__{regime}__r{r}__s{seed}` plus a short, stable suffix for every other
setting that changes the result, so two runs that differ in anything but those five never share a name.

    run_name: ${backbone.name}__${adapter.name}__${regime.name}__r${adapter.r}__s${seed}${run_suffix:}

(conf/train.yaml). The suffix is the difference between this run's result-affecting settings (the backbone,
regime and adapter groups and the result-affecting trainer settings: experiments/identity.py, which decides
what changes a result for names, fingerprints and analysis alike) and the config that the five
coordinates alone compose to: `adapter.center=true adapter.basis=gaussian` -> `__basis=gaussian__center=true`; an
experiment file or a sweep counts like the command line, since the difference is taken on the composed
config. When long, the adapter's settings stay readable and the rest becomes `__cfg-<8 hex>` (a hash). The same command gives the same name, so
resume still finds its checkpoint, and Hydra multirun jobs (sweep subdir = run_name) never share a folder.
Runtime knobs (threads, logging, paths, resume, tags) are not part of the identity.
"""

from __future__ import annotations

import hashlib
import json
import re

from omegaconf import DictConfig, OmegaConf

from experiments.identity import result_settings

MAX_SUFFIX = 60  # characters; longer differences are hashed
_REFERENCE: dict[tuple, dict] = {}


def base_name(cfg) -> str:
    """`{backbone}__{adapter}__{regime}__r{r}__s{seed}`: the name's five coordinates (conf/train.yaml's run_name
    without its `${run_suffix:}`)."""
    return f"{cfg.backbone.name}__{cfg.adapter.name}__{cfg.regime.name}__r{cfg.adapter.get('r')}__s{cfg.seed}"


def suffix_parts(cfg) -> list[str]:
    """The run name's suffix as settings (`['center=true', 'cfg-1a2b3c4d']`); [] for a name set by hand."""
    base = base_name(cfg)
    return [p for p in cfg.run_name[len(base):].split("__") if p] if cfg.run_name.startswith(base) else []


def _reference(coords: tuple) -> dict:
    """Result settings of the config composed from the coordinates alone (cached per coordinates)."""
    if coords not in _REFERENCE:
        from experiments.hydra_cli import compose_train

        backbone, regime, adapter, r = coords
        ref = compose_train([f"backbone={backbone}", f"regime={regime}", f"adapter={adapter}",
                             f"adapter.r={'null' if r is None else r}"])
        _REFERENCE[coords] = result_settings(ref)
    return _REFERENCE[coords]


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "-".join(_fmt(x) for x in v)
    return re.sub(r"[^A-Za-z0-9._+-]", "-", str(v))


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's shortest dotted tail that no other differing key shares ('adapter.center' -> 'center')."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(o != k and (o == tail or o.endswith("." + tail)) for o in keys):
                out[k] = tail
                break
    return out


def suffix_for(settings: dict, reference: dict) -> str:
    """'' when the settings equal the reference, else '__k=v__k=v' (sorted). When that is long, the adapter's
    settings stay readable (they are what ablations vary) and the rest becomes one '__cfg-<8 hex>'."""
    diff = {k: settings.get(k) for k in sorted(set(settings) | set(reference))
            if settings.get(k) != reference.get(k)}
    if not diff:
        return ""
    names = _short_keys(list(diff))
    items = {k: f"__{names[k]}={_fmt(v)}" for k, v in diff.items()}
    if sum(map(len, items.values())) <= MAX_SUFFIX:
        return "".join(items.values())
    readable, budget = [], MAX_SUFFIX - len("__cfg-12345678")
    for k in sorted(diff, key=lambda k: (not k.startswith("adapter."), k)):
        if k.startswith("adapter.") and len(items[k]) <= budget:
            readable.append(k)
            budget -= len(items[k])
    rest = {k: v for k, v in diff.items() if k not in readable}
    digest = hashlib.sha1(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return "".join(items[k] for k in sorted(readable)) + (f"__cfg-{digest}" if rest else "")


def run_suffix(_root_: DictConfig) -> str:
    """OmegaConf resolver `${run_suffix:}`: the stable suffix of the run described by the whole config."""
    coords = (_root_.backbone.name, _root_.regime.name, _root_.adapter.name, _root_.adapter.get("r"))
    return suffix_for(result_settings(_root_), _reference(coords))


if not OmegaConf.has_resolver("run_suffix"):
    OmegaConf.register_new_resolver("run_suffix", run_suffix)
