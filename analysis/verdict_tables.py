"""The verdict tables of a pre-registered round (REPRODUCTION.md, the README): analysis/verdicts.py decides each
claim from the rules file and the results; this module lays the outcomes out as table targets and one figure.

    python -m analysis verdicts2 --out outputs/analysis        # one row per claim, with its evidence
    python -m analysis verdict_tests2 --out outputs/analysis   # one row per test and group
    python -m analysis headline2 --out outputs/analysis        # the README's short form
    python -m analysis fig_verdicts2 --out outputs/analysis    # each test's per-seed values, its mean and interval

Options: `rules` (default analysis/rules/round2.yaml, read at call time so a test may point it elsewhere) and
`data_dir` (for chance levels).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import rulesfile, verdicts
from analysis.plots import pyplot, save
from analysis.render import Table
from analysis.rulesfile import ROOT, resolve
from analysis.select import get_column
from analysis.targets import target
from analysis.verdicts import (
    DIFFERENCE,
    FAILS,
    HOLDS,
    OPEN,
    WAITING,
    Outcome,
    _p,
    combine,
    evaluate,
    read_rules,
    results_of,
    selection_of,
    with_test_seeds,
)


def _rules_and_outcomes(ctx):
    """(rules, outcomes, notes) for the target's options; (None, [], the note saying why) with no rules file."""
    path = resolve(ctx.options.get("rules", rulesfile.RULES))
    if not path.is_file():
        return None, [], [f"No rules file at {_rel(path)}: the verdicts are applied once it is committed."]
    rules = read_rules(path)
    df = results_of(rules)
    outcomes = evaluate(rules, df, data_dir=ctx.options.get("data_dir"))
    return rules, outcomes, _notes(rules, df, outcomes)


