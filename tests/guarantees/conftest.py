"""The fixtures of the guarantee tests. `template` is the world every fault is put into: built once per pytest
run, since no test writes into it (they read it, or copy it); `world` is a fresh copy of it for each test, so that no
test's fault reaches the next."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from baselines import apply_adapter
from experiments.train import run
from lrlora import LRLoRAConfig, apply_lrlora, save_adapter
from tests.guarantees.world import LORA_RUN, REPORT, RUN, cfg_for, tiny


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    """A finished LR-LoRA run, an unfinished one (checkpoint, no results), a LoRA and an LR-LoRA adapter
    folder, a PEFT-only folder, and a folder of someone's notes: what the faults of these tests must leave alone."""
    root = tmp_path_factory.mktemp("world")
    os.environ["HF_HUB_OFFLINE"] = "1"
    run(cfg_for(root / "out"))
    run(cfg_for(root / "part", extra=["trainer.max_steps=4", "trainer.save_every=2"]))
    part = root / "part" / "runs" / RUN
    (root / "part" / "results" / f"{RUN}.json").unlink()  # as if killed after the step-4 checkpoint
    meta = json.loads((part / "run.json").read_text())
    (part / "run.json").write_text(json.dumps({**meta, "status": "running"}))
    model, kw = tiny("lora")
    apply_adapter(model, name="lora", **kw).save(root / "lora_adapter")
    model, kw = tiny("lrlora")  # the library's own format (the harness saves LR-LoRA in PEFT's, lrlora.peft)
    save_adapter(apply_lrlora(model, LRLoRAConfig(**kw)), root / "lrlora_adapter")
    model, kw = tiny("lrlora")
    apply_adapter(model, name="lrlora", **kw).save(root / "lrlora_run_adapter")  # as a harness run saves it
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("my notes\n")
    (root / "afile").write_text("a file\n")
    data = root / "data"
    data.mkdir()
    good = [{"instruction": "Is it?", "input": "", "output": "the correct answer is true", "answer": "true"}] * 4
    (data / "train.json").write_text(json.dumps(good))
    (data / "boolq").mkdir()
    (data / "boolq" / "test.json").write_text(json.dumps(good))
    run(cfg_for(root / "lora_out", adapter="lora", extra=[f"run_name={LORA_RUN}"]))  # PARA's input
    (root / "report.md").write_text(REPORT)
    return root


@pytest.fixture
def world(template, tmp_path):
    shutil.copytree(template, tmp_path / "w")
    return tmp_path / "w"
