"""The offline demo: LoRA against LR-LoRA at the same rank, MiniLM-L6 on BBC News, on CPU.

    make demo                                   # = python -m experiments.demo
    python -m experiments.demo --fresh          # retrain instead of resuming finished runs
    python -m experiments.demo regime.n_train=64 trainer.max_steps=4    # any Hydra override, for both runs

Both runs go through experiments.train.run with the configs conf/experiment/demo_bbc_{lora,lrlora}.yaml,
exactly as `python -m experiments.train experiment=demo_bbc_lora` would. Then it prints a table
(test accuracy, trainable parameters, mean ± std of per-layer stable rank) built from the two results files,
and writes outputs/demo/table.md and outputs/demo/stable_ranks.png (per-layer stable rank by module type).
W&B runs offline unless WANDB_MODE says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

EXPERIMENTS = {"LoRA": "demo_bbc_lora", "LR-LoRA": "demo_bbc_lrlora"}
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose(experiment: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=[f"experiment={experiment}", *overrides])


def table(results: dict[str, dict]) -> str:
    rows = ["| method | test accuracy | best val accuracy | trainable params (% of backbone) | "
            "stable rank of ΔW, mean ± std over layers | train time |",
            "|---|---|---|---|---|---|"]
    for method, r in results.items():
        m, p, sr = r["metrics"], r["params"], r["stable_ranks"]["all"]
        rows.append(f"| {method} (r={r['r']}) | {m['glue']['accuracy']:.3f} | {m['train']['best_val']:.3f} | "
                    f"{p['trainable']:,} ({p['trainable_percent']:.2f}%) | {sr['mean']:.2f} ± {sr['std']:.2f} | "
                    f"{r['timing']['train_s']:.0f} s |")
    return "\n".join(rows)


def plot_stable_ranks(results: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(next(iter(results.values()))["stable_ranks"]["by_type"])
    fig, axes = plt.subplots(1, len(types), figsize=(2.6 * len(types), 3.2), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], types):
        for method, r in results.items():
            rows = sorted((v["layer"], v["stable_rank"]) for v in r["stable_ranks"]["per_layer"].values()
                          if v["type"] == t)
            ax.plot([x for x, _ in rows], [y for _, y in rows], marker="o", label=method)
        ax.set(title=t, xlabel="layer")
    axes[0][0].set_ylabel("stable rank of ΔW")
    axes[0][0].legend(fontsize=8)
    r0 = next(iter(results.values()))
    fig.suptitle(f"{r0['backbone']} on {r0['regime']}, r = {r0['r']}: per-layer stable rank by module type")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/demo", help="runs, results, table and figure go here")
    ap.add_argument("--fresh", action="store_true", help="delete earlier demo runs first")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to both runs")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")  # never wait for a W&B key
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out / "runs", ignore_errors=True)

    from experiments.train import run

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    results = {}
    for method, experiment in EXPERIMENTS.items():
        cfg = compose(experiment, [f"paths.root={out}", *args.overrides])
        results[method] = run(cfg)
    wall = time.perf_counter() - t0

    text = table(results)
    fig = plot_stable_ranks(results, out / "stable_ranks.png")
    r0 = results["LoRA"]
    scale = (f"{r0['backbone']} on {r0['regime']}: {r0['config']['regime']['n_train']} train / "
             f"{r0['config']['regime']['n_test']} test articles, {r0['config']['regime']['max_length']} tokens, "
             f"{r0['metrics']['train']['steps']} steps; wall time {wall:.0f} s for both runs "
             f"({r0['torch_threads']} torch threads; 1-min load average {load0:.1f} at start, "
             f"{os.getloadavg()[0]:.1f} at end, on {os.cpu_count()} cores)")
    (out / "table.md").write_text(f"{text}\n\n{scale}\n")
    (out / "demo_summary.json").write_text(json.dumps({"wall_s": wall, "table": text}, indent=2))
    print("\n" + text + "\n\n" + scale)
    print(f"figure: {fig}\ntable: {out / 'table.md'}\nresults files: {out / 'results'}")
    return results


if __name__ == "__main__":
    main()
