"""The paper's figures, each written as PNG and PDF: from results files (fig2, fig_spectra, fig_sigma) or
from one run folder (fig_landscape, which reloads the saved adapter onto its backbone).

    python -m analysis fig2 [--results DIR ...] [--out DIR]
    python -m analysis fig_landscape --run outputs/runs/<run_name>
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.plots import GROUPS, by_layer, pyplot, save
from analysis.select import cell_runs, get_column, layer_groups, method_rows, ordered_columns
from analysis.targets import target
from lrlora._atomic import write_owned


def _methods_frame(df: pd.DataFrame) -> pd.DataFrame:
    d = df[get_column(df, "stable_ranks.per_layer").notna()] if len(df) else df
    return d[d["variant"] == ""] if len(d) else d


def _per_column_grid(df: pd.DataFrame):
    """The methods' frame, its columns (backbone x data), and one row of (attention, MLP) axes per column."""
    d = _methods_frame(df)
    columns = ordered_columns(d) if len(d) else []
    if not columns:
        return d, columns, None, None
    fig, axes = pyplot().subplots(len(columns), 2, figsize=(9, 3.2 * len(columns)), squeeze=False)
    return d, columns, fig, axes


@target("fig2", "figure", "Figure 2")
def fig2(df: pd.DataFrame, ctx) -> list[Path]:
    """Per-layer stable rank of ΔW by depth, attention and MLP apart, one line per method (mean over the
    modules of the group at that layer and over seeds)."""
    d, columns, fig, axes = _per_column_grid(df)
    if not columns:
        return []
    for i, c in enumerate(columns):
        for j, g in enumerate(GROUPS):
            ax = axes[i][j]
            for label, method, r in method_rows(d[d["column"] == c]):
                layers = by_layer(cell_runs(d, c, method, r)["stable_ranks.per_layer"], g)
                if layers:
                    xs = sorted(layers)
                    ax.plot(xs, [np.mean(layers[x]) for x in xs], marker="o", ms=3, label=label)
            ax.set(title=f"{c}: {g}", xlabel="layer", ylabel="stable rank of ΔW")
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[i][0].legend(fontsize=7)
    return save(fig, ctx.out, "fig2")


@target("fig_layer_ranks", "figure", "the README's demo figure")
def fig_layer_ranks(df: pd.DataFrame, ctx) -> list[Path]:
    """Per-layer stable rank of ΔW for every module type apart, one line per run (the demo's figure)."""
    d = df[get_column(df, "stable_ranks.per_layer").notna()] if len(df) else df
    if not len(d):
        return []
    types = sorted({v["type"] for pl in d["stable_ranks.per_layer"] for v in pl.values()})
    plt = pyplot()
    fig, axes = plt.subplots(1, len(types), figsize=(2.6 * len(types), 3.2), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], types):
        for _, row in d.sort_values("run_name").iterrows():
            pts = sorted((v["layer"], v["stable_rank"]) for v in row["stable_ranks.per_layer"].values()
                         if v["type"] == t)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                    label=f"{row['method']}{' (' + row['variant'] + ')' if row['variant'] else ''}")
        ax.set(title=t, xlabel="layer")
    axes[0][0].set_ylabel("stable rank of ΔW")
    axes[0][0].legend(fontsize=8)
    r0 = d.iloc[0]
    fig.suptitle(f"{r0['backbone']} on {r0['regime']}, r = {r0['r']}: per-layer stable rank by module type")
    return save(fig, ctx.out, "fig_layer_ranks")


@target("fig_spectra", "figure", "Figure 4 / App. G.2")
def fig_spectra(df: pd.DataFrame, ctx) -> list[Path]:
    """Normalised singular values σ_i/σ_1 of ΔW (the first 64, kept in the results file), median over the
    modules of each group and over seeds, per method (App. G.2's aggregation)."""
    d, columns, fig, axes = _per_column_grid(df)
    if not columns:
        return []
    drawn = False
    for i, c in enumerate(columns):
        for j, g in enumerate(GROUPS):
            ax = axes[i][j]
            for label, method, r in method_rows(d[d["column"] == c]):
                spectra = [s for v in by_layer(cell_runs(d, c, method, r)["stable_ranks.per_layer"], g,
                                                "spectrum").values() for s in v]
                if spectra:
                    n = min(map(len, spectra))
                    ax.semilogy(np.arange(1, n + 1), np.median([s[:n] for s in spectra], axis=0), label=label)
                    drawn = True
            ax.set(title=f"{c}: {g}", xlabel="index i", ylabel="σ_i / σ_1 (median over modules)")
        axes[i][0].legend(fontsize=7)
    if not drawn:  # results files written before spectra were kept: say so rather than draw empty axes
        pyplot().close(fig)
        return []
    return save(fig, ctx.out, "fig_spectra")


def _snapshot_file(row) -> Path | None:
    from experiments.results import PathOutsideRoot, path_under_root

    adapter_dir = row.get("adapter_dir")
    if not isinstance(adapter_dir, str) or not row.get("path"):
        return None
    try:  # the run folder under the results file's own root (the path it records is relative to that root)
        p = path_under_root(row["path"], adapter_dir).parent / "sigma_snapshots.json"
    except PathOutsideRoot:
        return None
    return p if p.exists() else None


