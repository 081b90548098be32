"""Evaluation protocols: one registry, one signature; the harness and `experiments.evaluate` both call here.

    from experiments.protocols import EvalContext, run_protocol
    metrics = run_protocol("glue", ctx, protocol_cfg)     # -> results["metrics"]["glue"]

A protocol is a function `fn(ctx: EvalContext, cfg: DictConfig) -> dict` registered with `@protocol("name",
tasks=(...))` (the regime tasks it scores) in a module of this package, plus `conf/protocol/<name>.yaml` holding
its settings. Both are checked before anything loads or is written: the settings (`check_protocol_settings`: no
unknown key, counts positive, flags boolean) and the fit (`check_fits`: the run's task is one the protocol scores). Adding a protocol touches
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
TASKS: dict[str, tuple[str, ...] | None] = {}  # the regime tasks each protocol scores (None: any)


def protocol(name: str, tasks: tuple[str, ...] | None = None):
    """Register `fn(ctx, cfg) -> dict` under `name` (the file name of its conf/protocol/ YAML), scoring runs of
    the regime `tasks` (classification, regression, causal_lm, image_classification; None: any)."""
    def deco(fn):
        PROTOCOLS[name] = fn
        TASKS[name] = tuple(tasks) if tasks else None
        return fn
    return deco


class ProtocolError(UserError, ValueError):
    """A protocol that does not fit the run, or a protocol setting out of range."""


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

    def recorded(self, path) -> str:
        """How a results file names an audit file: relative to the run folder (`predictions/x.jsonl`), so a
        copied outputs folder never points back into the original."""
        path = Path(path)
        try:
            return path.resolve().relative_to(Path(self.out_dir).resolve()).as_posix()
        except (TypeError, ValueError):
            return str(path)


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


def _yaml(name: str):
    from omegaconf import OmegaConf

    path = CONF_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise UnknownProtocol(f"unknown protocol {name!r}: there is no {path}. Known protocols: {known}")
    return OmegaConf.load(path)


def protocol_config(name: str, overrides=None):
    """conf/protocol/<name>.yaml with `overrides` (a dict) merged over it, checked (check_protocol_settings)."""
    from omegaconf import OmegaConf

    cfg = _yaml(name)
    if overrides:
        check_protocol_settings(name, overrides)
        cfg = OmegaConf.merge(cfg, overrides)
    check_protocol_settings(name, cfg)
    return cfg


# What a protocol setting of this name must be (the same meaning in every conf/protocol/ file).
_POSITIVE = ("limit", "batch_size", "num_beams", "max_new_tokens", "max_length", "n_questions", "max_tokens",
             "timeout_s", "parallel")
_NON_NEGATIVE = ("num_fewshot", "seed", "max_retries")
_FLAGS = ("merge",)


def check_protocol_settings(name: str, settings, where: str = "protocol") -> None:
    """ProtocolError for a setting conf/protocol/<name>.yaml does not have, or one out of range (a batch size
    or limit of 0 or below, a negative few-shot count, a flag that is not true/false): before anything is read
    or written, so an impossible setting never reaches a results file."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(settings, DictConfig):
        settings = OmegaConf.to_container(settings, resolve=False)
    reference = OmegaConf.to_container(_yaml(name), resolve=False)

    def walk(node: dict, ref: dict, prefix: str):
        for key, value in (node or {}).items():
            path = f"{where}.{prefix}{key}"
            if key not in ref:
                raise ProtocolError(f"{path} is not a setting of protocol {name}; its settings: "
                                    f"{', '.join(prefix + k for k in ref)} (conf/protocol/{name}.yaml)")
            if isinstance(ref[key], dict) and isinstance(value, dict):
                walk(value, ref[key], f"{prefix}{key}.")
                continue
            if isinstance(value, str) and value.startswith("${"):
                continue  # an interpolation, checked once resolved
            bad = None
            if key in _POSITIVE and value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                                           or value < 1):
                bad = "a positive integer or null"
            elif key in _NON_NEGATIVE and value is not None and (isinstance(value, bool) or
                                                                 not isinstance(value, int) or value < 0):
                bad = "an integer >= 0 or null"
            elif key in _FLAGS and not isinstance(value, bool):
                bad = "true or false"
            if bad:
                raise ProtocolError(f"{path}={value!r} must be {bad}")

    walk(settings, reference, "")


def check_fits(name: str, regime, run_name: str = "") -> None:
    """ProtocolError, before the backbone loads, when the protocol does not score this run's kind of task."""
    _load_all()
    if name not in PROTOCOLS:
        raise UnknownProtocol(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    tasks = TASKS.get(name)
    if tasks and regime.task not in tasks:
        fits = sorted(n for n, t in TASKS.items() if t is None or regime.task in t)
        raise ProtocolError(f"protocol {name} scores {'/'.join(tasks)} runs, and "
                            f"{run_name or 'this run'} is a {regime.task} run (regime {regime.name}); choose "
                            f"protocol={' or protocol='.join(fits) or '(none fits)'}")


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
