"""The offline demo: LoRA against LR-LoRA at the same rank, MiniLM-L6 on BBC News, on CPU.

    make demo                                   # = python -m experiments.demo
    python -m experiments.demo --fresh          # retrain instead of resuming finished runs
    python -m experiments.demo regime.n_train=64 trainer.max_steps=4    # any Hydra override, for both runs

Both runs go through experiments.train.run with the configs conf/experiment/demo_bbc_{lora,lrlora}.yaml,
exactly as `python -m experiments.train experiment=demo_bbc_lora` would. Then analysis/ builds the table
(target `demo`: test accuracy, trainable parameters, mean ± std of per-layer stable rank) and the figure
(target `fig_layer_ranks`: per-layer stable rank by module type) from the two results files, and it writes
outputs/demo/table.md (+ demo.md/.csv/.tex) and outputs/demo/fig_layer_ranks.png/.pdf.
W&B runs offline unless WANDB_MODE says otherwise.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lrlora import cli

EXPERIMENTS = {"LoRA": "demo_bbc_lora", "LR-LoRA": "demo_bbc_lrlora"}


def main(argv=None) -> dict:
    ap = cli.ArgumentParser(prog="python -m experiments.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/demo", help="runs, results, table and figure go here")
    ap.add_argument("--fresh", action="store_true", help="retrain finished demo runs (trainer.force=true)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to both runs")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")  # never wait for a W&B key
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    fresh = ["trainer.force=true"] if args.fresh else []  # retrains these two configs; touches nothing else

    from experiments.hydra_cli import compose_train
    from experiments.train import run

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    results = {}
    for method, experiment in EXPERIMENTS.items():
        cfg = compose_train([f"experiment={experiment}", f"paths.root={out}", *fresh, *args.overrides])
        results[method] = run(cfg)
    wall = time.perf_counter() - t0

    # the table and the figure come from the two results files, through analysis/ like every paper table
    from analysis import build, load_results

    df = load_results([out / "results"])
    df = df[df["run_name"].isin([r["run_name"] for r in results.values()])]
    text = build("demo", df=df, out=out).markdown().strip()
    fig = build("fig_layer_ranks", df=df, out=out)[0]
    r0 = results["LoRA"]
    scale = (f"{r0['backbone']} on {r0['regime']}: {r0['config']['regime']['n_train']} train / "
             f"{r0['config']['regime']['n_test']} test articles, {r0['config']['regime']['max_length']} tokens, "
             f"{r0['metrics']['train']['steps']} steps; wall time {wall:.0f} s for both runs "
             f"({r0['torch_threads']} torch threads; 1-min load average {load0:.1f} at start, "
             f"{os.getloadavg()[0]:.1f} at end, on {os.cpu_count()} cores)")
    from lrlora._atomic import dumps_strict, write_owned

    write_owned(out / "table.md", f"{text}\n\n{scale}\n")  # never over a file of the same name we did not write
    write_owned(out / "demo_summary.json", dumps_strict({"wall_s": wall, "table": text}, indent=2) + "\n")
    print("\n" + text + "\n\n" + scale)
    print(f"figure: {fig}\ntable: {out / 'table.md'}\nresults files: {out / 'results'}")
    return results


if __name__ == "__main__":
    cli.run(main)
