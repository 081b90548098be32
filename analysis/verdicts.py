"""Verdicts from a pre-registered rules file: the decision rules of a reproduction round are data (a YAML file
committed before any of its runs), and this module applies them to the round's results files, so that no verdict
is typed by hand.

    python -m analysis verdicts2 --out outputs/analysis     # one row per claim (analysis/rules/round2.yaml)
    python -m analysis verdict_tests2 --out outputs/analysis  # one row per test and group, with the rule applied
    python -m analysis.report REPRODUCTION.md               # their <!-- analysis: verdicts2 --> blocks

    from analysis.verdicts import read_rules, evaluate
    outcomes = evaluate(read_rules("analysis/rules/round2.yaml"))

Its table targets (verdicts2, verdict_tests2, headline2) are in analysis/verdict_tables.py. They read the results
folder their rules file names (`results:`), whatever `--results` says (`own_results` in analysis.targets); the
rules file is the target option `rules` (default RULES), the data folder
for chance levels the option `data_dir` (default: each run's own `paths.data_dir`). A rules file holds `results`,
`selection`, `alpha`, `seeds`, `arms` and `claims` (`select` is analysis.selection's); it is validated strictly:
an unknown kind, arm or key, or a missing one, is one RulesError naming the claim, the test and the key.

What the rules mean:

- Rows: every results file under `results` (analysis.load), restricted to the test `seeds`. An arm is a filter on
  the DataFrame's columns (analysis.select.matching); a value "@key" is read from the `selection` JSON (a flat
  {key: value}): while the file or the key is missing, the arm is not selected yet and its tests say
  `waiting: <key> not selected`; a key selected as null makes them `not testable`. PARA's copies of a run
  (analysis.load.para_derived) belong to an arm only when a test names them, `{arm: lora, para: red0.75}` (the
  `para-red0.75` of their file names, experiments.para.setting_label); a plain arm never includes them. `where`
  filters further; `by` (a column, or a list) splits a test into groups, the union of the groups its arms' runs
  fall in and the ones `groups` names (a registered group with no runs yet waits, so a claim is never decided on
  the groups that happen to be in); an arm matching two runs of one seed in a group is an error (narrow the arm).
- `paired`: per group, d_s = treatment − control for every seed present in both; n such seeds; mean, sample sd,
  the 95% t-interval and the two-sided one-sample t-test of d against 0 (analysis.stats). Tests sharing a `family`
  (across claims) are Holm-corrected together, each group a member; two members with the same metric, kind, group
  and runs (two arms that the selection made one) are one test, counted once, both rows showing its p_holm. Tried
  in this order: holds if p (p_holm in a family) < alpha and mean > 0; does not hold if the 95% interval's upper
  bound < margin; else inconclusive.
  Fewer than `min_n` seeds: `waiting (n of min_n seeds)`, no verdict, and out of its Holm family (the table says).
- `interaction`: d_s = (treatment − control at `at`) − (treatment − control at `versus`), one seed throughout
  (`at`, `versus`: filters); then as paired.
- `within`: per run of `arm`, d = metric − `versus` (a column, or a number); then as paired.
- `equivalence`: d_s as paired; TOST at alpha: holds if the (1 − 2·alpha) interval lies inside (−margin, +margin);
  does not hold if the 95% interval lies entirely below −margin or entirely above +margin; else inconclusive.
  Its p is the TOST p (analysis.stats.tost); it has no family.
- `trains`: per group, the arm's runs at each value of `over` (a learning rate, say); the value chosen has the
  highest mean `select_on` (a validation score, higher better; a tie goes to the smaller value), never the test
  score. Excess = metric − chance, chance that of the run's own test slice (analysis.stats.chance, per regime).
  Fewer than `min_n` runs at the chosen value: waiting; holds if the mean excess there ≥ `holds_above`; does not
  hold if the mean excess < `fails_below` at every value; else inconclusive. A chance level whose test data is not
  on this machine makes the test wait, saying so.
- `combine: all`: a claim holds if every test (every group) holds, does not hold if every one does not hold, else
  inconclusive; `combine: each` (a claim made of parts that must each hold): holds if every one holds, does not
  hold if any one does not, else inconclusive; any test not testable makes it `not testable`, else any waiting makes it `waiting`.
- No rules file: the table says so. No results folder (or an empty one): every test waits.

Differences are shown in points (one decimal) for `score` and for an accuracy kept as a fraction of 1 (`accuracy`,
`acc`, ... of a protocol's metrics: ×100, the margins that the rules file writes in its units with them), in the
metric's own units with two decimals for any other metric (a stable rank); p-values have two significant digits.
Only the display changes: every rule compares the metric in the units the rules file uses.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import rulesfile
from analysis.rulesfile import RULES, RulesError, resolve
from analysis.select import get_column, matching
from analysis.stats import chance, holm, mean_std, paired_ci, paired_ttest, tost

TOP = {"results": True, "selection": False, "alpha": True, "seeds": True, "arms": True, "claims": True,
       "select": False, "path": False}  # key: required; `select` is analysis.selection's, `path` rulesfile.read's
CLAIM_KEYS = ("claim", "statement", "combine", "tests")
COMBINE = ("all", "each")
DIFFERENCE = ("paired", "interaction", "within")  # one-sample t-test of a difference, Holm within a family
KEYS = {  # kind: (required keys, optional keys), besides label and kind
    "paired": (("metric", "treatment", "control", "min_n", "margin"), ("where", "by", "groups", "family")),
    "interaction": (("metric", "treatment", "control", "at", "versus", "min_n", "margin"),
                    ("where", "by", "groups", "family")),
    "within": (("metric", "arm", "versus", "min_n", "margin"), ("where", "by", "groups", "family")),
    "equivalence": (("metric", "treatment", "control", "min_n", "margin"), ("where", "by", "groups")),
    "trains": (("metric", "arm", "over", "select_on", "min_n", "holds_above", "fails_below"),
               ("where", "by", "groups", "values")),
}
PARA = re.compile(r"(keep|red)(\d+(?:\.\d*)?|\.\d+)")
PROPORTIONS = ("accuracy", "strict_accuracy", "acc", "acc_norm")  # a protocol's accuracy: a fraction of 1
BEST_VAL = "metrics.train.best_val"  # a run's best validation score (its metric: metrics.train.best_val_metric)
HOLDS, FAILS, OPEN, WAITING, UNTESTABLE = "holds", "does not hold", "inconclusive", "waiting", "not testable"


# ---------------------------------------------------------------------------------------------- the rules file
def read_rules(path=RULES) -> dict:
    """The rules file (analysis.rulesfile.read), validated; RulesError naming the claim, the test and the key for
    anything wrong."""
    rules = rulesfile.read(path)
    validate(rules, str(rules["path"]))
    return rules


def validate(rules, where: str = "the rules file") -> None:
    def err(msg):
        raise RulesError(f"{where}: {msg}")

    if not isinstance(rules, dict):
        err("must be a mapping of results, selection, alpha, seeds, arms, claims")
    for key, required in TOP.items():
        if required and key not in rules:
            err(f"missing key {key!r}")
    for key in rules:
        if key not in TOP:
            err(f"unknown key {key!r} (known: {', '.join(TOP)})")
    if not isinstance(rules["results"], str) or ("selection" in rules and not isinstance(rules["selection"], str)):
        err("`results` and `selection` are paths (relative to the repository root)")
    if not _number(rules["alpha"]) or not 0 < rules["alpha"] < 0.5:
        err(f"`alpha` must be a number between 0 and 0.5, not {rules['alpha']!r}")
    seeds = rules["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        err(f"`seeds` must be a non-empty list of integers, not {seeds!r}")
    arms = rules["arms"]
    if not isinstance(arms, dict) or not arms:
        err("`arms` must map each arm's name to its filters ({column: value})")
    keys = set()
    for name, filters in arms.items():
        keys |= _filters(filters, f"arm {name!r}", err)
    if keys and "selection" not in rules:
        err(f"arms read {', '.join(sorted('@' + k for k in keys))} but no `selection` file is named")
    claims = rules["claims"]
    if not isinstance(claims, list) or not claims:
        err("`claims` must be a non-empty list")
    ids = set()
    for i, claim in enumerate(claims):
        if not isinstance(claim, dict):
            err(f"claim #{i + 1} must be a mapping of {', '.join(CLAIM_KEYS)}")
        cid = claim.get("claim", f"#{i + 1}")
        at = f"claim {str(cid)!r}"
        for key in CLAIM_KEYS:
            if key not in claim:
                err(f"{at}: missing key {key!r}")
        for key in claim:
            if key not in CLAIM_KEYS:
                err(f"{at}: unknown key {key!r} (known: {', '.join(CLAIM_KEYS)})")
        if str(cid) in ids:
            err(f"{at}: named twice")
        ids.add(str(cid))
        if claim["combine"] not in COMBINE:
            err(f"{at}: combine {claim['combine']!r} is not one of {', '.join(COMBINE)}")
        if not isinstance(claim["tests"], list) or not claim["tests"]:
            err(f"{at}: `tests` must be a non-empty list")
        labels = set()
        for j, test in enumerate(claim["tests"]):
            if not isinstance(test, dict):
                err(f"{at}, test #{j + 1}: must be a mapping")
            label = test.get("label")
            if not isinstance(label, str) or not label:
                err(f"{at}, test #{j + 1}: missing key 'label'")
            if label in labels:
                err(f"{at}: two tests labelled {label!r}")
            labels.add(label)
            _test(test, f"{at}, test {label!r}", arms, err)


def _test(test: dict, at: str, arms: dict, err) -> None:
    kind = test.get("kind")
    if kind is None:
        err(f"{at}: missing key 'kind'")
    if kind not in KEYS:
        err(f"{at}: kind {kind!r} is not one of {', '.join(KEYS)}")
    required, optional = KEYS[kind]
    for key in required:
        if key not in test:
            err(f"{at}: missing key {key!r} (kind {kind} needs {', '.join(required)})")
    for key in test:
        if key not in ("label", "kind", *required, *optional):
            known = ", ".join(("label", "kind", *required, *optional))
            err(f"{at}: unknown key {key!r} for kind {kind} (known: {known})")
    for key in ("treatment", "control", "arm"):
        if key not in test:
            continue
        ref = test[key]
        if isinstance(ref, dict) and key != "arm":
            for k in ref:
                if k not in ("arm", "para"):
                    err(f"{at}: {key}: unknown key {k!r} (an arm is a name, or {{arm: NAME, para: red0.75}})")
            if "arm" not in ref:
                err(f"{at}: {key}: missing key 'arm'")
            if "para" in ref and not (isinstance(ref["para"], str) and PARA.fullmatch(ref["para"])):
                err(f"{at}: {key}: para {ref['para']!r} is not a PARA setting like red0.75 or keep0.90")
            ref = ref["arm"]
        if not isinstance(ref, str) or ref not in arms:
            err(f"{at}: {key}: unknown arm {ref!r} (arms: {', '.join(arms)})")
    for key in ("where", "at") + (("versus",) if kind == "interaction" else ()):
        if key in test:
            _filters(test[key], f"{at}: {key}", err)
    for key in ("metric", "over", "select_on", "family"):
        if key in test and (not isinstance(test[key], str) or not test[key]):
            err(f"{at}: {key} must be a name, not {test[key]!r}")
    by = test.get("by")
    if by is not None and not (isinstance(by, str) or (isinstance(by, list) and by
                                                        and all(isinstance(b, str) for b in by))):
        err(f"{at}: by must be a column name or a list of them, not {by!r}")
    groups = test.get("groups")
    if groups is not None and not (by is not None and isinstance(groups, list) and groups
                                   and all(isinstance(g, str) for g in groups)):
        err(f"{at}: groups must be a non-empty list of `by` values (\"@key\" for a selected one), with `by`, "
            f"not {groups!r}")
    if kind == "within" and not (isinstance(test["versus"], str) or _number(test["versus"])):
        err(f"{at}: versus must be a column name or a number, not {test['versus']!r}")
    if not isinstance(test["min_n"], int) or isinstance(test["min_n"], bool) or test["min_n"] < 1:
        err(f"{at}: min_n must be a positive integer, not {test['min_n']!r}")
    for key in ("margin", "holds_above", "fails_below"):
        if key in test and not _number(test[key]):
            err(f"{at}: {key} must be a number, not {test[key]!r}")
    if kind == "equivalence" and test["margin"] <= 0:
        err(f"{at}: an equivalence margin must be positive, not {test['margin']!r}")
    values = test.get("values")
    if values is not None and not (isinstance(values, list) and values
                                   and all(_number(v) or isinstance(v, str) for v in values)):
        err(f"{at}: values must be a non-empty list of the values of `over` the test was registered for, "
            f"not {values!r}")
    if kind == "trains" and test["fails_below"] > test["holds_above"]:
        err(f"{at}: fails_below {test['fails_below']} is above holds_above {test['holds_above']}")


def _filters(filters, at: str, err) -> set[str]:
    """Checks {column: value} filters; the selection keys ("@key") they read."""
    if not isinstance(filters, dict):
        err(f"{at}: must be a mapping {{column: value}}, not {filters!r}")
    keys = set()
    for column, value in filters.items():
        for v in value if isinstance(value, list) else [value]:
            if not (v is None or isinstance(v, (str, bool)) or _number(v)):
                err(f"{at}: {column}: {v!r} is not a value a filter can compare")
            if isinstance(v, str) and v.startswith("@"):
                if isinstance(value, list):
                    err(f"{at}: {column}: a selection key ({v}) stands alone, not in a list")
                if not re.fullmatch(r"@\w+", v):
                    err(f"{at}: {column}: {v!r} is not a selection key (@name)")
                keys.add(v[1:])
    return keys


def is_loss(metric) -> bool:
    """A validation metric that is a loss (lower is better; not a score in points): SmolLM2's runs select on one."""
    return "loss" in str(metric)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------ applying them
