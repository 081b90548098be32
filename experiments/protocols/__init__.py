"""Evaluation protocols: one registry, one signature; the harness and `experiments.evaluate` both call here.

    from experiments.protocols import EvalContext, run_protocol
    metrics = run_protocol("glue", ctx, protocol_cfg)     # -> results["metrics"]["glue"]

A protocol is a function `fn(ctx: EvalContext, cfg: DictConfig) -> dict` registered with `@protocol("name")`
in a module of this package, plus `conf/protocol/<name>.yaml` holding its settings. Adding a protocol touches
those two files (and its tests); `experiments/train.py` does not change. The dict it returns is stored
under `metrics.<name>` in the run's results file (docs/RESULTS.md gives each protocol's fields).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrlora.errors import UserError

PROTOCOLS: dict[str, Callable[..., dict]] = {}


def protocol(name: str):
    """Register `fn(ctx, cfg) -> dict` under `name` (the file name of its conf/protocol/ YAML)."""
    def deco(fn):
        PROTOCOLS[name] = fn
        return fn
    return deco


@dataclass
class EvalContext:
    """Everything a protocol may need about the run being scored. Protocols read what they need."""
    model: Any                      # the adapted model (merge it if the protocol scores a merged adapter)
    processor: Any                  # tokenizer or image processor of the backbone
    regime: Any                     # the run's regime config (task, eval_tasks, generation settings, ...)
    test: list = field(default_factory=list)   # test examples as the regime's loader produced them
    collate: Callable | None = None
    device: Any = "cpu"
    autocast: Callable | None = None
    batch_size: int = 8
    out_dir: Path | None = None     # the run folder: predictions JSONL and other audit files go here
    run_name: str = ""
    adapter: Any = None             # the baselines.AdaptedModel handle of `model` (None: model is already plain)
    _merged: bool = False


def write_jsonl(rows: list[dict], path) -> Path:
    """Predictions, answers and judgments as JSON lines, written atomically (lrlora._atomic): a reader never sees
    half a file, and two writers never share a temporary name."""
    import json

    from lrlora._atomic import atomic_write

    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def merged_model(ctx: EvalContext):
    """The model with its adapter folded into the weights, as the paper's commonsense evaluation scores it
    (RandLoRA merges before evaluating). Merges once, in place: the protocols that want a merged model share
    it, and nothing may use the adapter handle afterwards (the harness runs these last)."""
    if ctx.adapter is not None and not ctx._merged:
        ctx.model = ctx.adapter.merge_and_unload()
        ctx._merged = True
    return ctx.model


CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "protocol"


class UnknownProtocol(UserError, KeyError):
    """A protocol name with no registered function or no conf/protocol/ YAML."""

    def __str__(self):
        return str(self.args[0])


def protocol_config(name: str, overrides=None):
    """conf/protocol/<name>.yaml with `overrides` (a dict) merged over it."""
    from omegaconf import OmegaConf

    path = CONF_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise UnknownProtocol(f"unknown protocol {name!r}: there is no {path}. Known protocols: {known}")
    cfg = OmegaConf.load(path)
    return OmegaConf.merge(cfg, overrides) if overrides else cfg


def protocol_names(cfg) -> list[str]:
    """The protocols a training run ends with: `eval.protocols`, else the regime's `protocols`."""
    names = cfg.get("eval", {}).get("protocols")
    if names is None:
        names = cfg.regime.get("protocols") or []
    return list(names)


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def run_protocol(name: str, ctx: EvalContext, cfg) -> dict:
    _load_all()
    if name not in PROTOCOLS:
        raise UnknownProtocol(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)} "
                       f"(add one with @protocol in experiments/protocols/ and conf/protocol/{name}.yaml)")
    return PROTOCOLS[name](ctx, cfg)
