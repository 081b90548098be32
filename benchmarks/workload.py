"""The reproduction's own workload: the harness's training step and evaluation, LoRA against LR-LoRA, side by side.

    python -m benchmarks.workload                         # minilm_56, minilm_128, smollm2_256 -> results/workload.json
    python -m benchmarks.workload --cells minilm_56 --profile      # + torch.profiler's top costs per step
    python -m benchmarks.workload --cells minilm_56 --shared       # beside a second training process (the grid's pairs)
    python -m benchmarks.workload --runs                  # whole harness runs (40 steps, 2 evaluations), alternating

Cells (``CELLS``): the reproduction's MiniLM cell (``backbone=minilm_l6``, r = 4 on every linear, batch 16,
adapter dropout 0.10, lr 1e-3, LR-LoRA ``center=true`` as the grid runs it) on BBC News articles cut to 56 and
128 tokens (every article is longer, so every example has exactly that many tokens: the ~56 of winowhy and the
~125 of timedial), and SmolLM2-135M (``backbone=smollm2_135m``, the converted copy in ``cache/``) with all seven
projections adapted, r = 8, batch 4, ``bbc_news_gen`` as the regime sets it (prompt and answer, up to 256 tokens; a
cut at 128 would drop the answers of the longer prompts, leaving a batch with no target). Everything is built by the harness's own code
(Hydra's compose of ``conf/``, ``experiments.backbones.build_backbone``, ``baselines.apply_adapter``, the loop's
optimizer and schedule) and a step is the loop's (``experiments.loop.forward_backward`` and ``apply_update``, then
the method's ``on_step`` and ``zero_grad``); evaluation is the ``glue`` protocol on 64 test examples (the causal-LM
cell: the loop's validation ``evaluate`` on 32).

Time: ONE process builds both models and takes one step of each in turn with the same batch (LoRA, LR-LoRA,
LoRA, ...), ``--repeats`` rounds after a warm-up round, then the evaluations likewise; medians, and the ratio. In
the same rounds it times the floor's parts (below). Memory: each method in its own process (glibc's mmap
threshold pinned so freed blocks leave the RSS), peak RSS over a warm-up step, ``--memory-steps`` steps and one
evaluation: above the model once built (VmHWM reset then) and the whole process's.

The floor, from first principles: per adapted linear and step, LoRA pays two dense products (x W0ᵀ forward,
g W0 backward); LR-LoRA's update is a dense d_out × d_in matrix, so it also pays the dense weight gradient Gᵀ X̃,
a third, whatever it does; and, whatever the token count, σ forward and backward over every adapted matrix. So
floor = LoRA's step + Σ (one dense product at this many tokens, per adapted linear) + Σ (the σ op's forward and
backward on that layer's own B A). The two added terms are measured here, in the same rounds as the steps.

``--shared``: the same timing beside a second process that takes training steps of the same cell throughout (one
core each, as the reproduction grid runs two shards): LoRA and LR-LoRA in turn; then, as the shards pair cells,
LoRA timed beside a LoRA process and LR-LoRA beside an LR-LoRA process (``same_method_partner``).

Writes benchmarks/results/workload.json (``--out``), with the load average before and after each cell: on a
shared machine read the ratios, which compare steps taken seconds apart, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    MALLOC_ENV,
    ROOT,
    machine_info,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    write_json_atomic,
)
from lrlora import cli
from lrlora.errors import ConfigError

COMMON = ["logger=none", "trainer.num_threads=1", "trainer.progress=false", "regime.train.lr=1.0e-3",
          "regime.train.patience=null"]
CELLS = {
    "minilm_56": ["backbone=minilm_l6", "regime=bbc_news", "regime.max_length=56", "regime.train.batch_size=16",
                  "adapter.r=4"],
    "minilm_128": ["backbone=minilm_l6", "regime=bbc_news", "regime.max_length=128", "regime.train.batch_size=16",
                   "adapter.r=4"],
    "smollm2_256": ["backbone=smollm2_135m", "regime=bbc_news_gen", "regime.train.batch_size=4", "adapter.r=8"],
}
METHODS = {"lora": ["adapter=lora"], "lrlora": ["adapter=lrlora", "adapter.center=true"]}
EVAL_EXAMPLES = {"classification": 64, "causal_lm": 32}
TOP = 8  # profiler rows kept per method


def compose(cell: str, method: str, extra=()):
    from experiments.hydra_cli import compose_train

    return compose_train([*METHODS[method], *CELLS[cell], *COMMON, *extra])


class Case:
    """One method on one cell, built by the harness's code, with the loop's optimizer, schedule and step."""

    def __init__(self, cell: str, method: str, accelerator=None):
        from baselines import apply_adapter
        from experiments.backbones import build_backbone
        from experiments.data import load_splits, make_collate
        from experiments.loop import make_scheduler
        from experiments.train import _accelerator, adapter_kwargs

        cfg = self.cfg = compose(cell, method)
        self.method, regime, tc = method, cfg.regime, cfg.regime.train
        self.data = load_splits(regime, cfg.paths.data_dir)
        torch.manual_seed(cfg.seed)
        model, self.processor = build_backbone(cfg.backbone, regime.task, regime.get("num_labels"), cfg.paths.cache_dir)
        kwargs = adapter_kwargs(cfg)
        torch.manual_seed(cfg.seed)
        self.handle = apply_adapter(model, name=cfg.adapter.name, **kwargs)
        self.collate = make_collate(regime, self.processor)
        self.accelerator = accelerator or _accelerator(cfg)
        self.params = [p for p in self.handle.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(self.params, lr=cfg.adapter.get("lr") or tc.lr, betas=tuple(tc.betas),
                                weight_decay=tc.weight_decay)
        self.total_steps = 1000
        self.scheduler = make_scheduler(opt, tc.schedule, int(tc.warmup_ratio * self.total_steps), self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(self.handle.model, opt)
        self.model.train()
        self.batch_size, self.steps = tc.batch_size, 0
        self.eval_examples = self.data.test[:EVAL_EXAMPLES.get(regime.task, 32)]

    def batch(self, i: int) -> dict:
        n = len(self.data.train) // self.batch_size
        ex = self.data.train[(i % n) * self.batch_size:(i % n + 1) * self.batch_size]
        return {k: v.to(self.accelerator.device) for k, v in self.collate(ex).items()}

    def step(self, batch: dict) -> float:
        from experiments.loop import apply_update, forward_backward

        loss = forward_backward(self.model, [batch], 1, self.accelerator)
        apply_update(self.params, self.optimizer, self.scheduler, self.accelerator, self.cfg.regime.train.grad_clip)
        self.handle.on_step(self.steps, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return loss

    def evaluate(self) -> dict:
        """The glue protocol on the first test examples (classification), else the loop's validation evaluate."""
        from experiments.protocols import EvalContext, protocol_config, run_protocol
        from experiments.protocols.forward import evaluate

        acc, regime = self.accelerator, self.cfg.regime
        if regime.task == "classification":
            ctx = EvalContext(model=acc.unwrap_model(self.model), processor=self.processor, regime=regime,
                              test=self.eval_examples, collate=self.collate, device=acc.device, autocast=acc.autocast,
                              batch_size=2 * self.batch_size, adapter=self.handle)
            return run_protocol("glue", ctx, protocol_config("glue"))
        return evaluate(self.model, self.eval_examples, self.collate, regime.task, 2 * self.batch_size, acc.device,
                        acc.autocast)


