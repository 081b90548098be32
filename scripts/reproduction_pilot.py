"""The reproduction pilot's table, from the pilot's results files: per bb_<task>, LoRA's test score, the chance level of
the very test slice it was scored on, the run's cost, and whether the task is kept for the grid.

    python -m scripts.reproduction_pilot                       # results/reproduction/pilot/results
    python -m scripts.reproduction_pilot --results DIR --margin 10

Kept: at least `margin` points above chance and `margin` points below 100 (LoRA clearly between chance and
ceiling, so a difference between methods can show either way). Chance: pair regimes (one question, k options)
score the best option per question, so chance is the mean of 1/k over the test questions; binary regimes,
the share of the most frequent label in the test slice (the cap is stratified, so about 50%):
analysis.stats.chance, which analysis.verdicts uses too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.stats import chance  # the chance level of a run's own test slice
from lrlora import cli
from lrlora.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m scripts.reproduction_pilot", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "results/reproduction/pilot/results"))
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    ap.add_argument("--margin", type=float, default=10.0, help="points above chance and below 100 to keep a task")
    args = ap.parse_args(argv)

    from analysis.load import load_results

    df = load_results([args.results])
    df = df[df["tags"].apply(lambda t: "repro_pilot" in (t or ()))]
    if not len(df):
        raise ConfigError(f"no pilot results (tag repro_pilot) in {args.results}; run the pilot first "
                          f"(results/reproduction/README.md)")
    df = df[df["config.trainer.max_steps"] == df["config.trainer.max_steps"].max()]  # the pilot proper
    print("| task | metric | LoRA r=4 (%) | chance (%) | test questions | steps | run wall (s) | kept |")
    print("|---|---|---|---|---|---|---|---|")
    for _, row in df.sort_values("regime").iterrows():
        regime = {k[len("config.regime."):]: v for k, v in row.items() if k.startswith("config.regime.")}
        regime = _nest(regime)
        c, n = chance(regime, args.data_dir)
        s = row["score"]
        kept = s >= c + args.margin and s <= 100 - args.margin
        why = "yes" if kept else (f"no: < {args.margin:g} points above chance" if s < c + args.margin
                                    else f"no: < {args.margin:g} points below 100")
        metric = "choice_accuracy" if regime.get("pairs") else "accuracy"
        print(f"| {row['regime']} | {metric} | {s:.1f} | {c:.1f} | {n} | {int(row['metrics.train.steps'])} | "
              f"{row['timing.wall_s']:.0f} | {why} |")
    return 0


def _nest(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        if isinstance(v, float) and v != v:  # NaN: a field absent from this run's config
            v = None
        d = out
        *head, last = k.split(".")
        for h in head:
            d = d.setdefault(h, {})
        d[last] = v
    return out


if __name__ == "__main__":
    cli.run(main)
