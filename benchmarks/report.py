"""Markdown tables from the benchmark files, as quoted in docs/performance.md.

    python -m benchmarks.report                  # benchmarks/results/{train_step,sigma_op,workload,...}.json
    python -m benchmarks.report --train benchmarks/results/train_step_cuda.json --sigma benchmarks/results/sigma_op_cuda.json
    python -m benchmarks.report --gpu            # benchmarks/results/gpu/ (python -m benchmarks.gpu_check)
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from lrlora import cli
from lrlora.errors import ConfigError

RESULTS = Path(__file__).parent / "results"
MB = 2**20


def train_tables(d: dict) -> str:
    out = []
    order = {m: i for i, m in reversed(list(enumerate(c["model"] for c in d["cases"])))}  # models as first run
    groups = sorted({(c["model"], c["layers"], c["tokens"]) for c in d["cases"]}, key=lambda g: (order[g[0]], g[1:]))
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


def breakdown_table(d: dict) -> str:
    """The σ op's parts (benchmarks/sigma_op_breakdown.py), each as a multiple of one elementwise pass."""
    out = ["| part | median | × elementwise pass |", "|---|---|---|"]
    out += [f"| {k} | {v:.2f} ms | {d['x_elementwise'][k]:.1f}× |" for k, v in d["median_ms"].items()]
    return "\n".join(out)


def _ms(x: float) -> str:
    return f"{x * 1e3:,.0f} ms" if x < 10 else f"{x:,.1f} s"