@dataclass
class Outcome:
    """One test in one group: its numbers, the rule that applied and the verdict."""
    claim: str
    label: str
    kind: str
    group: str
    min_n: int
    digits: int = 1
    scale: float = 1.0  # shown × scale: 100 for an accuracy kept as a fraction (points, as `score` is)
    family: str | None = None
    n: int = 0
    mean: float | None = None
    sd: float | None = None
    lo: float | None = None
    hi: float | None = None
    p: float | None = None
    p_holm: float | None = None
    verdict: str = ""
    rule: str = ""
    at: str = ""  # trains: the value of `over` chosen by validation
    data: tuple = ()  # (metric, kind, group, run names): two outcomes alike here are one test (Holm counts it once)
    values: tuple = ()  # the per-seed differences the numbers summarise, in seed order (fig_verdicts2 draws them)

    @property
    def state(self) -> str:
        """holds, does not hold, inconclusive, waiting or not testable (the verdict without its reason)."""
        return next((s for s in (WAITING, UNTESTABLE) if self.verdict.startswith(s)), self.verdict)

    def pt(self, v) -> str:
        """A difference (or a bound) as the tables show it: signed, in points for a score or an accuracy."""
        return _pt(None if v is None else v * self.scale, self.digits)

    def ci(self, lo, hi) -> str:
        return _ci(*(None if x is None else x * self.scale for x in (lo, hi)), self.digits)

    def num(self, x) -> str:
        """A rule's threshold (a margin) in the units the differences are shown in."""
        return f"{x * self.scale:g}"

    def evidence(self) -> str:
        head = self.label + (f" ({self.group})" if self.group != "all" else "")
        if self.state in (WAITING, UNTESTABLE) or self.mean is None:
            return f"{head}: {self.verdict}"
        ci = f" {self.ci(self.lo, self.hi)}" if self.lo is not None else ""
        p = (f", p_holm {_p(self.p_holm)}" if self.family else f", p {_p(self.p)}") if self.kind in DIFFERENCE \
            else f", TOST p {_p(self.p)}" if self.kind == "equivalence" else f" at {self.at}"
        what = "excess over chance " if self.kind == "trains" else ""
        return f"{head}: {what}{self.pt(self.mean)}{ci}, n={self.n}{p}"