def adapted_layers(model) -> dict:
    """LR-LoRA's per-layer deltas (A, B, σ) by module name."""
    from lrlora.layer import LRLoRADelta

    return {n: m for n, m in model.named_modules() if isinstance(m, LRLoRADelta)}


def floor_parts(lr_case: Case, tokens: int):
    """The floor's two added terms as callables: one dense product per adapted linear at ``tokens`` tokens, and
    the σ op (forward and backward, the table path as the layer takes it) on each layer's own B A."""
    from lrlora.ops import sigma_with

    layers = adapted_layers(lr_case.model)
    shapes = [(m.lora_B.shape[0], m.lora_A.shape[1]) for m in layers.values()]
    xs = {d_in: torch.randn(tokens, d_in) for _, d_in in shapes}
    ws = [torch.randn(d_out, d_in) for d_out, d_in in shapes]

    def dense():
        for w in ws:
            torch.mm(xs[w.shape[1]], w.t())

    def sigma():
        for m in layers.values():
            tf, ds = m.transfer, m.delta_spec()
            a, rho = tf.a.detach().requires_grad_(), tf.rho.detach().requires_grad_()
            t = (m.lora_B.detach() @ m.lora_A.detach()).requires_grad_()
            y = sigma_with(t, ds.spec, a, rho, tf.grid, ds.mode, ds.table_size)
            y.backward(torch.ones_like(y))

    return dense, sigma, len(shapes)


