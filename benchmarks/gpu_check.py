"""The GPU check: what this repository has measured on CPU only, run once on one CUDA GPU in under five minutes.

    python -m benchmarks.gpu_check                 # on a machine with a CUDA GPU -> benchmarks/results/gpu/*.json
    python -m benchmarks.gpu_check --out DIR       # elsewhere

Without a GPU it refuses with one `error:` line (exit 2) and writes nothing. Four steps, each its own process
with a time limit (the four fit in ~4 minutes on one GPU); a step that fails or runs out of time is recorded and
the others still run:

  tests       pytest -m gpu: the CUDA tests (the σ op's table path against the exact sum, the fused layer against
              the reference layer in fp32 and bf16, evaluation with the adapters folded in)
  sigma_op    python -m benchmarks.sigma_op --device cuda --quick --paths fast exact: the σ op forward + backward
              at 896 × 4864 against one elementwise pass, and its memory (the op's CUDA form: no host reads)
  train_step  python -m benchmarks.train_step --device cuda: two Qwen2-0.5B-shaped layers, bf16, 2,048 tokens per
              step, LoRA against LR-LoRA with dropout 0 and 0.05, side by side; memory; the merged model's forward
  harness     python -m experiments.train on the tiny decoder (backbone=tiny_decoder, regime=bbc_news_gen), 20
              steps of LoRA and of LR-LoRA on CUDA, through the whole harness (checkpoint, evaluation, results)

Writes gpu_check.json (the device, each step's command, exit status, time, and the tail of its output when it
failed) and each step's own results (sigma_op.json, train_step.json, harness_lora.json, harness_lrlora.json) into
benchmarks/results/gpu/. ``python -m benchmarks.report --gpu`` prints them beside the CPU tables.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, machine_info, write_json_atomic
from lrlora import cli
from lrlora.errors import ConfigError

OUT = ROOT / "benchmarks" / "results" / "gpu"
BUDGET_S = 290  # the whole check: under five minutes
HARNESS = ["backbone=tiny_decoder", "regime=bbc_news_gen", "regime.n_train=64", "regime.n_val=8", "regime.n_test=8",
           "regime.train.batch_size=4", "trainer.max_steps=20", "trainer.eval_every=10", "logger=none",
           "trainer.progress=false", "adapter.r=4"]
METHODS = {"lora": ["adapter=lora"], "lrlora": ["adapter=lrlora", "adapter.center=true"]}


def plan(device: str, out: Path, work: Path, smoke: bool = False) -> list[dict]:
    """The steps as (name, command, time limit, results files to keep). ``smoke``: the same commands at the
    smallest sizes, for the CPU test of this script (everything but CUDA itself)."""
    py = sys.executable
    sigma = [py, "-m", "benchmarks.sigma_op", "--device", device, "--quick", "--paths", "fast", *([] if smoke else ["exact"]),
             "--processes", "1", "--repeats", "1" if smoke else "5", "--out", str(out / "sigma_op.json")]
    methods = ["lora", "lrlora"] if smoke else ["lora", "lrlora", "lora_d05", "lrlora_d05"]
    step = [py, "-m", "benchmarks.train_step", "--device", device, "--models", "qwen2_0.5b:1" if smoke else "qwen2_0.5b:2",
            "--tokens", "256" if smoke else "2048", "--methods", *methods, "--repeats", "1" if smoke else "3",
            "--vocab", "512" if smoke else "8192", "--out", str(out / "train_step.json")]
    tests = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"]
    steps = [{"name": "tests", "command": tests, "limit_s": 60, "keep": {}},
             {"name": "sigma_op", "command": sigma, "limit_s": 60, "keep": {}},
             {"name": "train_step", "command": step, "limit_s": 110, "keep": {}}]
    for method, over in METHODS.items():
        root = work / f"harness_{method}"
        extra = ["trainer.max_steps=2", "trainer.eval_every=1"] if smoke else []
        steps.append({"name": f"harness_{method}", "limit_s": 30,
                      "command": [py, "-m", "experiments.train", *over, *HARNESS, *extra, f"paths.root={root}",
                                  "trainer.force=true"],
                      "keep": {"results": (root / "results", out / f"harness_{method}.json")}})
    return steps


def run_step(s: dict, env: dict, deadline: float) -> dict:
    limit = max(5.0, min(s["limit_s"], deadline - time.perf_counter()))
    t0 = time.perf_counter()
    rec = {"name": s["name"], "command": " ".join(Path(c).name if c == sys.executable else c for c in s["command"]),
           "limit_s": round(limit)}
    try:
        proc = subprocess.run(s["command"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=limit)
        rec["returncode"] = proc.returncode
        # pytest: 5 is "no test ran" (every gpu test skipped): not a failure of the check
        rec["ok"] = proc.returncode == 0 or (s["name"] == "tests" and proc.returncode == 5)
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rec.update(returncode=None, ok=False, timed_out=True)
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    rec["wall_s"] = time.perf_counter() - t0
    if s["name"] == "tests":
        rec["summary"] = next((ln for ln in reversed(output.splitlines()) if " passed" in ln or " skipped" in ln
                               or " failed" in ln or "no tests ran" in ln), "")
    if not rec["ok"]:
        rec["output_tail"] = output[-2000:]
    for src, dst in s["keep"].values():
        found = sorted(Path(src).glob("*.json")) if Path(src).is_dir() else []
        if found:
            shutil.copyfile(found[0], dst)
            rec["results"] = dst.name
    return rec


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT), help="where the JSON files go (default benchmarks/results/gpu/)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)  # cpu: tests only
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the smallest sizes (tests only)
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("no CUDA GPU here (torch.cuda.is_available() is False): run python -m benchmarks.gpu_check "
                          "on a machine with one GPU and a CUDA build of torch")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    info = machine_info(args.device)
    report = {"machine": info, "device": args.device, "command": "python -m benchmarks.gpu_check " + " ".join(argv or sys.argv[1:]),
              "budget_s": BUDGET_S, "steps": []}
    t0 = time.perf_counter()
    deadline = t0 + BUDGET_S
    with tempfile.TemporaryDirectory() as work:
        for s in plan(args.device, out, Path(work), smoke=args.smoke):
            rec = run_step(s, env, deadline)
            report["steps"].append(rec)
            print(f"{rec['name']:<16} {'ok' if rec['ok'] else 'FAILED'}  {rec['wall_s']:6.1f} s"
                  + (f"  {rec['summary']}" if rec.get("summary") else ""), flush=True)
            write_json_atomic(report, out / "gpu_check.json")
    report["wall_s"] = time.perf_counter() - t0
    report["ok"] = all(r["ok"] for r in report["steps"])
    write_json_atomic(report, out / "gpu_check.json")
    print(f"{'all steps ok' if report['ok'] else 'some steps FAILED'} in {report['wall_s']:.0f} s on "
          f"{info.get('gpu', args.device)}; wrote {out / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    cli.run(main)