def evaluate(rules: dict, df: pd.DataFrame | None = None, selection: dict | None = None,
             data_dir: str | None = None) -> list[Outcome]:
    """Every test of every claim in every group, decided. `df`: the rules' results (default: read from its
    `results` folder; none there: every test waits); `selection`: default, read from its `selection` file."""
    df = with_test_seeds(rules, results_of(rules) if df is None else df)
    selection = selection_of(rules) if selection is None else selection
    env = _Env(df, rules, selection, data_dir)
    out = []
    for claim in rules["claims"]:
        for test in claim["tests"]:
            out += KINDS[test["kind"]](env, str(claim["claim"]), test)
    families: dict[str, list[Outcome]] = {}
    for o in out:
        if o.family and o.verdict == "" and o.p is not None:
            families.setdefault(o.family, []).append(o)
    for members in families.values():
        # Two members computed from the same runs and metric are one test stated twice (claim 1's primary arm is
        # its centred arm when no engaged arm trains): the family counts it once, and both rows share its p_holm.
        distinct = {o.data: o.p for o in members}
        adjusted = dict(zip(distinct, holm(list(distinct.values()), rules["alpha"])[1]))
        for o in members:
            o.p_holm = adjusted[o.data]
    margins = {(str(c["claim"]), t["label"]): t.get("margin") for c in rules["claims"] for t in c["tests"]}
    for o in out:
        if o.verdict == "":
            _decide_difference(o, rules["alpha"], margins[(o.claim, o.label)])
            same = [m for m in families.get(o.family, []) if m is not o and m.data == o.data]
            if same:
                o.rule += f"; the same runs as {', '.join(f'claim {m.claim}' for m in same)}: one test in the family"
    return out