def _rel(path: Path) -> str:
    path = resolve(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _notes(rules: dict, df: pd.DataFrame, outcomes: list[Outcome]) -> list[str]:
    folder = resolve(rules["results"])
    test = with_test_seeds(rules, df)
    if not folder.is_dir() or not len(df):
        runs = f"no results files in {_rel(folder)} yet: every test waits"
    else:
        from analysis.load import para_derived

        para = int(para_derived(test).sum()) if len(test) else 0
        runs = (f"{len(test)} results files with a test seed in {_rel(folder)}"
                + (f" ({para} of them PARA copies)" if para else "") + f", of {len(df)} there")
    seeds = rules["seeds"]
    notes = [f"Applied by analysis/verdicts.py, rules {_rel(rules['path'])}: {runs}; "
             f"test seeds {', '.join(map(str, seeds))}; alpha {rules['alpha']:g}."]
    keys = sorted({v[1:] for arm in rules["arms"].values() for v in arm.values()
                   if isinstance(v, str) and v.startswith("@")})
    if keys:
        chosen = selection_of(rules)
        notes.append(f"Selected ({_rel(rules['selection'])}): " + ", ".join(
            f"{k} = {json.dumps(chosen[k])}" if k in chosen else f"{k} not yet" for k in keys) + ".")
    families: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o.family:
            families.setdefault(o.family, []).append(o)
    for name, members in families.items():
        inside = len({o.data for o in members if o.p_holm is not None})
        stated = sum(o.p_holm is not None for o in members)
        twice = f" (stated {stated} times: some tests are the same runs)" if stated > inside else ""
        left = "; ".join(o.label + (f" ({o.group})" if o.group != "all" else "") for o in members
                         if o.p_holm is None)
        notes.append(f"Holm family {name}: " + (f"{inside} test{'s' if inside != 1 else ''} corrected together{twice}"
                                                if inside else "no test corrected yet")
                     + (f"; left out (no p yet): {left}" if left else "") + ".")
    return notes


RULE_NOTE = ("Rules: paired, interaction, within: holds if p (Holm within its family) < alpha and the mean > 0, "
             "does not hold if the 95% CI's upper bound < margin, else inconclusive; equivalence (TOST): holds if "
             "the (1 − 2·alpha) CI lies inside ±margin, does not hold if the 95% CI lies beyond it; trains: the "
             "value of `over` with the best validation, its mean excess over chance against holds_above and "
             "fails_below; fewer seeds than min_n: waiting. A claim holds if every test in every group holds.")


@target("verdicts2", "table", "REPRODUCTION.md round 2: the verdicts, from its pre-registered rules",
        reads_para=True, own_results=True)
def verdicts2(df, ctx) -> Table:
    """One row per claim: its tests' evidence and the verdict the rules file gives."""
    header = ["claim", "statement", "evidence (mean [95% CI], n, p)", "verdict"]
    rules, outcomes, notes = _rules_and_outcomes(ctx)
    if rules is None:
        return Table("verdicts2", "Verdicts (pre-registered rules)", header, [], notes)
    body = [[str(claim["claim"]), claim["statement"], "; ".join(o.evidence() for o in mine), verdict]
            for claim, mine, verdict in _by_claim(rules, outcomes)]
    return Table("verdicts2", "Verdicts (pre-registered rules)", header, body,
                 notes + [RULE_NOTE + " Per test and group: verdict_tests2."])


@target("headline2", "table", "README.md: the second round's verdict per claim, in short",
        reads_para=True, own_results=True)
def headline2(df, ctx) -> Table:
    """verdicts2 without its evidence: the claim, what it says and its verdict, with how many test seeds are in
    while it waits. The README shows it; the evidence stays in REPRODUCTION.md."""
    header = ["claim", "statement", "verdict"]
    rules, outcomes, notes = _rules_and_outcomes(ctx)
    if rules is None:
        return Table("headline2", "Round 2 verdicts", header, [], notes)
    body = []
    for claim, mine, verdict in _by_claim(rules, outcomes):
        if verdict == WAITING:  # how far the slowest of its tests is, and in which group (task) when it has one
            slow = min((o for o in mine if o.state == WAITING), key=lambda o: o.n / o.min_n)
            where = f"{slow.group}: " if slow.group not in ("all", "no runs") else ""
            verdict = f"waiting ({where}{slow.n} of {slow.min_n} seeds)"
        body.append([str(claim["claim"]), claim["statement"], verdict])
    return Table("headline2", "Round 2 verdicts", header, body,
                 [f"Applied by analysis/verdicts.py to {_rel(rules['results'])} with the rules committed "
                  f"before its runs ({_rel(rules['path'])}); each verdict's evidence and rule: REPRODUCTION.md."])


def _by_claim(rules: dict, outcomes: list[Outcome]):
    """(claim, its outcomes, its verdict) for each claim of the rules, in their order."""
    for claim in rules["claims"]:
        mine = [o for o in outcomes if o.claim == str(claim["claim"])]
        yield claim, mine, combine(mine, claim["combine"])


def _detectable(o: Outcome, alpha: float) -> str:
    """The difference this test could detect with 80% power (statsmodels), from its n and observed sd."""
    if o.kind not in DIFFERENCE or o.sd is None or o.n < 2 or not o.sd > 0:
        return "—"
    from statsmodels.stats.power import TTestPower

    d = TTestPower().solve_power(nobs=o.n, alpha=alpha, power=0.8, alternative="two-sided")
    return f"{d * o.sd * o.scale:.{o.digits}f}"


@target("verdict_tests2", "table", "REPRODUCTION.md round 2: each test of its pre-registered rules",
        reads_para=True, own_results=True)
def verdict_tests2(df, ctx) -> Table:
    """One row per test and group: n, mean, sd, 95% CI, p, p_holm, the rule that applied, the verdict."""
    header = ["claim", "test", "group", "n", "mean", "sd", "95% CI", "p", "p_holm", "detectable (80% power)", "rule",
              "verdict"]
    rules, outcomes, notes = _rules_and_outcomes(ctx)
    if rules is None:
        return Table("verdict_tests2", "Verdicts: each test (pre-registered rules)", header, [], notes)
    alpha = float(rules.get("alpha", 0.05))
    body = [[o.claim, o.label, o.group, str(o.n), o.pt(o.mean),
             "—" if o.sd is None else f"{o.sd * o.scale:.{o.digits}f}", o.ci(o.lo, o.hi), _p(o.p),
             _p(o.p_holm), _detectable(o, alpha), o.rule, o.verdict] for o in outcomes]
    notes = notes + [RULE_NOTE, "Means are of the differences (trains: of the excess over "
                                       "chance at the chosen value), in points for `score` and for an accuracy (a "
                                       "fraction of 1, ×100, its margin with it); p of equivalence tests "
                                       "is the TOST p. Detectable: the mean difference a two-sided one-sample t-test "
                                       "at this n and the observed sd finds with 80% power at the rules' alpha (before "
                                       "Holm): a null verdict is only as strong as this number is small."]
    return Table("verdict_tests2", "Verdicts: each test (pre-registered rules)", header, body, notes)


def arm_runs(rules: dict, data_dir=None, para: bool = True) -> list[tuple[str, pd.DataFrame]]:
    """(label, the test seeds' runs) per arm of the rules with runs, arms that select the same runs under one label
    ("centred = primary"); with `para`, then each PARA setting a test names ({arm, para}: "lora, PARA red0.75")."""
    df = with_test_seeds(rules, results_of(rules))
    env = verdicts._Env(df, rules, selection_of(rules), data_dir)
    refs = list(rules["arms"])
    if para:
        refs += list({json.dumps(t[k], sort_keys=True): t[k] for c in rules["claims"] for t in c["tests"]
                      for k in ("treatment", "control") if isinstance(t.get(k), dict)}.values())
    arms: dict[frozenset, list[str]] = {}
    for ref in refs:
        rows, state = env.rows(ref)
        if not state and len(rows):
            label = ref if isinstance(ref, str) else f"{ref['arm']}, PARA {ref['para']}"
            arms.setdefault(frozenset(rows["run_name"]), []).append(label)
    return [(" = ".join(labels), df[df["run_name"].isin(names)]) for names, labels in arms.items()]


@target("scores2", "table", "REPRODUCTION.md round 2: the test grid's scores by arm", reads_para=True,
        own_results=True)
def scores2(df, ctx) -> Table:
    """Per arm of the rules (arms that select the same runs, such as primary and centred while no engaged arm
    trains, on one row) and per PARA setting a test names, backbone and data, r and learning rate: the test seeds'
    runs, their mean test score and spread and their mean best validation score: the levels the verdicts'
    differences are taken between."""
    header = ["arm", "column", "r", "lr", "seeds", "test score (mean ± sd)", "min – max", "best val (mean)"]
    path = resolve(ctx.options.get("rules", rulesfile.RULES))
    if not path.is_file():
        return Table("scores2", "Round 2: test scores by arm", header, [], [f"No rules file at {_rel(path)}."])
    rules = read_rules(path)
    body = []
    for label, runs in arm_runs(rules, ctx.options.get("data_dir")):
        lr = pd.to_numeric(runs["config.regime.train.lr"], errors="coerce")
        for (column, r, rate), group in runs.groupby([runs["column"], runs["r"], lr], sort=True):
            score = pd.to_numeric(group["score"], errors="coerce").dropna()
            sd = f" ± {score.std(ddof=1):.1f}" if len(score) > 1 else ""
            body.append([label, column, str(int(r)), f"{rate:g}", str(group["seed"].nunique()),
                         f"{score.mean():.1f}{sd}" if len(score) else "—",
                         f"{score.min():.1f} – {score.max():.1f}" if len(score) else "—", mean_best_val(group)])
    return Table("scores2", "Round 2: test scores by arm", header, body,
                 [f"Test seeds ({', '.join(map(str, rules['seeds']))}) in {_rel(rules['results'])}; arms as "
                  f"{_rel(rules['path'])} defines them, with the values selection.json has chosen; an arm whose value is "
                  "not chosen yet, or with no runs, has no row. Test score: the run's headline metric on its test "
                  "set, in points; best val: the best of its validation evaluations, in points, or the lowest "
                  "validation loss where the runs select on one (SmolLM2's) (the checkpoint the test score comes "
                  "from; a PARA copy, which trains nothing, has none)."])


def mean_best_val(group: pd.DataFrame) -> str:
    """The runs' mean best validation value as scores2 shows it: a score in points, a loss as a loss (runs that
    select their checkpoint on the validation loss, SmolLM2's, have no validation score: ×100 would show a loss of
    0.169 as 16.9 points)."""
    val = pd.to_numeric(group["metrics.train.best_val"], errors="coerce").dropna()
    if not len(val):
        return "—"
    metric = get_column(group, "metrics.train.best_val_metric").dropna()
    if any(map(verdicts.is_loss, metric)):
        return f"loss {val.mean():.3f}"
    return f"{100 * val.mean():.1f}"


def drawn(outcomes: list[Outcome]) -> list[tuple[Outcome, list[Outcome]]]:
    """(outcome, the others stated on the same runs) for every test and group with values, once per test:
    claim 1's primary and centred rows are one panel while the primary arm is the centred one (the same runs, metric,
    values and verdict; two tests of one metric against different references differ in their values, and the same
    runs tested alone and in a Holm family can differ in their verdicts)."""
    out, seen = [], {}
    for o in outcomes:
        if not o.values:
            continue
        key = (o.data, o.values, o.verdict) if o.data else None
        if key in seen:
            seen[key][1].append(o)
            continue
        out.append((o, []))
        if key:
            seen[key] = out[-1]
    return out


COLOURS = {HOLDS: "tab:green", FAILS: "tab:red", OPEN: "tab:orange"}
UNITS = {"score": "points", "stable_ranks": "stable rank"}  # a metric's first name: what its axis is in


@target("fig_verdicts2", "figure", "REPRODUCTION.md round 2: each test's per-seed values against its rule",
        reads_para=True, own_results=True)
def fig_verdicts2(df, ctx) -> list[Path]:
    """One panel per test and group with values: every seed's difference (a dot), their mean with its 95% interval
    (the bar, coloured by the verdict), 0, and the line the rule compares with (the margin; ±margin for
    equivalence; the trains rule's two thresholds). The numbers are verdict_tests2's, from the same outcomes."""
    rules, outcomes, _ = _rules_and_outcomes(ctx)
    panels = drawn(outcomes)
    if not panels:
        return []
    tests = {(str(c["claim"]), t["label"]): t for c in rules["claims"] for t in c["tests"]}
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = pyplot().subplots(nrows, ncols, figsize=(4.6 * ncols, 2.5 * nrows), squeeze=False)
    for ax, (o, also) in zip(axes.flat, panels):
        test = tests[(o.claim, o.label)]
        k = o.scale  # drawn in the units the tables show (points for an accuracy kept as a fraction)
        jitter = np.linspace(-0.25, 0.25, len(o.values)) if len(o.values) > 1 else [0.0]
        ax.scatter(np.multiply(o.values, k), np.add(1, jitter), s=14, color="grey", zorder=3)
        colour = COLOURS.get(o.state, "black")
        if o.lo is not None:
            ax.errorbar([k * o.mean], [0], xerr=[[k * (o.mean - o.lo)], [k * (o.hi - o.mean)]], fmt="o",
                        color=colour, capsize=4)
        else:
            ax.plot([k * o.mean], [0], "o", color=colour)
        ax.axvline(0, color="black", lw=0.8)
        if o.kind == "equivalence":
            lines = [-test["margin"], test["margin"]]
        elif o.kind == "trains":
            lines = [test["fails_below"], test["holds_above"]]
        else:
            lines = [test["margin"]] if test.get("margin") else []
        for x in lines:
            ax.axvline(k * x, color="grey", lw=0.8, ls="--")
        unit = "points" if k == 100 else UNITS.get(test["metric"].split(".", 1)[0], test["metric"])
        what = {"trains": f"excess over chance at {o.at}", "within": "value − its reference"}.get(o.kind,
                                                                                                 "difference")
        ax.set(yticks=[0, 1], yticklabels=["mean, 95% CI", f"{o.n} seed{'s' * (o.n != 1)}"], ylim=(-0.8, 1.6),
               xlabel=f"{what} ({unit})")
        claims = list(dict.fromkeys(x.claim for x in (o, *also)))
        labels = " = ".join(dict.fromkeys(x.label for x in (o, *also)))
        names = f"claims {', '.join(claims[:-1])} and {claims[-1]}" if len(claims) > 1 else f"claim {o.claim}"
        group = "" if o.group == "all" else f" ({o.group})"
        # wrapped to the panel's width: a title on one line ran into its neighbour's
        ax.set_title(textwrap.fill(f"{names}: {labels}{group}", 70) + f"\n{o.verdict}", fontsize=8, color=colour)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    return save(fig, ctx.out, "fig_verdicts2", data=[(o.claim, o.label, o.group, o.values, o.lo, o.hi, o.verdict,
                                                      [x.claim for x in also]) for o, also in panels])


CURVES = "curves"  # beside the rules' results folder: each run's metrics.jsonl, copied as the run lands


def curve_lines(rules: dict, data_dir=None) -> list[tuple]:
    """(column, r, "arm, lr", steps, mean, min, max, metric, seeds) per arm and (backbone and data, r, rate): the
    validation score at each evaluation over the test seeds whose metrics log is in `curves/` (scores in points,
    losses as they are); a group without a validation metric or without any log is left out."""
    folder = resolve(rules["results"]).parent / CURVES
    lines = []
    for label, runs in arm_runs(rules, data_dir, para=False):
        lr = pd.to_numeric(runs["config.regime.train.lr"], errors="coerce")
        for (column, r, rate), group in runs.groupby([runs["column"], runs["r"], lr], sort=True):
            metric = get_column(group, "metrics.train.best_val_metric").dropna()
            if not len(metric):
                continue
            metric = str(metric.iloc[0])
            per_step: dict[int, list[float]] = {}
            for name in group["run_name"]:
                log = folder / f"{name}.jsonl"
                if not log.is_file():
                    continue
                for line in log.read_text().splitlines():
                    row = json.loads(line)
                    if f"val_{metric}" in row:
                        per_step.setdefault(int(row["step"]), []).append(float(row[f"val_{metric}"]))
            if per_step:
                steps = sorted(per_step)
                scale = 1.0 if verdicts.is_loss(metric) else 100.0
                lines.append((column, int(r), f"{label}, lr {rate:g}", steps,
                              [scale * float(np.mean(per_step[s])) for s in steps],
                              [scale * min(per_step[s]) for s in steps], [scale * max(per_step[s]) for s in steps],
                              metric, max(len(v) for v in per_step.values())))
    return lines


@target("fig_curves2", "figure", "REPRODUCTION.md round 2: validation curves of the test grid by arm",
        own_results=True)
def fig_curves2(df, ctx) -> list[Path]:
    """One panel per backbone and data and r: each arm's validation score at every evaluation (its run's
    `metrics.train.best_val_metric`, from the run's metrics log copied to `curves/<run_name>.jsonl` beside the
    results folder), the mean over the test seeds as a line and their range as a band: whether an arm had stopped
    improving when its steps ran out, or never left chance."""
    path = resolve(ctx.options.get("rules", rulesfile.RULES))
    lines = curve_lines(read_rules(path), ctx.options.get("data_dir")) if path.is_file() else []
    if not lines:
        return []
    panels = sorted({(c, r) for c, r, *_ in lines})
    ncols = min(3, len(panels))
    fig, axes = pyplot().subplots(-(-len(panels) // ncols), ncols, figsize=(4.8 * ncols, 3.4 * -(-len(panels) // ncols)),
                                  squeeze=False)
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(x[2] for x in lines))}
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (column, r) in zip(axes.flat, panels):
        for c, rr, label, steps, mean, lo, hi, metric, n in lines:
            if (c, rr) != (column, r):
                continue
            ax.plot(steps, mean, marker="o", ms=3, color=colours[label], label=f"{label} ({n} seeds)")
            ax.fill_between(steps, lo, hi, color=colours[label], alpha=0.15)
            ax.set_ylabel(f"validation {metric}" + ("" if verdicts.is_loss(metric) else " (points)"))
        ax.set(title=f"{column}, r = {r}", xlabel="step")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    return save(fig, ctx.out, "fig_curves2", data=lines)
