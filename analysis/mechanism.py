"""Did a method use more than its nominal rank r? Per adapted matrix, the share of ΔW's energy beyond r
(`lrlora.mechanism`, results field `mechanism`), how far LR-LoRA's σ is from affine, and stable ranks beside a
random-initialisation baseline: one table row per (backbone and data, method, variant, r), and the same per layer.

    python -m analysis mechanism --results results/reproduction/results [--out DIR]
    python -m analysis fig_mechanism --results results/reproduction/results [--out DIR]

Files written before `mechanism` existed keep only the first 64 normalised singular values of every ΔW
(`stable_ranks.per_layer.<module>.spectrum`); their energy beyond r is computed from those, and the row says so.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.plots import GROUPS, by_layer, pyplot, save
from analysis.render import Table
from analysis.select import get_column, method_order, ordered_columns
from analysis.targets import target
from experiments.results import SPECTRUM_TOP

MECHANISM = "mechanism"
SPECTRUM = f"spectrum (first {SPECTRUM_TOP} values)"
THRESHOLD = 1e-2   # energy beyond r at or above this: the matrix uses more than rank r (LoRA's is ~1e-13)
CLIP = 1e-12       # the figure's floor, so a zero (rank ≤ r exactly) still shows on the log axis
INIT_SEED = 0
NONE = "—"
META = ("type", "layer", "shape", "stable_rank")  # what stable_ranks.per_layer adds to a module's diagnostics


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def energy_from_spectrum(spectrum, r, shape=None) -> float | None:
    """Σ_{r<i≤n} s_i² / Σ_{i≤n} s_i² over the n values kept (σ_i/σ_1: the scale cancels). None where they cannot
    tell: r ≥ n and the spectrum was cut (n < min(shape)), so everything beyond r was dropped. 0.0 for ΔW = 0."""
    s2 = np.square(np.asarray(spectrum, dtype=float))
    complete = shape is not None and len(s2) >= min(shape)
    if not len(s2) or (int(r) >= len(s2) and not complete):
        return None
    total = s2.sum()
    return float(s2[int(r):].sum() / total) if total > 0 else 0.0


def layers(row) -> tuple[dict, str | None]:
    """({module: {energy_beyond_r, [t_absmax, t_rms, linear_residual, ba_stable_rank], type, layer, shape,
    stable_rank}}, source) for one run (a row of analysis.load's frame): the results file's `mechanism` where it
    has one, else energy beyond r from the kept spectrum; ({}, None) where neither is there."""
    ranks = row.get("stable_ranks.per_layer")
    ranks = ranks if isinstance(ranks, dict) else {}

    def meta(name):
        return {k: v for k, v in (ranks.get(name) or {}).items() if k in META}

    mech = row.get("mechanism.per_layer")
    if isinstance(mech, dict) and mech:
        return {name: {**meta(name), **m} for name, m in mech.items()}, MECHANISM
    r = row.get("r")
    if _missing(r):
        return {}, None
    out = {}
    for name, v in ranks.items():
        e = energy_from_spectrum(v.get("spectrum") or (), r, v.get("shape"))
        if e is not None:
            out[name] = {**meta(name), "energy_beyond_r": e}
    return (out, SPECTRUM) if out else ({}, None)


@cache
def random_init(shape: tuple[int, int], r: int) -> tuple[float, float]:
    """(stable rank, energy beyond r) of B·A for a d_out × d_in matrix as LR-LoRA initialises A and B (both
    Kaiming-uniform, a = √5: lrlora.layer, `init_B=kaiming`): the stable rank a rank-r product has with no training
    in it. lrlora's init draws from torch's global RNG, so it runs on a forked copy seeded INIT_SEED: the same
    numbers every call, and the caller's RNG untouched."""
    import torch

    from lrlora import mechanism, stable_rank
    from lrlora.layer import LRLoRAAdapter

    d_out, d_in = shape
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(INIT_SEED)  # CPU only: torch.manual_seed would reseed CUDA too
        ba = LRLoRAAdapter(d_in, d_out, int(r), transfer=None, init_B="kaiming").lowrank_product().detach()
    return stable_rank(ba), mechanism(ba, int(r))["energy_beyond_r"]


def _runs(df: pd.DataFrame) -> pd.DataFrame:
    """The runs with per-layer diagnostics, each with its `_layers` and `_source` (layers())."""
    if not len(df):
        return pd.DataFrame(columns=["column", "method", "variant", "r", "_layers", "_source"])
    found = [layers(row) for row in df.to_dict("records")]
    d = df.assign(_layers=[f[0] for f in found], _source=[f[1] for f in found])
    return d[d["_source"].notna()]


def _groups(d: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """((column, method, variant, r), runs) in table order: columns as the paper's, methods as Table 1's."""
    if not len(d):
        return []
    cols = {c: i for i, c in enumerate(ordered_columns(d))}
    order = {m: i for i, m in enumerate(method_order())}
    keys = {(row["column"], row["method"], row["variant"], None if _missing(row["r"]) else int(row["r"]))
            for _, row in d.iterrows()}
    out = []
    for c, m, v, r in sorted(keys, key=lambda k: (cols[k[0]], order.get(k[1], 99), k[1], k[2], k[3] is None, k[3])):
        sel = (d["column"] == c) & (d["method"] == m) & (d["variant"] == v)
        sel &= d["r"].isna() if r is None else d["r"] == r
        out.append(((c, m, v, r), d[sel].sort_values("seed")))
    return out


def _values(runs: pd.DataFrame, field: str) -> list[list[float]]:
    """Per run, the field over its matrices (runs without it left out)."""
    per_run = [[float(m[field]) for m in pl.values() if not _missing(m.get(field))] for pl in runs["_layers"]]
    return [v for v in per_run if v]


def _median_of_medians(runs: pd.DataFrame, field: str) -> float | None:
    per_run = _values(runs, field)
    return float(np.median([np.median(v) for v in per_run])) if per_run else None


def _mean_over_matrices(runs: pd.DataFrame, field: str) -> float | None:
    v = [x for run in _values(runs, field) for x in run]
    return float(np.mean(v)) if v else None


def _init(runs: pd.DataFrame) -> list[tuple[float, float]]:
    """random_init() for every matrix of the runs, by its shape and the run's r."""
    return [random_init(tuple(int(s) for s in m["shape"]), int(r))
            for pl, r in zip(runs["_layers"], runs["r"]) if not _missing(r)
            for m in pl.values() if m.get("shape")]


def _sci(v) -> str:
    """Energies and residuals span 1e-14 to 1: two significant digits, `2.1e-06` below 1e-4."""
    return NONE if v is None else f"{v:.2g}"


def _fixed(v, digits: int = 2) -> str:
    return NONE if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


@target("mechanism", "table", "beyond the paper: ΔW's energy beyond rank r (lrlora.mechanism)")
def mechanism_table(df: pd.DataFrame, ctx) -> Table:
    """Per (backbone and data, method, variant, r): runs; median energy beyond r; share of matrices with energy
    beyond r ≥ 1e-2; median t_absmax and linear residual (LR-LoRA); mean stable rank of ΔW, of B·A, and of B·A at
    random initialisation on the same matrices; where the energy came from."""
    d = _runs(df)
    header = ["column", "method", "variant", "r", "runs", "energy beyond r (median)",
              f"matrices ≥ {THRESHOLD:g}", "t_absmax (median)", "linear residual (median)",
              "stable rank ΔW (mean)", "stable rank BA (mean)", "stable rank BA at init (mean)", "source"]
    body, init_energy = [], []
    for (c, m, v, r), runs in _groups(d):
        energies = [x for run in _values(runs, "energy_beyond_r") for x in run]
        above = sum(x >= THRESHOLD for x in energies)
        sr = pd.to_numeric(get_column(runs, "stable_ranks.all.mean"), errors="coerce").dropna()
        init = _init(runs)
        init_energy += [e for _, e in init]
        body.append([c, m, v or NONE, NONE if r is None else str(r), str(len(runs)),
                     _sci(_median_of_medians(runs, "energy_beyond_r")),
                     f"{above}/{len(energies)}" if energies else NONE,
                     _sci(_median_of_medians(runs, "t_absmax")),
                     _sci(_median_of_medians(runs, "linear_residual")),
                     _fixed(float(sr.mean()) if len(sr) else None),
                     _fixed(_mean_over_matrices(runs, "ba_stable_rank")),
                     _fixed(float(np.mean([sr for sr, _ in init])) if init else None),
                     ", ".join(sorted(set(runs["_source"])))])
    notes = [f"Energy beyond r: Σ_(i>r) s_i² / Σ s_i² over ΔW's singular values, per adapted matrix (0 up to "
             f"rounding for any rank-r update, LoRA's always); the median over a run's matrices, then over its runs. "
             f"Matrices ≥ {THRESHOLD:g}: of all the matrices of all the runs. t_absmax: the largest |t| of σ's "
             "argument t = pre_scale·BA; linear residual: ‖ΔW − (c0·11ᵀ + c1·t)‖_F / ‖ΔW‖_F for the least-squares "
             "c0, c1 (0 where σ acts as an affine map on the values it sees, so ΔW is BA up to scale plus a "
             "constant); both only for methods with an elementwise σ (LR-LoRA), medians as for the energy. Stable "
             "rank ‖M‖_F² / ‖M‖_2²: of ΔW, the runs' stable_ranks.all.mean averaged; of BA, mechanism's "
             "ba_stable_rank where the file has it; at init, B·A as LR-LoRA initialises it (A and B Kaiming-uniform, "
             f"a = √5, torch seed {INIT_SEED}) for every matrix's shape and r: what a rank-r product with no "
             "training in it gives.",
             f"Source: `{MECHANISM}`: the results file's mechanism field, over every singular value; `{SPECTRUM}`: "
             f"files written before it, from the first {SPECTRUM_TOP} σ_i/σ_1 kept in stable_ranks, both sums over "
             f"those only (a tail beyond the {SPECTRUM_TOP}th value is not counted; a rank r ≥ {SPECTRUM_TOP} of a "
             "larger matrix cannot be told and is left out)."]
    if init_energy:
        notes.append(f"B·A at init has rank r: its energy beyond r, in double precision as lrlora.mechanism computes "
                     f"it, is at most {max(init_energy):.1g} over these shapes (rounding alone); the kept spectra are "
                     "single precision, whose rounding leaves a rank-r ΔW near 1e-12.")
    if not body:
        notes.insert(0, "No results file has mechanism diagnostics or kept spectra: nothing to show.")
    return Table("mechanism", "Mechanism: how much of ΔW lies beyond the nominal rank r", header, body, notes)


@target("fig_mechanism", "figure", "beyond the paper: ΔW's energy beyond rank r per layer")
def fig_mechanism(df: pd.DataFrame, ctx) -> list[Path]:
    """Per layer, attention and MLP apart: ΔW's energy beyond r (log axis, floor 1e-12) and, where runs have it,
    LR-LoRA's linear residual; one line per method, variant and r (median over the group's modules at that layer
    and over seeds); one row of panels per backbone and data."""
    return _draw_mechanism(df, ctx.out, "fig_mechanism")


def _draw_mechanism(df: pd.DataFrame, out: Path, name: str) -> list[Path]:
    d = _runs(df)
    if not len(d):
        return []
    fields = [("energy_beyond_r", "energy of ΔW beyond r")]
    if any("linear_residual" in m for pl in d["_layers"] for m in pl.values()):
        fields.append(("linear_residual", "linear residual of ΔW"))
    columns = ordered_columns(d)
    ncols = len(fields) * len(GROUPS)
    fig, axes = pyplot().subplots(len(columns), ncols, figsize=(4.2 * ncols + 2.5, 3.4 * len(columns)),
                                  squeeze=False)
    drawn = []  # every line: (column, label, field, group, layers, values)
    for i, c in enumerate(columns):
        for n, ((_, m, v, r), runs) in enumerate(_groups(d[d["column"] == c])):
            # ten colours, then the next line style: a column can hold twenty method-variants
            style = dict(color=f"C{n % 10}", ls=("-", "--", ":", "-.")[n // 10 % 4], marker="o", ms=3,
                         label=f"{m} r={r}" + (f" ({v})" if v else ""))
            for k, (field, _) in enumerate(fields):
                for j, g in enumerate(GROUPS):
                    per = by_layer(runs["_layers"], g, field)
                    if per:
                        xs = sorted(per)
                        ys = [max(float(np.median(per[x])), CLIP) for x in xs]
                        axes[i][k * len(GROUPS) + j].semilogy(xs, ys, **style)
                        drawn.append((c, style["label"], field, g, xs, ys))
        for k, (field, ylabel) in enumerate(fields):
            for j, g in enumerate(GROUPS):
                ax = axes[i][k * len(GROUPS) + j]
                ax.set_title(f"{c}: {g}", fontsize=8)
                ax.set(xlabel="layer", ylabel=ylabel)
                if not ax.lines:  # e.g. adapters on attention only: say so rather than draw empty axes
                    ax.text(0.5, 0.5, "no adapted matrices", transform=ax.transAxes, ha="center", color="grey")
                    ax.set(xticks=[], yticks=[])
                    continue
                if field == "energy_beyond_r":
                    ax.axhline(THRESHOLD, color="grey", lw=0.8, ls=":")
                ax.xaxis.get_major_locator().set_params(integer=True)
        legend = {}  # every line of the row once, whichever panels it has data in
        for ax in axes[i]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(lab, h)
        if legend:
            axes[i][-1].legend(list(legend.values()), list(legend), fontsize=6, loc="center left",
                               bbox_to_anchor=(1.02, 0.5))
    if not drawn:
        pyplot().close(fig)
        return []
    return save(fig, out, name, data=drawn)


def _round2_test_runs(ctx) -> pd.DataFrame:
    """The results in the rules file's folder with one of its test seeds."""
    from analysis import rulesfile
    from analysis.rulesfile import resolve
    from analysis.verdicts import read_rules, results_of, with_test_seeds

    rules = read_rules(resolve(ctx.options.get("rules", rulesfile.RULES)))
    return with_test_seeds(rules, results_of(rules))


@target("mechanism2", "table", "REPRODUCTION.md round 2: ΔW's energy beyond rank r in its runs", own_results=True)
def mechanism2(df, ctx) -> Table:
    """The mechanism table over the second round's results folder (its rules file's `results`), its test seeds
    only: what σ did in the runs the verdicts come from."""
    table = mechanism_table(_round2_test_runs(ctx), ctx)
    table.name, table.title = "mechanism2", "Round 2 mechanism: how much of ΔW lies beyond the nominal rank r"
    return table


@target("fig_mechanism2", "figure", "REPRODUCTION.md round 2: ΔW's energy beyond rank r per layer in its runs",
        own_results=True)
def fig_mechanism2(df, ctx) -> list[Path]:
    """fig_mechanism over the runs mechanism2 reads (the second round's test seeds)."""
    return _draw_mechanism(_round2_test_runs(ctx), ctx.out, "fig_mechanism2")


# Validation only: these are pilot and selection runs (seeds 1, 2), whose test scores the round does not read.
ENGAGED_COLUMNS = {"best val": "metrics.train.best_val",
                   "energy beyond r (median)": "mechanism.summary.energy_beyond_r.median",
                   "linear residual (median)": "mechanism.summary.linear_residual.median",
                   "t_absmax (median)": "mechanism.summary.t_absmax.median"}


@target("engaged2", "table", "REPRODUCTION.md round 2: LR-LoRA against σ's scale s and the learning rate",
        own_results=True)
def engaged2(df, ctx) -> Table:
    """Every centred LR-LoRA run of round 2's pilot, selection and exploratory folders (`exploratory/` beside the
    rules' results folder) on task_a, seeds 1 and 2, by σ's scale s (and ΔW's, post_scale) and the learning rate:
    its best validation score and what σ did (no test score: the round reads none before its test grid).
    Exploratory rows decide nothing; the table is where they are read."""
    from analysis import rulesfile
    from analysis.rulesfile import resolve
    from analysis.select import matching
    from analysis.verdicts import exploratory_of, read_rules, results_of, selection_of

    rules = read_rules(resolve(ctx.options.get("rules", rulesfile.RULES)))
    chosen = selection_of(rules)
    task = chosen.get("task_a")  # None until the pilot chose it: no rows
    frames = [(results_of(rules), "pre-registered"), (exploratory_of(rules), "exploratory")]
    header = ["s", "post_scale", "lr", "seed", *ENGAGED_COLUMNS, "runs from"]
    rows = []
    for runs, origin in frames:
        if not len(runs):
            continue
        keep = matching(runs, {"adapter": "lrlora", "r": 4, "config.adapter.center": True,
                               "config.adapter.share": "none", "seed": [1, 2],
                               "regime": task})
        for _, run in runs[keep].iterrows():
            values = []
            for name, column in ENGAGED_COLUMNS.items():
                v = run.get(column)
                v = None if _missing(v) else float(v) * (100 if name == "best val" else 1)
                values.append(v)
            post = run.get("config.adapter.post_scale")
            rows.append((float(run["config.adapter.pre_scale"]), 1.0 if _missing(post) else float(post),
                         float(run["config.regime.train.lr"]), int(run["seed"]), values, origin))
    body = [[f"{s:g}", f"{post:.3g}", f"{lr:g}", str(seed),
             *(_cell(name, v) for name, v in zip(ENGAGED_COLUMNS, values)), origin]
            for s, post, lr, seed, values, origin in sorted(rows, key=lambda x: x[:4])]
    notes = [f"LR-LoRA centred (σ(s·BA) − σ(0)), r = 4, on {task or 'task_a (not chosen yet)'}: the pilot's engaged "
             "runs (s = 10, 30, 100 at lr 1e-3), the learning-rate selection's centred runs (s = 1) and Addendum A's "
             "post-scaled ones (s = 10, post_scale 0.1) are pre-registered; "
             "exploratory rows (results/reproduction2/exploratory, `explore2:` in analysis/scales.yaml) decide "
             "nothing. Best validation in points: the best of six evaluations on 300 questions held out from the "
             "training split (no test score is read for these seeds); mechanism columns: medians "
             "over the 36 adapted matrices at the end of training (the `mechanism` table defines them)."]
    if not body:
        notes.insert(0, "No centred LR-LoRA run on task_a yet: nothing to show.")
    return Table("engaged2", "Round 2: LR-LoRA by σ's scale s and learning rate", header, body, notes)


def _cell(name: str, v: float | None) -> str:
    if v is None:
        return NONE
    return f"{v:.1f}" if name == "best val" else _sci(v)