def _tokens(batch: dict) -> tuple[int, int]:
    ids = batch["input_ids"]
    return int(batch["attention_mask"].sum()), ids.numel()


def timing_worker(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lora = Case(args.cell, "lora")
    cases = {"lora": lora, "lrlora": Case(args.cell, "lrlora", lora.accelerator)}  # one accelerator, as one run has
    lr = cases["lrlora"]
    batches = [lora.batch(i) for i in range(max(2, args.repeats))]
    real, padded = _tokens(batches[0])
    dense, sigma, n_adapted = floor_parts(lr, padded)
    times = {"lora": [], "lrlora": [], "dense_products": [], "sigma_op": []}
    losses = {"lora": [], "lrlora": []}
    parts = {"lora": lambda b: losses["lora"].append(lora.step(b)), "lrlora": lambda b: losses["lrlora"].append(lr.step(b)),
             "dense_products": lambda b: dense(), "sigma_op": lambda b: sigma()}
    load_before = os.getloadavg()
    for rnd in range(args.repeats + 1):  # round 0 warms up (kernels built, pages touched, AdamW state created)
        b = batches[rnd % len(batches)]
        for name, f in parts.items():
            t0 = time.perf_counter()
            f(b)
            if rnd:
                times[name].append(time.perf_counter() - t0)
    evals = {"lora": [], "lrlora": []}
    metrics = {}
    for rnd in range(args.eval_repeats + 1):
        for name, c in cases.items():
            t0 = time.perf_counter()
            metrics[name] = c.evaluate()
            if rnd:
                evals[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    emed = {k: statistics.median(v) for k, v in evals.items()}
    floor = med["lora"] + med["dense_products"] + med["sigma_op"]
    out = {"cell": args.cell, "threads": args.threads, "adapter_dropout": float(lr.cfg.regime.get("adapter_dropout", 0.0)),
           "tokens_per_example": real / len(batches[0]["input_ids"]),
           "tokens_per_step": real, "padded_tokens_per_step": padded, "adapted_linears": n_adapted,
           "adapted_elements": sum(m.lora_B.shape[0] * m.lora_A.shape[1] for m in adapted_layers(lr.model).values()),
           "median_step_s": {"lora": med["lora"], "lrlora": med["lrlora"]},
           "step_ratio": med["lrlora"] / med["lora"],
           "floor": {"dense_products_s": med["dense_products"], "sigma_op_s": med["sigma_op"], "step_s": floor,
                     "ratio": floor / med["lora"]},
           "median_eval_s": emed, "eval_ratio": emed["lrlora"] / emed["lora"], "eval_examples": len(lora.eval_examples),
           "eval_metrics": metrics, "times_s": times, "eval_times_s": evals, "losses": losses,
           "load_average_before": load_before, "load_average_after": os.getloadavg()}
    if args.profile:
        out["profile"] = {name: profile(c, batches, args.profile_steps) for name, c in cases.items()}
    return out


def profile(case: Case, batches, steps: int) -> dict:
    """torch.profiler over ``steps`` steps: the top costs by self CPU time, per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            case.step(batches[i % len(batches)])
        wall = (time.perf_counter() - t0) / steps
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / 1e6 / steps
    return {"step_s": wall, "self_cpu_s_per_step": total,
            "top": [{"name": e.key, "self_s_per_step": e.self_cpu_time_total / 1e6 / steps,
                     "share": e.self_cpu_time_total / 1e6 / steps / total, "calls_per_step": e.count / steps}
                    for e in rows[:TOP]]}


def memory_worker(args) -> dict:
    torch.set_num_threads(args.threads)
    case = Case(args.cell, args.method)
    batches = [case.batch(i) for i in range(2)]
    before = rss_bytes()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    for i in range(args.memory_steps + 1):
        case.step(batches[i % 2])
    after_train = peak_rss_bytes()
    case.evaluate()
    peak = peak_rss_bytes()
    return {"peak_above_model_bytes": peak - before, "train_peak_above_model_bytes": after_train - before,
            "model_rss_bytes": before, "peak_rss_bytes": peak}


def companion(args) -> None:
    """The other run of a pair: steps of ``--partner`` (lora, lrlora, or both in turn) until killed (``--shared``)."""
    torch.set_num_threads(args.threads)
    methods = list(METHODS) if args.partner == "both" else [args.partner]
    cases = [Case(args.cell, methods[0])]
    cases += [Case(args.cell, m, cases[0].accelerator) for m in methods[1:]]
    b = cases[0].batch(0)
    print("ready", flush=True)
    while True:
        for c in cases:
            c.step(b)


def _run(cmd, env) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        return {"failed": err[-1] if err else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env(args, memory: bool = False) -> dict:
    return {**os.environ, **(MALLOC_ENV if memory else {}), "OMP_NUM_THREADS": str(args.threads),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


def _worker_cmd(args, *extra) -> list[str]:
    return [sys.executable, "-m", "benchmarks.workload", "--threads", str(args.threads), "--repeats", str(args.repeats),
            "--eval-repeats", str(args.eval_repeats), "--memory-steps", str(args.memory_steps),
            "--profile-steps", str(args.profile_steps), *extra]


def _timing(args, cell: str, partner_methods: str | None) -> dict:
    """The timing worker, alone or beside a companion process stepping ``partner_methods`` throughout."""
    partner = None
    if partner_methods:
        partner = subprocess.Popen(_worker_cmd(args, "--companion", cell, "--partner", partner_methods), cwd=ROOT,
                                   env=_env(args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   start_new_session=True)
        partner.stdout.readline()  # "ready": its models are built and stepping
    try:
        return _run(_worker_cmd(args, "--worker", cell, "timing", *(["--profile"] if args.profile else [])), _env(args))
    finally:
        if partner is not None:
            os.killpg(partner.pid, signal.SIGTERM)  # the companion this call started, and nothing else
            partner.wait()


def run_cell(args, cell: str) -> dict:
    out = {"cell": cell, "overrides": {m: [*METHODS[m], *CELLS[cell], *COMMON] for m in METHODS},
           "load_average_before": os.getloadavg()}
    if args.shared:
        out["shared"] = "a second process stepped LoRA and LR-LoRA of the same cell in turn throughout"
    out.update(_timing(args, cell, "both" if args.shared else None))
    if args.shared and "median_step_s" in out:
        # As the grid's two shards pair cells: a LoRA run beside a LoRA run, an LR-LoRA run beside an LR-LoRA run.
        same = {m: _timing(args, cell, m) for m in METHODS}
        if all("median_step_s" in v for v in same.values()):
            lora, lr = same["lora"]["median_step_s"]["lora"], same["lrlora"]["median_step_s"]["lrlora"]
            out["same_method_partner"] = {"median_step_s": {"lora": lora, "lrlora": lr}, "step_ratio": lr / lora,
                                          "runs": {m: {k: v[k] for k in ("median_step_s", "load_average_before",
                                                                          "load_average_after")} for m, v in same.items()}}
    if not args.no_memory and not args.shared:
        out["memory"] = {m: _run(_worker_cmd(args, "--worker", cell, m), _env(args, memory=True)) for m in METHODS}
        mem = out["memory"]
        if all("peak_rss_bytes" in v for v in mem.values()):
            out["memory_ratio"] = mem["lrlora"]["peak_rss_bytes"] / mem["lora"]["peak_rss_bytes"]
            out["memory_above_model_ratio"] = (mem["lrlora"]["peak_above_model_bytes"]
                                               / mem["lora"]["peak_above_model_bytes"])
    out["load_average_after"] = os.getloadavg()
    return out


RUN_OVERRIDES = ["regime.n_train=320", "regime.n_val=100", "regime.n_test=300", "trainer.max_steps=40",
                 "trainer.eval_every=20", "trainer.compute_ranks=false"]


def whole_runs(args) -> dict:
    """Whole harness runs (``python -m experiments.train``) of the short-input cell, LoRA and LR-LoRA alternating:
    timing.train_s (steps only), the evaluations and checkpoints around them (wall_s − train_s), and wall_s."""
    runs = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.run_repeats):
            for m in METHODS:
                over = [*METHODS[m], *CELLS["minilm_56"], *COMMON, *RUN_OVERRIDES, f"paths.root={tmp}",
                        "trainer.force=true"]
                load = os.getloadavg()
                proc = subprocess.run([sys.executable, "-m", "experiments.train", *over], capture_output=True, text=True,
                                      cwd=ROOT, env=_env(args))
                if proc.returncode != 0:
                    raise RuntimeError(f"experiments.train failed: {proc.stderr.strip().splitlines()[-1:]}")
                res = json.loads(next(Path(tmp, "results").glob(f"*__{m}__*.json")).read_text())
                for f in Path(tmp, "results").glob("*.json"):
                    f.unlink()
                t = res["timing"]
                runs[m].append({"train_s": t["train_s"], "wall_s": t["wall_s"], "rest_s": t["wall_s"] - t["train_s"],
                                "test_accuracy": res["metrics"]["glue"]["accuracy"], "load_average_before": load,
                                "load_average_after": os.getloadavg()})
                print(f"  run {rep} {m}: train_s {t['train_s']:.1f}, wall_s {t['wall_s']:.1f}", flush=True)
    med = {m: {k: statistics.median(r[k] for r in v) for k in ("train_s", "wall_s", "rest_s")} for m, v in runs.items()}
    return {"overrides": [*CELLS["minilm_56"], *COMMON, *RUN_OVERRIDES], "runs": runs, "median": med,
            "ratio": {k: med["lrlora"][k] / med["lora"][k] for k in ("train_s", "wall_s", "rest_s")}}


def main(argv=None):
    ap = cli.ArgumentParser(prog="python -m benchmarks.workload", description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    ap.add_argument("--repeats", type=int, default=8, help="timed step rounds (after one warm-up round)")
    ap.add_argument("--eval-repeats", type=int, default=3)
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="torch.profiler's top costs per step, each method")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--shared", action="store_true", help="with a second process stepping the same cell meanwhile")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--runs", action="store_true", help="also whole harness runs of minilm_56 (alternating)")
    ap.add_argument("--run-repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", nargs=2, metavar=("CELL", "KIND"), help=argparse.SUPPRESS)
    ap.add_argument("--companion", metavar="CELL", help=argparse.SUPPRESS)
    ap.add_argument("--partner", choices=("lora", "lrlora", "both"), default="both", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.companion:
        args.cell = args.companion
        return companion(args)
    if args.worker:
        args.cell, kind = args.worker
        if kind == "timing":
            res = timing_worker(args)
        else:
            args.method = kind
            res = memory_worker(args)
        print(json.dumps(res))
        return None
    if "smollm2_256" in args.cells and not (ROOT / "cache" / "smollm2_135m" / "config.json").exists():
        raise ConfigError("the smollm2_256 cell needs the converted SmolLM2 copy in cache/smollm2_135m "
                          "(python -m scripts.cache_smollm2), or leave it out with --cells minilm_56 minilm_128")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"workload{'_shared' if args.shared else ''}.json")
    results = {"machine": machine_info("cpu"), "threads": args.threads, "repeats": args.repeats,
               "eval_repeats": args.eval_repeats, "shared": args.shared,
               "command": " ".join(["python", "-m", "benchmarks.workload", *sys.argv[1:]]),
               "load_average_start": os.getloadavg(), "cells": []}
    for cell in args.cells:
        c = run_cell(args, cell)
        results["cells"].append(c)
        write_json_atomic(results, out)  # partial results survive an interrupted run
        if "failed" in c:
            print(f"{cell}: failed: {c['failed']}")
            continue
        m = c["median_step_s"]
        print(f"{cell}: step LoRA {m['lora']:.3f} s, LR-LoRA {m['lrlora']:.3f} s = {c['step_ratio']:.2f}x "
              f"(floor {c['floor']['ratio']:.2f}x); evaluation {c['eval_ratio']:.2f}x"
              + (f"; peak memory {c['memory_ratio']:.2f}x" if "memory_ratio" in c else "")
              + (f"; beside a run of the same method {c['same_method_partner']['step_ratio']:.2f}x"
                 if "same_method_partner" in c else "")
              + f"; load {c['load_average_before'][0]:.1f}-{c['load_average_after'][0]:.1f}", flush=True)
    if args.runs:
        results["runs"] = whole_runs(args)
        r = results["runs"]["ratio"]
        print(f"whole runs (minilm_56): train_s {r['train_s']:.2f}x, wall_s {r['wall_s']:.2f}x")
    results["load_average_end"] = os.getloadavg()
    write_json_atomic(results, out)
    print(f"wrote {out}")
    return None


if __name__ == "__main__":
    cli.run(main)
