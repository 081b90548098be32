"""Markdown tables from the benchmark files, as quoted in the README.

    python benchmarks/report.py                  # benchmarks/results/{train_step,sigma_op}.json
    python benchmarks/report.py --train benchmarks/results/train_step_cuda.json --sigma benchmarks/results/sigma_op_cuda.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MB = 2**20


def train_tables(d: dict) -> str:
    out = []
    groups = sorted({(c["model"], c["layers"], c["tokens"]) for c in d["cases"]})
    inference = {(c["model"], c["layers"], c["tokens"]): c for c in d.get("inference", []) if "merged_over_base" in c}
    for g in groups:
        cases = {c["method"]: c for c in d["cases"] if (c["model"], c["layers"], c["tokens"]) == g and "median_step_s" in c}
        out.append(f"\n**{g[0]}, {g[1]} layers, {g[2]} tokens/step** (LR-LoRA with dropout 0.05 against LoRA with "
                   "dropout 0.05; every other method against LoRA with dropout 0)\n")
        out.append("| method | step time | tokens/s | × LoRA time | peak memory above the model | above LoRA's |")
        out.append("|---|---|---|---|---|---|")
        side_by_side = any("median_step_s_isolated" in c for c in cases.values())
        for m, c in cases.items():
            # Times measured side by side (one process, interleaved) compare; a case timed alone does not.
            alone = side_by_side and "median_step_s_isolated" not in c
            ref = cases.get("lora_d05" if m == "lrlora_d05" else "lora")
            ratio = "—" if alone or not ref else f"{c['median_step_s'] / ref['median_step_s']:.2f}×"
            above = f"{(c['peak_above_model_bytes'] - ref['peak_above_model_bytes']) / MB:+.0f} MB" if ref else "—"
            step = f"({c['median_step_s']:.2f} s, timed alone)" if alone else f"{c['median_step_s']:.2f} s"
            out.append(f"| {m} | {step} | {c['tokens_per_s']:.0f} | {ratio} | "
                       f"{c['peak_above_model_bytes'] / MB:.0f} MB | {above} |")
        if g in inference:
            out.append(f"\nInference, merged LR-LoRA model / base model forward: {inference[g]['merged_over_base']:.3f}")
    return "\n".join(out)


def sigma_table(d: dict) -> str:
    out = ["| module | shape | path | median fwd+bwd (range over processes) | × elementwise pass (allocating / into a buffer) | extra memory (× matrix) |",
           "|---|---|---|---|---|---|"]
    for c in d["cases"]:
        if "median_s" not in c:
            continue
        ew = (f"{c['x_elementwise']:.1f}× / {c['x_elementwise_into_buffer']:.1f}×"
              if "x_elementwise_into_buffer" in c else "—")
        runs = c.get("median_s_per_process", [])
        spread = f" ({min(runs) * 1e3:,.1f}–{max(runs) * 1e3:,.1f})" if len(runs) > 1 else ""
        out.append(f"| {c['module']} | {c['shape'][0]}×{c['shape'][1]} | {c['path']} | {c['median_s'] * 1e3:,.1f} ms{spread} | "
                   f"{ew} | {c['peak_extra_x_matrix']:.2f} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", default=str(RESULTS / "train_step.json"))
    ap.add_argument("--sigma", nargs="+", default=[str(RESULTS / "sigma_op.json")])
    args = ap.parse_args()
    for path in args.sigma:
        if Path(path).exists():
            print(f"\n{path}\n" + sigma_table(json.loads(Path(path).read_text())))
    if Path(args.train).exists():
        print(f"\n{args.train}" + train_tables(json.loads(Path(args.train).read_text())))


if __name__ == "__main__":
    main()
