"""benchmarks/gpu_check.py: without a GPU one `error:` line and nothing written; its plan runs every step on CUDA
within the five-minute budget; and (slow) every step runs through on CPU at the smallest sizes, writing its JSON."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks.common import ROOT
from benchmarks.gpu_check import BUDGET_S, main, plan


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_refuses_without_a_gpu_in_one_error_line(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "GPU" in lines[0]
    assert not out.exists()


def test_plan_runs_every_step_on_cuda_within_the_budget(tmp_path):
    steps = {s["name"]: s for s in plan("cuda", tmp_path / "out", tmp_path / "work")}
    assert list(steps) == ["tests", "sigma_op", "train_step", "harness_lora", "harness_lrlora"]
    assert sum(s["limit_s"] for s in steps.values()) <= BUDGET_S < 300
    tests = steps["tests"]["command"]
    assert tests[tests.index("pytest"):tests.index("pytest") + 4] == ["pytest", "-q", "-m", "gpu"]
    for name in ("sigma_op", "train_step"):
        cmd = steps[name]["command"]
        assert cmd[cmd.index("--device") + 1] == "cuda" and str(tmp_path / "out") in cmd[-1]
    step = steps["train_step"]["command"]
    assert {"lora", "lrlora"} <= set(step[step.index("--methods") + 1:])
    for method in ("lora", "lrlora"):
        cmd = steps[f"harness_{method}"]["command"]
        assert "trainer.max_steps=20" in cmd and f"adapter={method}" in cmd and "backbone=tiny_decoder" in cmd


@pytest.mark.slow
def test_every_step_runs_on_cpu_at_the_smallest_sizes(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and [s["name"] for s in report["steps"]] == ["tests", "sigma_op", "train_step",
                                                                    "harness_lora", "harness_lrlora"]
    assert json.loads((out / "sigma_op.json").read_text())["cases"][0]["median_s"] > 0
    assert {c["method"] for c in json.loads((out / "train_step.json").read_text())["cases"]} >= {"lora", "lrlora"}
    for method in ("lora", "lrlora"):
        res = json.loads((out / f"harness_{method}.json").read_text())
        assert res["adapter"] == method and res["metrics"]["train"]["steps"] == 2
