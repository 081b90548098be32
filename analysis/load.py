"""Every results file -> one pandas DataFrame, one row per run, flattened by docs/RESULTS.md.

    from analysis import load_results
    df = load_results(["outputs/results"])          # every *.json under the folders (recursively)
    df[(df.adapter == "lrlora") & (df["config.adapter.center"] == True)]

Columns: the identity fields (`run_name backbone adapter regime r seed tags`), every metric as
`metrics.<protocol>.<field>` (`metrics.train.best_val`, `metrics.commonsense_gen.tasks.boolq.accuracy`, ...),
`params.*`, `timing.*`, `memory.*`, `stable_ranks.all.*`, the whole config as `config.*`, plus derived
columns: `method` (the paper's name), `data` (the regime, with its training cap), `column` (backbone, data),
`score` (the regime's headline metric in %), `variant` (adapter settings that differ from its YAML, e.g.
`K=25`: '' for a method's own runs), `git.commit`, `path`. The per-layer stable ranks and mechanism diagnostics
stay one dict per run, `stable_ranks.per_layer` and `mechanism.per_layer` (figures and the mechanism table read
them; flattened, module names holding dots would each become columns); `mechanism.r` and
`mechanism.summary.<field>.<stat>` are columns.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import pandas as pd

from lrlora.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@cache
def method_labels() -> dict[str, str]:
    """{adapter name: the method's name in tables (the paper's)}: each registered method's own `label`."""
    from baselines import methods

    return {name: cls.label for name, cls in methods().items()}


# headline metric per protocol (in the order tried), as the paper reports it; GLUE per task below
HEADLINE = (("commonsense_gen", "accuracy"), ("vision", "top1"), ("lm_eval", "acc"))  # MT-Bench: Table 5 only
GLUE_METRIC = {"cola": "matthews", "stsb": "pearson"}  # the rest: accuracy (Table 2, RandLoRA's protocol)


class ResultsError(UserError, ValueError):
    """A results file that cannot be read, no results where some were asked for, or two files that claim one run
    with different numbers."""


def _flatten(d, prefix: str, out: dict, keep_dicts: tuple = ()) -> dict:
    # unlike experiments.identity.flatten: some dicts stay whole (per-layer ranks) and lists become tuples, so
    # DataFrame columns stay hashable for groupby/unique
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in keep_dicts:
            out[key] = v
        elif isinstance(v, dict):
            _flatten(v, key, out, keep_dicts)
        elif isinstance(v, list):
            out[key] = tuple(v)
        else:
            out[key] = v
    return out


