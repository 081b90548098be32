"""Which settings change a run's result, in one place: run names (experiments/naming.py), run fingerprints
(experiments/guard.py), staleness (analysis/reproduce.py) and the analysis' grouping of runs into methods and
variants (analysis/load.py) all read this module, and so does the harness for the adapter's keyword arguments.

    settings = result_settings(cfg)      # {dotted key: value} that shapes the result, coordinates aside (names)
    kept = result_config(config)         # the resolved config without runtime knobs (fingerprints)
    kwargs = adapter_kwargs(cfg)         # what apply_adapter gets: the adapter group joined with the others

What changes a result: everything in the backbone, regime and adapter groups, the trainer settings in
RESULT_TRAINER_KEYS, the seed; not the runtime knobs in NON_RESULT (logging, paths, threads, resume, tags).
Of the adapter's settings, SIZE_KEYS set its size (the table's r and budget) rather than make a run an
ablation variant.

Settings added later: a new option listed in ADDED with its default counts as that default in a config that
lacks it (a run made before the option existed). `result_settings` and `result_config` leave such a key out
when it holds its default, so adding an option to a config group, with a default that keeps today's behaviour,
changes neither the names, the fingerprints nor the staleness of runs made before it; a run that sets another
value is a run of its own, named `__<option>=<value>` like any other override.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

GROUPS = ("backbone", "regime", "adapter")
COORDINATES = {"backbone.name", "regime.name", "adapter.name", "adapter.r"}  # the run name's own fields (and seed)
# trainer settings that change what a run learns or which checkpoint it keeps (the rest are runtime knobs)
RESULT_TRAINER_KEYS = ("max_steps", "grad_accum", "eval_every", "eval_max_examples", "precision")
# keys that cannot change a result: left out of the fingerprint (dotted paths into the resolved config)
NON_RESULT = ("logger", "paths", "run_name", "tags", "hydra", "trainer.progress", "trainer.num_threads",
              "trainer.log_every", "trainer.save_every", "trainer.resume", "trainer.force")
# adapter settings that set its size (the table's "r" and budget) or that the harness fills from the other groups,
# rather than make a run an ablation variant (analysis' `variant`)
SIZE_KEYS = frozenset({"r", "lora_alpha", "randlora_alpha", "target_r", "r_max", "target_modules", "dropout",
                       "modules_to_save", "name", "lr", "num_basis_A", "num_basis_B", "eval_rank"})
# adapter-YAML fields the harness reads itself; every other adapter setting goes to apply_adapter
HARNESS_KEYS = ("name", "lr")
# settings added to a config group after runs were made: {dotted key: the default that keeps the old behaviour}.
# Add a new result-affecting option here when it gets its YAML default (module docstring).
ADDED: dict[str, object] = {
    "backbone.pooling": "cls",  # an encoder classification head's pooling (experiments/backbones.py)
}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"adapter": {"r": 4}} -> {"adapter.r": 4} (empty dicts stay values). Also W&B's flat config."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def at_added_default(key: str, value) -> bool:
    """True when `key` is a setting added later (ADDED) and `value` is its default: the same as absent."""
    return key in ADDED and value == ADDED[key]


def result_settings(cfg) -> dict:
    """The flat {dotted key: value} of everything that shapes the result, coordinates excluded (and settings
    added later left out at their default)."""
    def part(node):  # one subtree at a time: resolving the whole root would resolve run_name itself
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else (node or {})

    flat = {}
    for g in GROUPS:
        flat.update(flatten(part(cfg.get(g)), g))
    trainer = cfg.get("trainer") or {}
    for k in RESULT_TRAINER_KEYS:
        flat[f"trainer.{k}"] = trainer.get(k, ADDED.get(f"trainer.{k}"))
    return {k: v for k, v in flat.items() if k not in COORDINATES and not at_added_default(k, v)}


def _drop(tree: dict, path: str, only_if=None) -> None:
    node, *rest = path.split(".")
    parent = tree
    while rest and isinstance(parent.get(node), dict):
        parent, node, rest = parent[node], rest[0], rest[1:]
    if not rest and node in parent and (only_if is None or only_if(parent[node])):
        parent.pop(node)


def result_config(config: dict) -> dict:
    """The resolved config without the keys that cannot change a result (and settings added later left out at
    their default): what a run's fingerprint covers, and what two results files of one run must agree on."""
    out = json.loads(json.dumps(config, default=str))
    for path in NON_RESULT:
        _drop(out, path)
    for path in ADDED:
        _drop(out, path, lambda v, path=path: at_added_default(path, v))
    return out


def adapter_variant(adapter_cfg: dict, yaml_defaults: dict) -> dict:
    """{setting: value} of the adapter settings that make a run an ablation variant: those that differ from the
    adapter's YAML (size settings and settings added later at their default aside)."""
    def counts(k, v):
        return k not in SIZE_KEYS and not at_added_default(f"adapter.{k}", v)

    diff = {k: v for k, v in adapter_cfg.items() if counts(k, v) and k in yaml_defaults and v != yaml_defaults[k]}
    diff.update({k: v for k, v in adapter_cfg.items() if counts(k, v) and k not in yaml_defaults and v is not None})
    return diff


def adapter_kwargs(cfg: DictConfig) -> dict:
    """Join the groups: the adapter's kwargs with target modules from the backbone, dropout from the regime,
    and the new task head (classifier/score) as modules_to_save when the regime classifies."""
    kw = {k: v for k, v in OmegaConf.to_container(cfg.adapter, resolve=True).items() if k not in HARNESS_KEYS}
    if kw.get("target_modules") is None:
        kw["target_modules"] = list(cfg.backbone.target_modules)
    if kw.get("dropout") is None:
        kw["dropout"] = float(cfg.regime.get("adapter_dropout", 0.0))
    if kw.get("modules_to_save") is None:
        kw["modules_to_save"] = list(cfg.backbone.head_modules) if cfg.regime.task != "causal_lm" else []
    return kw