def combine(outcomes: list[Outcome], how: str = "all") -> str:
    """A claim's verdict from its outcomes: `all` (holds if every one holds, does not hold if every one does not)
    or `each` (a claim made of parts that must each hold: holds if every one holds, does not hold if any one
    does not)."""
    states = [o.state for o in outcomes]
    if UNTESTABLE in states:
        return UNTESTABLE
    if WAITING in states:
        return WAITING
    if all(s == HOLDS for s in states):
        return HOLDS
    if all(s == FAILS for s in states) or (how == "each" and FAILS in states):
        return FAILS
    return OPEN


def results_of(rules: dict) -> pd.DataFrame:
    """The rules' results folder as a DataFrame (analysis.load); no folder or no files: an empty one."""
    from analysis.load import load_results

    folder = resolve(rules["results"])
    return load_results([folder]) if folder.is_dir() else load_results([])


def with_test_seeds(rules: dict, df: pd.DataFrame) -> pd.DataFrame:
    """The runs of `df` with one of the rules' test seeds (the only runs a verdict reads)."""
    return df[df["seed"].isin(rules["seeds"])] if len(df) else df


def exploratory_of(rules: dict) -> pd.DataFrame:
    """The round's exploratory runs, which no rule reads (`exploratory/results/` beside its results folder); an
    empty frame when there are none."""
    from analysis.load import load_results

    folder = resolve(rules["results"]).parent / "exploratory" / "results"
    return load_results([folder]) if folder.is_dir() and any(folder.glob("*.json")) else load_results([])