def read_results(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: not a readable results file ({e}). Delete it or re-run that run.") from e
    from experiments.results import RunResult

    try:
        return RunResult.from_dict(d).to_dict()
    except ValueError as e:
        raise ResultsError(f"{path}: {e}. Move it out of the results folder.") from None


def upgrade_legacy(d: dict) -> dict:
    """A results file from before the `metrics.<protocol>` contract (flat `metrics.test_*`, `best_val_*`, ...)
    -> the contract's layout: the same numbers under the keys docs/RESULTS.md gives them, chosen by the
    regime's task (generation -> commonsense_gen, classification -> glue, images -> vision)."""
    m = d.get("metrics") or {}
    if "train" in m or not any(k.startswith(("test_", "best_val_")) or k == "steps" for k in m):
        return d
    best = next(((k[len("best_val_"):], v) for k, v in m.items() if k.startswith("best_val_")), (None, None))
    train = {"best_val": best[1], "best_val_metric": best[0], "best_step": m.get("best_step"),
             "final_train_loss": m.get("final_train_loss"), "steps": m.get("steps"),
             "stopped_early": m.get("stopped_early")}
    test = {k[len("test_"):]: v for k, v in m.items() if k.startswith("test_")}
    task = ((d.get("config") or {}).get("regime") or {}).get("task")
    if "per_task" in test:  # the generation protocol
        per_task = test.pop("per_task") or {}
        proto = {**test, "tasks": {t: {"accuracy": v} for t, v in per_task.items()}}
        name = "commonsense_gen"
    elif task == "image_classification":
        name, proto = "vision", {"top1": test.get("accuracy"), "loss": test.get("loss")}
    else:
        name, proto = "glue", test
    return {**d, "metrics": {"train": train, name: proto}}


def headline_score(row: dict) -> float | None:
    """The regime's headline metric in % (commonsense accuracy, GLUE task metric, vision top-1, ...)."""
    for proto, field in HEADLINE:
        v = row.get(f"metrics.{proto}.{field}")
        if v is not None:
            return 100 * v
    if row.get("metrics.glue.n") is not None or row.get("metrics.glue.accuracy") is not None:
        if row.get("metrics.glue.choice_accuracy") is not None:  # (question, option) pairs (bb_<task> regimes):
            return 100 * row["metrics.glue.choice_accuracy"]     # the task's accuracy, not the pairs' (mostly 0s)
        task = str(row.get("regime", ""))
        v = row.get(f"metrics.glue.{GLUE_METRIC.get(task, 'accuracy')}")
        return None if v is None else 100 * v
    return None


def data_label(row: dict) -> str:
    """The regime, and its training cap when one was set (a smoke/mini stand-in: `bbc_news_gen[n=16]`)."""
    n = row.get("config.regime.n_train")
    return f"{row['regime']}[n={n}]" if n not in (None, "") and not _isnan(n) else str(row["regime"])


def column_label(backbone: str, data: str) -> str:
    """A table column: the backbone and the data it trained on (`tiny_decoder, bbc_news_gen[n=16]`)."""
    return f"{backbone}, {data}"


def _isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def to_row(d: dict, path: Path | None = None) -> dict:
    d = upgrade_legacy(d)
    row = _flatten({k: v for k, v in d.items() if k not in ("config", "samples")}, "", {},
                   keep_dicts=("stable_ranks.per_layer", "mechanism.per_layer", "adapter_extra"))
    _flatten(d.get("config") or {}, "config", row)
    row["tags"] = tuple(d.get("tags") or ())
    row["path"] = str(path) if path else None
    row["method"] = method_labels().get(d["adapter"], d["adapter"])
    row["data"] = data_label(row)
    row["column"] = column_label(d["backbone"], row["data"])
    row["score"] = headline_score(row)
    row["variant"] = variant_of(d)
    return row


_DEFAULTS: dict[str, dict] = {}


def adapter_defaults(adapter: str) -> dict:
    """The adapter's settings as conf/adapter/<name>.yaml gives them (the reference for `variant`)."""
    if adapter not in _DEFAULTS:
        from omegaconf import OmegaConf

        path = CONF_DIR / "adapter" / f"{adapter}.yaml"
        _DEFAULTS[adapter] = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {}
    return _DEFAULTS[adapter]


def variant_of(d: dict) -> str:
    """`K=25, center=True`: the adapter settings that differ from its YAML (size settings aside:
    experiments.identity decides which); '' if none.
    Tables of methods (1, 2, 4) take the '' runs; ablation tables read the rest."""
    from experiments.identity import adapter_variant

    diff = adapter_variant((d.get("config") or {}).get("adapter") or {}, adapter_defaults(d["adapter"]))
    return ", ".join(f"{k}={v}" for k, v in sorted(diff.items()))


def load_results(dirs=("outputs/results",), strict: bool = True) -> pd.DataFrame:
    """One row per results file found under `dirs` (a folder or a file each). An unreadable file is an error
    (strict) or skipped with a warning; a folder that does not exist is an error."""
    rows = []
    for d in [dirs] if isinstance(dirs, (str, Path)) else dirs:
        d = Path(d)
        if not d.exists():
            raise ResultsError(f"{d}: no such results folder. Run some experiments first (python -m "
                               f"experiments.train ...) or pass --results DIR")
        for path in sorted([d] if d.is_file() else d.rglob("*.json")):
            try:
                rows.append(to_row(read_results(path), path))
            except ResultsError as e:
                if strict:
                    raise
                print(f"warning: {e}")
    rows = _one_row_per_run(rows)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["run_name", "backbone", "adapter", "regime", "r", "seed", "tags", "method",
                                     "data", "column", "score"])
    return df.reset_index(drop=True)


_SAME_NUMBERS = ("metrics.", "params.")  # what two copies of one run's results file must agree on


def _one_row_per_run(rows: list[dict]) -> list[dict]:
    """Copies of one run's results file (the same run name in two folders) count once; two files that claim one
    run name with different numbers are an error naming both, never a silent pick of one."""
    seen: dict[str, dict] = {}
    for row in rows:
        first = seen.setdefault(row["run_name"], row)
        if first is row:
            continue
        numbers = [{k: v for k, v in r.items() if k.startswith(_SAME_NUMBERS) and not _isnan(v)} for r in (first, row)]
        if numbers[0] != numbers[1]:
            differ = sorted(k for k in set(numbers[0]) | set(numbers[1]) if numbers[0].get(k) != numbers[1].get(k))
            raise ResultsError(f"{first['path']} and {row['path']} both claim run {row['run_name']!r} with different "
                               f"numbers ({', '.join(differ[:3])}); keep the one you mean and move the other out of "
                               f"the results folders given")
    return list(seen.values())


def has_tag(df: pd.DataFrame, tag: str) -> pd.Series:
    return df["tags"].apply(lambda t: tag in (t or ()))


def para_derived(df: pd.DataFrame) -> pd.Series:
    """Rows that are PARA's compressed copies of a run (experiments.para: config.para.source_run; the older
    scripts/para_bbc.py: a config.para threshold), not runs of their own."""
    out = pd.Series(False, index=df.index)
    for key in ("config.para.source_run", "config.para.keep_energy", "config.para.reduction"):
        if key in df.columns:
            out |= df[key].notna()
    return out