@target("fig_sigma", "figure", "Figures 6-17 / App. I")
def fig_sigma(df: pd.DataFrame, ctx) -> list[Path]:
    """Learned σ at an early, a middle and the last layer, one attention and one MLP module type, at every
    snapshotted step (`trainer.sigma_snapshots=[...]`; from runs/<run>/sigma_snapshots.json). Uses the run
    given with --run, else the first LR-LoRA run (by name) that has snapshots."""
    path = ctx.run / "sigma_snapshots.json" if ctx.run else None
    if path is None:
        rows = df[df["adapter"] == "lrlora"].sort_values("run_name") if len(df) else df
        path = next((p for p in (_snapshot_file(r) for _, r in rows.iterrows()) if p), None)
    if path is None or not path.exists():
        return []
    snap = json.loads(path.read_text())
    mods = snap["modules"]
    layers = sorted({m["layer"] for m in mods.values() if m["layer"] is not None})
    picks = sorted({layers[0], layers[len(layers) // 2], layers[-1]}) if layers else []
    types = []
    for g in GROUPS:
        t = next((m["type"] for n, m in sorted(mods.items()) if layer_groups({n: {**m, "stable_rank": 0}})[g]), None)
        if t:
            types.append(t)
    plt = pyplot()
    fig, axes = plt.subplots(len(types), len(picks), figsize=(3.3 * len(picks), 2.8 * len(types)), squeeze=False)
    x = np.array(snap["x"])
    steps = sorted(snap["steps"], key=int)
    for i, t in enumerate(types):
        for j, layer in enumerate(picks):
            name = next(n for n, m in sorted(mods.items()) if m["type"] == t and m["layer"] == layer)
            ax = axes[i][j]
            for s in steps:
                ax.plot(x, snap["steps"][s][name], label=f"step {s}")
            ax.set(title=f"{t}, layer {layer}", xlabel="x = (BA)_ij", ylabel="σ(x)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"learned σ: {path.parent.name}", fontsize=9)
    return save(fig, ctx.out, "fig_sigma")


def _filter_normalised(params, generator):
    """Random directions in the trainable parameters, each row ("filter") scaled to the norm of the same row
    of the parameter (Li et al. 2018, as App. H.1 uses); vectors scaled as a whole."""
    import torch

    dirs = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        if p.dim() >= 2:
            pn = p.detach().float().reshape(p.shape[0], -1).norm(dim=1, keepdim=True)
            dn = d.reshape(p.shape[0], -1).norm(dim=1, keepdim=True).clamp_min(1e-12)
            d = (d.reshape(p.shape[0], -1) * pn / dn).reshape(p.shape)
        else:
            d = d * p.detach().float().norm() / d.norm().clamp_min(1e-12)
        dirs.append(d.to(p.dtype))
    return dirs


@target("fig_landscape", "figure", "Figure 5 / App. H.1", needs_run=True)
def fig_landscape(_df, ctx) -> list[Path]:
    """Training loss along one and two random filter-normalised directions in the trainable (adapter)
    parameters around the run's saved adapter: L(θ + αd₁) and L(θ + αd₁ + βd₂), α, β in [-1, 1], on the
    first `examples` training examples (option, default 64). Qualitative, within one method only (App. H.1)."""
    import torch
    from omegaconf import OmegaConf

    from baselines import load_adapted
    from experiments.backbones import build_backbone
    from experiments.data import load_splits, make_collate
    from experiments.protocols.forward import evaluate

    run = ctx.run
    results = run.parent.parent / "results" / f"{run.name}.json"
    if not results.exists() or not (run / "adapter").exists():
        from analysis.load import ResultsError

        raise ResultsError(f"--run {run}: needs the run's adapter/ and its results file {results}; run it first")
    cfg = OmegaConf.create(json.loads(results.read_text())["config"])
    n, steps = int(ctx.options.get("examples", 64)), int(ctx.options.get("points", 11))
    data = load_splits(cfg.regime, cfg.paths.data_dir)
    torch.manual_seed(cfg.seed)  # the tiny backbones' random weights come from the seed, as in training
    model, processor = build_backbone(cfg.backbone, cfg.regime.task, cfg.regime.get("num_labels"), cfg.paths.cache_dir)
    handle = load_adapted(model, run / "adapter")
    collate = make_collate(cfg.regime, processor, cfg.backbone.get("image_size", 32))
    examples = list(data.train[:n])
    params = [p for p in handle.model.parameters() if p.requires_grad]
    if not params:
        params = [p for name, p in handle.model.named_parameters() if any(k in name for k in ("lora", "transfer", "adapter"))]
    theta = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    d1, d2 = _filter_normalised(params, g), _filter_normalised(params, g)

    def loss_at(a, b):
        with torch.no_grad():
            for p, t, u, v in zip(params, theta, d1, d2):
                p.copy_(t + a * u + b * v)
        return evaluate(handle.model, examples, collate, cfg.regime.task, 16, "cpu")["loss"]

    alphas = np.linspace(-1, 1, 2 * steps - 1)
    line = [loss_at(a, 0.0) for a in alphas]
    grid_ab = np.linspace(-1, 1, steps)
    surface = np.array([[loss_at(a, b) for a in grid_ab] for b in grid_ab])
    loss_at(0.0, 0.0)  # leave the model as loaded
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.plot(alphas, line, marker="o", ms=3)
    ax1.set(xlabel="α", ylabel="training loss", title="1-D: L(θ + α d₁)")
    cs = ax2.contourf(grid_ab, grid_ab, surface, levels=20)
    fig.colorbar(cs, ax=ax2)
    ax2.set(xlabel="α", ylabel="β", title="2-D: L(θ + α d₁ + β d₂)")
    fig.suptitle(f"{run.name} ({len(examples)} training examples)", fontsize=9)
    paths = save(fig, ctx.out, f"fig_landscape__{run.name}")
    write_owned(ctx.out / f"fig_landscape__{run.name}.json", json.dumps(
        {"alphas": alphas.tolist(), "line": line, "grid": grid_ab.tolist(), "surface": surface.tolist()}))
    return paths