def workload_tables(d: dict) -> str:
    """The reproduction's own workload (benchmarks/workload.py): step, evaluation and peak memory of LoRA and
    LR-LoRA side by side per cell, with the floor; the whole harness runs; the profile's top costs."""
    out = ["| cell | tokens/example | step: LoRA | LR-LoRA | × | floor × | evaluation: LoRA | LR-LoRA | × | "
           "peak memory: LoRA | LR-LoRA | × | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in d.get("cells", []):
        if "median_step_s" not in c:
            continue
        st, ev, mem = c["median_step_s"], c["median_eval_s"], c.get("memory", {})
        peaks = [mem.get(m, {}).get("peak_rss_bytes") for m in ("lora", "lrlora")]
        memcols = (f"{peaks[0] / MB:,.0f} MB | {peaks[1] / MB:,.0f} MB | {peaks[1] / peaks[0]:.2f}×" if all(peaks)
                   else "— | — | —")
        load = f"{c['load_average_before'][0]:.1f}–{c['load_average_after'][0]:.1f}"
        out.append(f"| {c['cell']} | {c['tokens_per_example']:.0f} | {_ms(st['lora'])} | {_ms(st['lrlora'])} | "
                   f"{c['step_ratio']:.2f}× | {c['floor']['ratio']:.2f}× | {_ms(ev['lora'])} | {_ms(ev['lrlora'])} | "
                   f"{c['eval_ratio']:.2f}× | {memcols} | {load} |")
    for c in d.get("cells", []):
        same = c.get("same_method_partner")
        if same:
            st = same["median_step_s"]
            out.append(f"\nBeside a second training process of the same method (as the grid's two shards pair cells), "
                       f"{c['cell']}: LoRA {_ms(st['lora'])}, LR-LoRA {_ms(st['lrlora'])}, {same['step_ratio']:.2f}×; "
                       f"beside one stepping both in turn, {c['step_ratio']:.2f}×.")
    runs = d.get("runs")
    if runs:
        med = runs["median"]
        out += ["", "| whole harness run (minilm_56, 40 steps, evaluations every 20) | LoRA | LR-LoRA | × |",
                "|---|---|---|---|"]
        for key, label in (("train_s", "timing.train_s (the steps)"), ("rest_s", "wall_s − train_s (evaluations, "
                           "checkpoints, loading, test)"), ("wall_s", "timing.wall_s")):
            out.append(f"| {label} | {med['lora'][key]:.1f} s | {med['lrlora'][key]:.1f} s | {runs['ratio'][key]:.2f}× |")
    for c in d.get("cells", []):
        for method, p in (c.get("profile") or {}).items():
            top = ", ".join(f"{r['name']} {r['self_s_per_step'] * 1e3:,.0f} ms ({r['share']:.0%})" for r in p["top"][:5])
            out.append(f"\nProfile, {c['cell']}, {method} (step {_ms(p['step_s'])}): {top}")
    return "\n".join(out)


def floor_table(d: dict) -> str:
    """The floor per cell, from first principles and measured in the same rounds as the steps."""
    out = ["| cell | tokens/step | LoRA step | + one dense product per adapted linear | + σ forward and backward, "
           "every adapted matrix | = floor | × LoRA | LR-LoRA measured | above the floor |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in d.get("cells", []):
        if "floor" not in c:
            continue
        f, st = c["floor"], c["median_step_s"]
        out.append(f"| {c['cell']} | {c['padded_tokens_per_step']:,} | {_ms(st['lora'])} | {_ms(f['dense_products_s'])} | "
                   f"{_ms(f['sigma_op_s'])} | {_ms(f['step_s'])} | {f['ratio']:.2f}× | {c['step_ratio']:.2f}× | "
                   f"{st['lrlora'] / f['step_s'] - 1:+.0%} |")
    return "\n".join(out)


def gpu_table(d: dict) -> str:
    """The GPU check's steps (benchmarks/gpu_check.py)."""
    out = [f"GPU check on {d.get('machine', {}).get('gpu', d.get('device'))}: "
           f"{'all steps ok' if d.get('ok') else 'some steps failed'} in {d.get('wall_s', 0):.0f} s",
           "", "| step | ok | time | |", "|---|---|---|---|"]
    for r in d.get("steps", []):
        out.append(f"| {r['name']} | {'yes' if r['ok'] else 'no'} | {r['wall_s']:.0f} s | {r.get('summary', '')} |")
    return "\n".join(out)


def _group(s: dict) -> str:
    return f"{s['model']} ×{s['layers']}, {s['tokens']:,} tok"


def _spread(times: list) -> float | None:
    """(max − min) / median of repeated timings of one thing: how far apart this run's noise puts them."""
    return (max(times) - min(times)) / statistics.median(times) if len(times) >= 2 else None


def target_table(train: dict | None, sigma: dict | None, workload: dict | None = None,
                 breakdown: dict | None = None) -> str:
    """The performance targets checked against the benchmark files: docs/performance.md's target table is this output."""
    from benchmarks.train_step import largest_adapted_matrix_bytes

    rows = []

    def ratio_row(label, method, keep, limit):
        hits = [s for s in (train or {}).get("summary", []) if s["method"] == method and keep(s)]
        if hits:
            vals = ", ".join(f"{s['step_time_ratio']:.2f}× ({_group(s)})" for s in hits)
            rows.append((label, vals, "yes" if all(s["step_time_ratio"] <= limit for s in hits) else "no"))

    ratio_row("LR-LoRA / LoRA step time ≤ 1.6× at ≥ 2,048 tokens (dropout 0)", "lrlora", lambda s: s["tokens"] >= 2048, 1.6)
    ratio_row("≤ 1.8× at 512 tokens (dropout 0)", "lrlora", lambda s: s["tokens"] < 2048, 1.8)
    ratio_row("≤ 2.0× with dropout 0.05 (against LoRA with dropout 0.05)", "lrlora_d05", lambda s: True, 2.0)
    mem = [s for s in (train or {}).get("summary", []) if s["method"] in ("lrlora", "lrlora_d05")]
    if mem:
        limit = {s["model"]: 3 * largest_adapted_matrix_bytes(s["model"]) for s in mem}
        vals = ", ".join(f"{s['memory_above_vs_bytes'] / MB:+.0f} MB ({s['method']}, {_group(s)})" for s in mem)
        lims = ", ".join(f"{m}: {v / MB:.0f} MB" for m, v in limit.items())
        ok = all(s["memory_above_vs_bytes"] <= limit[s["model"]] for s in mem)
        rows.append((f"peak memory above LoRA's (same dropout) ≤ 3 largest adapted fp32 matrices ({lims}), at every depth",
                     vals, "yes" if ok else "no"))
    inf = [c for c in (train or {}).get("inference", []) if "merged_over_base" in c]
    if inf:
        vals = ", ".join(f"{c['merged_over_base']:.3f} ({c['model']} ×{c['layers']}, {c['tokens']:,} tok)" for c in inf)
        # A merged model is the base model's modules with other weights: any gap is timing noise (±3%). Where a run's
        # own noise is wider than that, the band cannot be told from it: the base model's forward, timed against
        # itself, spreads by (max − min) / median, and a ratio inside that spread is "not resolved", not "no".
        outside = [c for c in inf if abs(c["merged_over_base"] - 1) > 0.03]
        spread = {id(c): _spread(c.get("times_s", {}).get("base", [])) for c in outside}
        unresolved = all(c.get("merged_is_plain_model") and spread[id(c)] is not None
                         and abs(c["merged_over_base"] - 1) <= spread[id(c)] for c in outside)
        verdict = "yes" if not outside else ("not resolved: this run's base-to-base spread " + ", ".join(
            f"±{spread[id(c)]:.2f}" for c in outside) + " is wider than the band" if unresolved else "no")
        rows.append(("merged model's forward / base model's = 1.00 (±0.03, timing noise)", vals, verdict))
    sig = [c for c in (sigma or {}).get("cases", []) if c.get("path") == "fast" and c.get("shape") == [896, 4864]
           and "x_elementwise" in c]
    for c in sig:
        rows.append(("σ op forward + backward at 896×4864 ≤ 25× one elementwise pass (same process)",
                     f"{c['median_s'] * 1e3:.1f} ms = {c['x_elementwise']:.1f}× (allocating pass) / "
                     f"{c['x_elementwise_into_buffer']:.1f}× (into a buffer)",
                     "yes" if c["x_elementwise"] <= 25 else "no"))
    bx = (breakdown or {}).get("x_elementwise", {})
    whole, kept = bx.get("whole op (forward + backward)"), bx.get("whole op, freed memory kept mapped (no page faults)")
    if whole is not None:
        rows.append(("σ op ≤ 25× one elementwise pass into a buffer (breakdown, one process)",
                     f"{whole:.1f}×" + (f"; {kept:.1f}× with freed memory kept mapped" if kept is not None else ""),
                     "yes" if whole <= 25 else ("only without page faults" if kept is not None and kept <= 25 else "no")))
    cells = [c for c in (workload or {}).get("cells", []) if "step_ratio" in c]
    short = [c for c in cells if c["cell"] == "minilm_56"]
    runs = (workload or {}).get("runs")
    if runs:
        r = runs["ratio"]
        rows.append(("whole LR-LoRA run / LoRA's, short-input cell ≤ 1.5× (timing.train_s; wall_s with the evaluations)",
                     f"{r['train_s']:.2f}× train_s, {r['wall_s']:.2f}× wall_s",
                     "yes" if max(r["train_s"], r["wall_s"]) <= 1.5 else "no"))
    for c in short:
        rows.append(("LR-LoRA / LoRA step on the short-input cell ≤ 1.5× (floor: the third dense product and σ)",
                     f"{c['step_ratio']:.2f}× (floor {c['floor']['ratio']:.2f}×)", "yes" if c["step_ratio"] <= 1.5 else "no"))
    if cells:
        vals = ", ".join(f"{c['eval_ratio']:.2f}× ({c['cell']})" for c in cells)
        rows.append(("evaluation ≤ 1.1× LoRA's (merged weights)", vals,
                     "yes" if all(c["eval_ratio"] <= 1.1 for c in cells) else "no"))
        mem = [c for c in cells if "memory_ratio" in c]
        if mem:
            vals = ", ".join(f"{c['memory_ratio']:.2f}× ({c['cell']})" for c in mem)
            rows.append(("peak memory ≤ 1.1× LoRA's (whole process, training and evaluation)", vals,
                         "yes" if all(c["memory_ratio"] <= 1.1 for c in mem) else "no"))
    out = ["| target | measured | met? |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out)


def _read(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not a benchmark results file ({e}); re-run the benchmark or pass another") from None


def main(argv=None):
    ap = cli.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    ap.add_argument("--train", default=str(RESULTS / "train_step.json"))
    ap.add_argument("--sigma", nargs="+", default=[str(RESULTS / "sigma_op.json")])
    ap.add_argument("--workload", nargs="+", default=[str(RESULTS / "workload.json"), str(RESULTS / "workload_shared.json")])
    ap.add_argument("--breakdown", default=str(RESULTS / "sigma_op_breakdown.json"))
    ap.add_argument("--gpu", action="store_true", help="also the GPU check's files (benchmarks/results/gpu/)")
    args = ap.parse_args(argv)
    sigmas = {p: _read(p) for p in args.sigma if Path(p).exists()}
    train = _read(args.train) if Path(args.train).exists() else None
    workloads = {p: _read(p) for p in args.workload if Path(p).exists()}
    breakdown = _read(args.breakdown) if Path(args.breakdown).exists() else None
    for path, d in sigmas.items():
        print(f"\n{path}\n" + sigma_table(d))
    if train:
        print(f"\n{args.train}" + train_tables(train))
    if breakdown:
        print(f"\n{args.breakdown}\n" + breakdown_table(breakdown))
    for path, d in workloads.items():
        print(f"\n{path}\n" + workload_tables(d) + "\n\n" + floor_table(d))
    if args.gpu:
        gpu = RESULTS / "gpu" / "gpu_check.json"
        print("\n" + (gpu_table(_read(gpu)) if gpu.exists() else f"{gpu}: not yet measured on a GPU "
                     "(python -m benchmarks.gpu_check)"))
    print("\nTargets\n" + target_table(train, next(iter(sigmas.values()), None), workloads.get(args.workload[0]),
                                        breakdown))


if __name__ == "__main__":
    cli.run(main)