def selection_of(rules: dict) -> dict:
    """The values the pre-registered selection rules chose ({key: value}); {} while the file does not exist."""
    if "selection" not in rules:
        return {}
    path = resolve(rules["selection"])
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RulesError(f"{path}: not a readable selection file ({e})") from None
    if not isinstance(values, dict):
        raise RulesError(f"{path}: a selection file is one JSON object {{key: value}}")
    return values


class _Env:
    """What every test reads: the rows, the arms with their selected values, the chance levels."""

    def __init__(self, df: pd.DataFrame, rules: dict, selection: dict, data_dir: str | None):
        from analysis.load import para_derived

        self.df, self.rules, self.selection, self.data_dir = df, rules, selection, data_dir
        self.para = para_derived(df) if len(df) else pd.Series(False, index=df.index)

    def filters(self, filters: dict) -> tuple[dict, str | None]:
        """The filters with their "@key" values read from the selection; a verdict-less state when one is not
        selected (missing: waiting; null: not testable)."""
        out = {}
        for column, value in filters.items():
            if isinstance(value, str) and value.startswith("@"):
                key = value[1:]
                if key not in self.selection:
                    return out, f"waiting: {key} not selected"
                if self.selection[key] is None:
                    return out, f"not testable: {key} selected as none"
                value = self.selection[key]
            out[column] = value
        return out, None

    def rows(self, ref, *wheres: dict | None) -> tuple[pd.DataFrame, str | None]:
        """An arm's runs (ref: its name, or {arm, para}) matching every filter of `wheres` too (each narrows the
        arm, none replaces its values); or the state that stops the test."""
        name, para = (ref["arm"], ref.get("para")) if isinstance(ref, dict) else (ref, None)
        resolved = [self.filters(f or {}) for f in (self.rules["arms"][name], *wheres)]
        state = next((s for _, s in resolved if s), None)
        if state:
            return self.df.iloc[0:0], state
        df = self.df
        if not len(df):
            return df, None
        keep = self.para if para else ~self.para
        for filters, _ in resolved:
            keep = keep & matching(df, filters)  # a new Series: `&=` would change self.para in place
        if para:
            keep = keep & (_para_label(df) == _para_label_of(para))
        return df[keep], None

    def groups(self, test: dict) -> list[str]:
        """The groups a test was written for (`groups:`, "@key" read from the selection; a key not selected, or
        selected as none, names no group): each waits until its runs are in, even while it has none."""
        out = []
        for g in test.get("groups") or []:
            if g.startswith("@"):
                g = self.selection.get(g[1:])
                if g is None:
                    continue
            out.append(_show(g))
        return out

    def chance(self, row) -> float:
        from analysis.load import read_results
        from analysis.selection import chance_store

        config = read_results(Path(row["path"]))["config"]
        data_dir = self.data_dir or (config.get("paths") or {}).get("data_dir") or "data"
        return chance(config["regime"], str(resolve(data_dir)), store=chance_store(Path(row["path"]).parent))[0]


def _para_label(df: pd.DataFrame) -> pd.Series:
    keep, red = get_column(df, "config.para.keep_energy"), get_column(df, "config.para.reduction")
    return pd.Series([_setting(k, r) for k, r in zip(keep, red)], index=df.index, dtype=object)


def _para_label_of(text: str) -> str:
    kind, value = PARA.fullmatch(text).groups()
    return _setting(float(value), None) if kind == "keep" else _setting(None, float(value))


