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


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def run_protocol(name: str, ctx: EvalContext, cfg) -> dict:
    _load_all()
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)} "
                       f"(add one with @protocol in experiments/protocols/ and conf/protocol/{name}.yaml)")
    return PROTOCOLS[name](ctx, cfg)
