"""The pre-registered selection rules of the reproduction's second round: which head, which two tasks, which
engaged LR-LoRA and which learning rate per arm, chosen from pilot and selection runs by rules committed before
them (`select:` in analysis/rules/round2.yaml; REPRODUCTION.md, "Design and decision rules").

    python -m analysis.selection                     # apply the rules to results/reproduction2, print the evidence
    values = update("analysis/rules/round2.yaml")    # the same, returning {key: value}; the grid runner calls it

Every rule reads best validation scores only (test scores are never looked at before the test grid). A value is
written to the rules' `selection` file once every run it needs exists, and never changed afterwards: a rerun or a
later result cannot move a choice that later runs were made with. Until then the key is absent and the grid's
steps that use it (`@key` in analysis/scales.yaml) wait. Keys: head, task_a, task_b, smollm2_primary,
engaged_pre_scale (null: no setting engages and trains), primary_pre_scale (the engaged one, else 1.0),
lr_lora, lr_centred, lr_engaged, lr_primary; lr_smollm2_lora, lr_smollm2_primary (on validation loss);
lr_engaged_post (Addendum A's arm, by the same `lr` rule).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import rulesfile
from analysis.rulesfile import ROOT, RULES, resolve
from analysis.targets import target
from lrlora import cli
from lrlora._atomic import atomic_json
from lrlora.errors import UserError

WAIT = object()  # a rule whose runs are not all in yet
SELECTORS: dict[str, Callable] = {}


class SelectionError(UserError, ValueError):
    """A rules file this module cannot apply (an unknown rule, a missing key)."""


def selector(name: str):
    def deco(fn):
        SELECTORS[name] = fn
        return fn
    return deco


def load_rules(path: str | Path = RULES) -> dict:
    """The rules file as written (analysis.rulesfile.read); this module reads its `select:` and `results:`."""
    return rulesfile.read(path)


def chance_store(results_path: str | Path) -> Path:
    """Where a round keeps its chance levels (analysis.stats.chance's `store`): beside its results folder."""
    return Path(results_path).parent / "chance.json"


def val_chance(row: pd.Series, data_dir: str) -> float:
    """Chance (%) of the run's own validation slice (analysis.stats.chance, kept beside the round's results), its
    regime read from its results file."""
    from analysis.stats import chance

    path = Path(row["path"])
    return chance(json.loads(path.read_text())["config"]["regime"], data_dir, split="val",
                  store=chance_store(path.parent))[0]


def pick(df: pd.DataFrame, filters: dict) -> pd.DataFrame:
    """The rows matching every {column: value} (a list: any of its values), as analysis.select.matching reads them."""
    from analysis.select import matching

    return df[matching(df, filters)] if len(df) else df


def best_val(df: pd.DataFrame) -> pd.Series:
    return 100 * df["metrics.train.best_val"].astype(float)


# --- the rules: fn(spec, df, chosen, ctx) -> (value or WAIT, evidence rows) ----------------------------------------
@selector("head")
def _head(spec, df, chosen, ctx):
    tasks = ctx["rules"]["select"]["tasks"]
    regimes = list(tasks["suite"]) + list(tasks.get("fill") or [])
    runs = pick(df, {**spec["runs"], "config.regime.train.lr": 1e-3, "regime": regimes})
    rows, stats = [], {}
    for head in spec["candidates"]:
        mine = pick(runs, {"config.backbone.pooling": head})
        if set(mine["regime"]) != set(regimes):
            return WAIT, []
        excess = [float(b) - val_chance(r, ctx["data_dir"]) for (_, r), b in zip(mine.iterrows(), best_val(mine))]
        collapsed = sum(e < spec["collapsed_within"] - 1e-9 for e in excess)
        stats[head] = (collapsed, float(np.mean(excess)))
        rows.append({"head": head, "collapsed": collapsed, "mean excess over chance": round(float(np.mean(excess)), 2)})
    a, b = spec["candidates"]
    if stats[a][0] != stats[b][0]:
        return (a if stats[a][0] < stats[b][0] else b), rows
    if abs(stats[a][1] - stats[b][1]) <= spec["tie"]:
        return spec["default"], rows
    return (a if stats[a][1] > stats[b][1] else b), rows


@selector("tasks")
def _tasks(spec, df, chosen, ctx):
    if "head" not in chosen:
        return WAIT, []
    runs = pick(df, {**spec["runs"], "config.regime.train.lr": 1e-3, "config.backbone.pooling": chosen["head"]})
    rows, passing, fill = [], [], []
    for regime in [*spec["suite"], *(spec.get("fill") or [])]:
        r = pick(runs, {"regime": regime})
        if len(r) != 1:
            return WAIT, []
        score = float(best_val(r).iloc[0])
        excess = score - val_chance(r.iloc[0], ctx["data_dir"])
        # a score is k/n questions: 100 * 0.57 is 56.99999999999999 in floating point, so compare within 1e-9
        ok = excess >= spec["above_chance"] - 1e-9 and score <= spec["below"] + 1e-9
        (passing if regime in spec["suite"] else fill).append((excess, regime)) if ok else None
        rows.append({"task": regime, "best val": round(score, 1), "excess over chance": round(excess, 1),
                     "passes": ok})
    ranked = [t for _, t in sorted(passing, reverse=True)]
    n_suite = len(ranked)
    ranked += [t for _, t in sorted(fill, reverse=True)]
    value = {"task_a": ranked[0] if ranked else None, "task_b": ranked[1] if len(ranked) > 1 else None,
             "smollm2_primary": n_suite < spec["primary_smollm2_if_fewer_than"]}
    return value, rows


@selector("engaged")
def _engaged(spec, df, chosen, ctx):
    if "task_a" not in chosen:
        return WAIT, []
    if chosen["task_a"] is None:  # no task passed: nothing to calibrate an engaged σ on, the centred arm is primary
        return {"engaged_pre_scale": None, "primary_pre_scale": 1.0}, [{"pre_scale": "—", "note": "no task_a"}]
    where = {"regime": chosen["task_a"], "config.backbone.pooling": chosen["head"], "config.regime.train.lr": 1e-3}
    lora = pick(df, {"adapter": "lora", "seed": 1, "r": 4, **where})
    runs = pick(df, {**spec["runs"], **where, "config.adapter.center": True})
    if len(lora) != 1:
        return WAIT, []
    floor = float(best_val(lora).iloc[0]) - spec["trains_within"]
    rows, value = [], None
    for s in spec["candidates"]:
        r = pick(runs, {"config.adapter.pre_scale": float(s)})
        if len(r) != 1:
            return WAIT, []
        row = r.iloc[0]
        energy = row.get("mechanism.summary.energy_beyond_r.median")
        resid = row.get("mechanism.summary.linear_residual.median")
        score = float(best_val(r).iloc[0])
        engages = energy is not None and resid is not None and energy >= spec["energy_beyond_r"] \
            and resid >= spec["linear_residual"]
        trains = score >= floor - 1e-9  # k/n scores: equal ones must compare equal
        rows.append({"pre_scale": s, "energy beyond r (median)": _sig(energy), "linear residual (median)": _sig(resid),
                     "best val": round(score, 1), "LoRA's − 3": round(floor, 1), "engages": engages,
                     "trains": trains})
        if value is None and engages and trains:
            value = float(s)
    return {"engaged_pre_scale": value, "primary_pre_scale": value if value is not None else 1.0}, rows


def _sig(x) -> str:
    """Two significant digits (the mechanism's ratios span 1e-13 to 1), '—' when missing."""
    return "—" if x is None or x != x else f"{x:.2g}"


def arm_filters(ctx, name: str, chosen: dict) -> dict:
    """An arm's filters as the rules file's `arms:` give them (the ones the verdicts use), "@key" read from `chosen`."""
    return {k: (chosen[v[1:]] if isinstance(v, str) and v.startswith("@") else v)
            for k, v in ctx["rules"]["arms"][name].items()}


def _best_rate(df, where, filters, spec, arm, rows, scale=100.0, higher=True):
    """The grid's rate with the best mean best-validation score over the seeds (higher for accuracies, lower for
    losses); within `tie`, the smaller rate. WAIT while a (rate, seed) run is missing."""
    means = {}
    for lr in spec["grid"]:
        r = pick(df, {**where, **filters, "config.regime.train.lr": float(lr)})
        if len(r) != len(spec["seeds"]):
            return WAIT
        means[float(lr)] = float(scale * r["metrics.train.best_val"].astype(float).mean())
        what = "best val, mean over seeds" if higher else "best val loss, mean over seeds"
        rows.append({"arm": arm, "lr": lr, what: round(means[float(lr)], 3 if scale == 1 else 2)})
    sign = 1 if higher else -1
    top = max(sign * m for m in means.values())
    return min(lr for lr, m in means.items() if sign * m >= top - spec["tie"] - 1e-9)


@selector("lr")
def _lr(spec, df, chosen, ctx):
    if "engaged_pre_scale" not in chosen:
        return WAIT, []
    if chosen["task_a"] is None:  # no MiniLM task: no MiniLM rates to choose (its steps are dropped)
        return {f"lr_{arm}": None for arm in [*spec["arms"], "primary"]}, []
    where = {**spec["runs"], "regime": chosen["task_a"], "config.backbone.pooling": chosen["head"],
             "seed": list(spec["seeds"])}
    value, rows = {}, []
    for arm in spec["arms"]:
        if arm == "engaged" and chosen["engaged_pre_scale"] is None:  # no engaged arm: nothing to choose
            value["lr_engaged"] = None
            continue
        filters = arm_filters(ctx, arm, chosen)
        best = _best_rate(df, where, filters, spec, arm, rows)
        if best is WAIT:
            return WAIT, []
        value[f"lr_{arm}"] = best
    if "lr_centred" in value:  # the primary arm's rate: the engaged arm's if one trains, else the centred one's
        value["lr_primary"] = value["lr_engaged"] if value.get("lr_engaged") is not None else value["lr_centred"]
    return value, rows


@selector("lr_loss")
def _lr_loss(spec, df, chosen, ctx):
    """Learning rates for a setting selected on validation loss (SmolLM2): LoRA and the primary LR-LoRA arm."""
    if "primary_pre_scale" not in chosen:
        return WAIT, []
    where = {**spec["runs"], "seed": list(spec["seeds"])}
    value, rows = {}, []
    for arm in spec["arms"]:
        filters = arm_filters(ctx, arm, chosen)
        best = _best_rate(df, where, filters, spec, arm, rows, scale=1.0, higher=False)
        if best is WAIT:
            return WAIT, []
        value[f"{spec['prefix']}{arm}"] = best
    return value, rows


def evaluate(rules: dict, df: pd.DataFrame, chosen: dict, data_dir: str) -> tuple[dict, dict]:
    """Apply every selection rule in order over the runs in `df`, keeping `chosen` values as they are: the new
    {key: value} and {rule name: evidence rows}."""
    chosen, evidence = dict(chosen), {}
    ctx = {"rules": rules, "data_dir": data_dir}
    for name, spec in (rules.get("select") or {}).items():
        fn = SELECTORS.get(spec.get("rule"))
        if fn is None:
            raise SelectionError(f"selection {name!r}: unknown rule {spec.get('rule')!r}; known: {sorted(SELECTORS)}")
        value, rows = fn(spec, df, chosen, ctx) if len(df) else (WAIT, [])
        evidence[name] = rows
        if value is WAIT:
            continue
        for k, v in (value if isinstance(value, dict) else {name: value}).items():
            chosen.setdefault(k, v)  # a chosen value never moves
    return chosen, evidence


def update(rules_path: str | Path = RULES, root: str | Path | None = None, data_dir: str | None = None,
           write: bool = True) -> tuple[dict, dict]:
    """Apply the rules to the runs under `root` (default: the rules' results folder's parent) and write the
    selection file with any value newly decided. Returns ({key: value}, evidence)."""
    from analysis.load import load_results

    rules = load_rules(rules_path)
    results = resolve(rules["results"]) if root is None else Path(root) / "results"
    sel_path = resolve(rules["selection"]) if root is None else Path(root) / Path(rules["selection"]).name
    old = json.loads(sel_path.read_text()) if sel_path.exists() else {}
    df = load_results([results]) if results.exists() and any(results.glob("*.json")) else pd.DataFrame()
    chosen, evidence = evaluate(rules, df, old, data_dir or str(ROOT / "data"))
    if write and chosen != old:
        atomic_json(sel_path, chosen, indent=1, sort_keys=True)
    return chosen, evidence


KEYS = ("head", "task_a", "task_b", "smollm2_primary", "engaged_pre_scale", "primary_pre_scale", "lr_lora",
        "lr_centred", "lr_engaged", "lr_primary", "lr_smollm2_lora", "lr_smollm2_primary", "lr_engaged_post")


@target("selection2", "table", "REPRODUCTION.md round 2: the pre-registered choices", own_results=True)
def selection2(df, ctx):
    """REPRODUCTION.md's selection block: each rule's evidence (best validation scores, in points) and the values
    the selection file holds; recomputed from the runs, written nowhere."""
    from analysis.render import Table

    rules = load_rules(ctx.options.get("rules", RULES))
    chosen, evidence = update(ctx.options.get("rules", RULES), write=False)
    body = []
    for name, rows in evidence.items():
        for row in rows:
            first, *rest = row.items()
            body.append([name, f"{first[0]} {first[1]}", "; ".join(f"{k} {v}" for k, v in rest)])
        if not rows:
            body.append([name, "—", "waiting for its runs"])
    notes = ["Chosen (results/reproduction2/selection.json): "
             + (", ".join(f"{k} = {chosen[k]}" for k in KEYS if k in chosen) or "nothing yet") + ".",
             "Not chosen yet: " + (", ".join(k for k in KEYS if k not in chosen) or "none") + ".",
             f"Rules: `select` of {resolve(ctx.options.get('rules', RULES)).relative_to(ROOT)} (seeds "
             f"{rules['select']['lr']['seeds']} for selection; validation scores only)."]
    return Table("selection2", "Round 2: the pre-registered choices and their evidence", ["rule", "candidate",
                 "evidence"], body, notes)


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m analysis.selection", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", default=str(RULES))
    ap.add_argument("--root", default=None, help="the grid's root (default: the rules' results folder's parent)")
    ap.add_argument("--dry-run", action="store_true", help="print; write no selection file")
    args = ap.parse_args(argv)
    chosen, evidence = update(args.rules, args.root, write=not args.dry_run)
    for name, rows in evidence.items():
        print(f"## {name}")
        if rows:
            print(pd.DataFrame(rows).to_markdown(index=False))
        else:
            print("(waiting for its runs)")
    print(json.dumps(chosen, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    cli.run(main)