def _setting(keep, red) -> str | None:
    """PARA's own label of a setting (`para-red0.75`), as its results files are named."""
    keep, red = (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in (keep, red))
    if keep is None and red is None:
        return None
    return _setting_label(keep, red)


@cache
def _setting_label(keep, red) -> str:
    from experiments.para import setting_label

    return setting_label(keep, red)


def _groups(by, *frames: pd.DataFrame, expected=()) -> list[str]:
    """The groups the runs fall in (`by` values; the union over the frames) and the `expected` ones, which wait
    while they have no runs; `all` without `by`."""
    if by is None:
        return ["all"]
    found = sorted({g for f in frames for g in _group_of(f, by)} | set(expected), key=str)
    return found or ["no runs"]


def _group_of(df: pd.DataFrame, by) -> pd.Series:
    cols = [by] if isinstance(by, str) else by
    if not len(df):
        return pd.Series([], dtype=object)
    values = [get_column(df, c) for c in cols]
    if len(cols) == 1:
        return values[0].map(_show)
    return pd.Series([", ".join(f"{c}={_show(v)}" for c, v in zip(cols, vs)) for vs in zip(*values)],
                     index=df.index, dtype=object)


def _show(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _in(df: pd.DataFrame, by, group: str) -> pd.DataFrame:
    return df if by is None or not len(df) else df[_group_of(df, by) == group]


def _per_seed(runs: pd.DataFrame, values: pd.Series, at: str) -> dict[int, float]:
    """{seed: value} of one arm's runs in one group (runs lacking the value left out); two runs of one seed are
    ambiguous: RulesError."""
    out, names = {}, {}
    for seed, value, name in zip(runs["seed"], values, runs["run_name"]):
        seed = int(seed)
        if seed in names:
            raise RulesError(f"{at}: two runs of seed {seed} ({names[seed]}, {name}): narrow the arm's filters or "
                             f"the test's `where` until one run per seed is left")
        names[seed] = name
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[seed] = float(value)
    return out


def _metric(runs: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(get_column(runs, column), errors="coerce")


def _new(claim: str, test: dict, group: str, **kw) -> Outcome:
    proportion = test["metric"].rsplit(".", 1)[-1] in PROPORTIONS
    return Outcome(claim, test["label"], test["kind"], group, test["min_n"],
                   digits=1 if test["metric"] == "score" or proportion else 2, scale=100.0 if proportion else 1.0,
                   family=test.get("family"), **kw)


def _stopped(claim: str, test: dict, state: str) -> list[Outcome]:
    return [_new(claim, test, "all", verdict=state, rule=state.split(": ", 1)[1])]


def _pairs(env: _Env, claim: str, test: dict) -> list[tuple[str, list, list, frozenset]]:
    """(group, a, b, run names) per group of a two-arm test: the treatment's and the control's values, seed by seed
    (an interaction's: the differences at `at` and at `versus`), and every run they come from; or the state that
    stops the test."""
    cells = [("at", test["at"]), ("versus", test["versus"])] if test["kind"] == "interaction" else [("", {})]
    frames = {}
    for cell, at in cells:
        for role in ("treatment", "control"):
            rows, state = env.rows(test[role], test.get("where"), at)
            if state:
                return state
            frames[cell, role] = rows
    out = []
    for group in _groups(test.get("by"), *frames.values(), expected=env.groups(test)):
        seeds, names = {}, set()
        for (cell, role), rows in frames.items():
            mine = _in(rows, test.get("by"), group)
            names |= set(mine["run_name"])
            seeds[cell, role] = _per_seed(mine, _metric(mine, test["metric"]), f"claim {claim!r}, test "
                                          f"{test['label']!r}, {role}{' at ' + cell if cell else ''} in {group}")
        common = sorted(set.intersection(*(set(s) for s in seeds.values())))
        if test["kind"] == "interaction":
            a = [seeds["at", "treatment"][s] - seeds["at", "control"][s] for s in common]
            b = [seeds["versus", "treatment"][s] - seeds["versus", "control"][s] for s in common]
        else:
            a, b = [seeds["", "treatment"][s] for s in common], [seeds["", "control"][s] for s in common]
        out.append((group, a, b, frozenset(names)))
    return out


def _arm_groups(env: _Env, test: dict) -> list[tuple[str, pd.DataFrame]] | str:
    """(group, its runs) per group of a one-arm test (within, trains); or the state that stops the test."""
    runs, state = env.rows(test["arm"], test.get("where"))
    return state or [(group, _in(runs, test.get("by"), group))
                     for group in _groups(test.get("by"), runs, expected=env.groups(test))]


def _summary(claim: str, test: dict, group: str, a, b) -> Outcome:
    """The outcome's numbers for the differences a − b: n, mean, sample sd, 95% t-interval."""
    o = _new(claim, test, group, n=len(a), values=tuple(float(x) for x in np.subtract(a, b)))
    o.mean, o.lo, o.hi, _ = paired_ci(a, b)
    o.sd = mean_std(np.subtract(a, b))[1] if len(a) else None
    return o


def _difference(env: _Env, claim: str, test: dict) -> list[Outcome]:
    """paired, interaction, within: the numbers; the verdict waits for Holm (evaluate)."""
    if test["kind"] == "within":
        arm = _arm_groups(env, test)
        if isinstance(arm, str):
            return _stopped(claim, test, arm)
        groups = []
        for group, mine in arm:
            versus = test["versus"]
            base = _metric(mine, versus) if isinstance(versus, str) else pd.Series(float(versus), index=mine.index)
            d = _per_seed(mine, _metric(mine, test["metric"]) - base, f"claim {claim!r}, test {test['label']!r}, "
                                                                       f"arm {test['arm']} in {group}")
            groups.append((group, [d[s] for s in sorted(d)], [0.0] * len(d), frozenset(mine["run_name"])))
    else:
        groups = _pairs(env, claim, test)
        if isinstance(groups, str):
            return _stopped(claim, test, groups)
    out = []
    for group, a, b, names in groups:
        o = _summary(claim, test, group, a, b)
        o.data = (test["metric"], test["kind"], group, names)
        o.p = paired_ttest(a, b)[1] if len(a) >= 2 else None
        if o.n < o.min_n:
            o.verdict = f"waiting ({o.n} of {o.min_n} seeds)"
            o.rule = f"n {o.n} < min_n {o.min_n}" + (f": left out of Holm family {o.family}" if o.family else "")
        out.append(o)
    return out


def _decide_difference(o: Outcome, alpha: float, margin: float) -> None:
    name, p = ("p_holm", o.p_holm) if o.family else ("p", o.p)
    if p is not None and p < alpha and o.mean > 0:
        o.verdict, o.rule = HOLDS, f"{name} {_p(p)} < {alpha:g}, mean {o.pt(o.mean)} > 0"
    elif o.hi is not None and o.hi < margin:
        o.verdict, o.rule = FAILS, f"CI upper {o.pt(o.hi)} < margin {o.num(margin)}"
    else:
        why = f"{name} {_p(p)} ≥ {alpha:g}" if p is not None and p >= alpha else \
            f"mean {o.pt(o.mean)} ≤ 0" if p is not None else f"{name} undefined (n < 2 or equal differences)"
        upper = f"CI upper {o.pt(o.hi)} ≥ margin {o.num(margin)}" if o.hi is not None else "no CI (n < 2)"
        o.verdict, o.rule = OPEN, f"{why}; {upper}"


def _equivalence(env: _Env, claim: str, test: dict) -> list[Outcome]:
    groups = _pairs(env, claim, test)
    if isinstance(groups, str):
        return _stopped(claim, test, groups)
    alpha, m = env.rules["alpha"], float(test["margin"])
    out = []
    for group, a, b, _ in groups:
        o = _summary(claim, test, group, a, b)
        o.p = tost(a, b, m)
        _, lo, hi, _ = paired_ci(a, b, level=1 - 2 * alpha)
        level, mm = f"{100 * (1 - 2 * alpha):g}%", o.num(m)
        if o.n < o.min_n:
            o.verdict, o.rule = f"waiting ({o.n} of {o.min_n} seeds)", f"n {o.n} < min_n {o.min_n}"
        elif lo is not None and -m < lo and hi < m:
            o.verdict, o.rule = HOLDS, f"{level} CI {o.ci(lo, hi)} inside ±{mm}"
        elif o.hi is not None and o.hi < -m:
            o.verdict, o.rule = FAILS, f"95% CI {o.ci(o.lo, o.hi)} below -{mm}"
        elif o.lo is not None and o.lo > m:
            o.verdict, o.rule = FAILS, f"95% CI {o.ci(o.lo, o.hi)} above +{mm}"
        else:
            o.verdict = OPEN
            o.rule = (f"{level} CI {o.ci(lo, hi)} not inside ±{mm}; 95% CI {o.ci(o.lo, o.hi)} not outside it"
                      if lo is not None else "no CI (n < 2)")
        out.append(o)
    return out


def _trains(env: _Env, claim: str, test: dict) -> list[Outcome]:
    from experiments.data import DatasetMissing

    arm = _arm_groups(env, test)
    if isinstance(arm, str):
        return _stopped(claim, test, arm)
    out = []
    for group, mine in arm:
        over = get_column(mine, test["over"])
        o = _new(claim, test, group)
        per_value = []  # (value, mean select_on, excess by seed)
        # `values`: the test's registered values of `over`; runs at any other value are not its runs, and it waits
        # until each registered value has its seeds (without it: the values that have runs so far)
        registered = test.get("values") or sorted({v for v in over if _show(v) != "—"})
        try:
            for value in registered:
                at = mine[over.map(lambda x, value=value: _show(x) == _show(value))].sort_values("seed")
                _per_seed(at, _metric(at, test["metric"]), f"claim {claim!r}, test {test['label']!r}, arm "
                                                           f"{test['arm']} in {group} at {_show(value)}")
                excess = [s - env.chance(row) for (_, row), s in zip(at.iterrows(), _metric(at, test["metric"]))
                          if not math.isnan(s)]
                val = _metric(at, test["select_on"]).dropna()
                per_value.append((value, float(val.mean()) if len(val) else None, excess))
        except DatasetMissing as e:  # the data can still come: no verdict yet
            o.verdict, o.rule = f"waiting: chance of {group} needs its test data", str(e).split(". ")[0]
            out.append(o)
            continue
        except ValueError as e:
            raise RulesError(f"claim {claim!r}, test {test['label']!r}: {e}") from None
        short = [(v, len(e)) for v, _, e in per_value if len(e) < test["min_n"]] if test.get("values") else []
        if short:
            o.n = min(k for _, k in short)
            o.verdict = f"waiting ({o.n} of {o.min_n} seeds)"
            o.rule = ("every registered value needs its seeds before one is chosen: "
                      + ", ".join(f"{_show(v)}: {k} of {o.min_n}" for v, k in short))
            out.append(o)
            continue
        chosen = [v for v in per_value if v[1] is not None]
        if not chosen:
            o.verdict, o.rule = f"waiting (0 of {o.min_n} seeds)", "no run with a validation score"
            out.append(o)
            continue
        kinds = set(get_column(mine, "metrics.train.best_val_metric").dropna()) if test["select_on"] == BEST_VAL \
            else set()
        if any(map(is_loss, kinds)):  # "the best validation score" is the highest: a loss is not one
            raise RulesError(f"claim {claim!r}, test {test['label']!r}: select_on {BEST_VAL} is a loss in {group} "
                             f"({', '.join(sorted(map(str, kinds)))}); a `trains` test picks the highest score")
        best = max(v[1] for v in chosen)
        value, val, excess = next(v for v in chosen if v[1] == best)  # sorted: a tie goes to the smaller value
        o = _summary(claim, test, group, excess, [0.0] * len(excess))
        o.at = f"{test['over'].rsplit('.', 1)[-1]} = {_show(value)}"
        means = {v: (float(np.mean(e)) if e else None) for v, _, e in per_value}
        # an accuracy kept as a fraction, shown in points as every score here
        shown = (lambda x: f"val {100 * x:.1f}") if kinds else (lambda x: f"val {x:.3g}")
        seen = ", ".join(f"{_show(v)}: {shown(s)}" if s is not None else f"{_show(v)}: no val"
                         for v, s, _ in per_value)
        chose = f"{o.at} chosen by validation ({seen})"
        if o.n < o.min_n:
            o.verdict, o.rule = f"waiting ({o.n} of {o.min_n} seeds)", f"{chose}; n {o.n} < min_n {o.min_n}"
        elif o.mean >= test["holds_above"]:
            o.verdict, o.rule = HOLDS, f"{chose}; mean excess {o.pt(o.mean)} ≥ {o.num(test['holds_above'])}"
        elif all(m is not None and m < test["fails_below"] for m in means.values()):
            o.verdict = FAILS
            o.rule = (f"{chose}; mean excess < {o.num(test['fails_below'])} at every value ("
                      + ", ".join(f"{_show(v)}: {o.pt(m)}" for v, m in means.items()) + ")")
        else:
            o.verdict = OPEN
            o.rule = (f"{chose}; mean excess {o.pt(o.mean)} < {o.num(test['holds_above'])}, and not below "
                      f"{o.num(test['fails_below'])} at every value")
        out.append(o)
    return out


KINDS = {"paired": _difference, "interaction": _difference, "within": _difference, "equivalence": _equivalence,
         "trains": _trains}


# ------------------------------------------------------------------------------------------------- the tables
def _pt(v, digits: int = 1) -> str:
    return "—" if v is None else f"{v:+.{digits}f}"


def _ci(lo, hi, digits: int = 1) -> str:
    return "—" if lo is None else f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _p(p) -> str:
    return "—" if p is None else f"{p:.2g}"
