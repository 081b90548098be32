"""One run under faults. A NaN loss stops the run and records nothing (or its steps are skipped, when asked, but
never all of them); a second configuration under one name is refused, and under its own name keeps both outputs; a
finished run re-run says so, and forced, starts afresh; an adapter saved and loaded keeps its settings, and the
atomic writers neither share a temporary name nor lose a folder in a swap; a run killed with -9 at random moments and
launched again ends at the uninterrupted run's metrics (slow); and the console shows progress, not internals.

    python -m pytest -q tests/guarantees/test_guarantees_runs.py
    python -m pytest -q -m slow tests/guarantees/test_guarantees_runs.py   # + kill -9, resumed
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from baselines import apply_adapter, load_adapted
from experiments.train import run
from lrlora import LRLoRAConfig, apply_lrlora, load_adapter, lrlora_modules, save_adapter
from lrlora._atomic import atomic_directory, atomic_file
from tests.guarantees.world import REPO, RUN, _nan_from_step, cfg_for, snapshot, tiny


# --- a NaN run -----------------------------------------------------------------------------------------------
def test_nan_loss_stops_the_run_and_records_nothing(tmp_path, monkeypatch):
    from lrlora.errors import NonFiniteError

    _nan_from_step(monkeypatch, 3)
    with pytest.raises(NonFiniteError, match=r"training loss is nan at step 3 of .*nothing was recorded\. Try a "
                                             r"lower learning rate .*trainer\.max_skipped_nonfinite=N"):
        run(cfg_for(tmp_path, extra=["trainer.max_steps=4", "trainer.save_every=2"]))
    run_dir = tmp_path / "runs" / RUN
    assert not (tmp_path / "results").exists(), "no results file for a diverged run"
    assert not (run_dir / "adapter").exists(), "no adapter saved from a diverged run"
    ckpt = json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text())
    assert ckpt["step"] == 2, "the last good checkpoint stays"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_nan_steps_can_be_skipped_when_asked(tmp_path, monkeypatch):
    _nan_from_step(monkeypatch, 2, 2)
    res = run(cfg_for(tmp_path, extra=["trainer.max_steps=4", "trainer.max_skipped_nonfinite=1"]))
    train = res["metrics"].get("train", res["metrics"])  # metrics.train.* once the protocol split lands
    assert train["steps"] == 4 and math.isfinite(train["final_train_loss"])
    json.loads((tmp_path / "results" / f"{RUN}.json").read_text(), parse_constant=lambda c: 1 / 0)  # strict


# --- two configurations under one name; a finished run re-run ---------------------------------------------------
def test_a_run_whose_every_step_was_skipped_is_an_error(tmp_path, monkeypatch):
    from lrlora.errors import NonFiniteError

    _nan_from_step(monkeypatch, 1)
    with pytest.raises(NonFiniteError, match="took no optimizer step that changed the weights"):
        run(cfg_for(tmp_path, extra=["trainer.max_steps=3", "trainer.max_skipped_nonfinite=5"]))
    assert not (tmp_path / "results").exists()


def test_two_configurations_under_one_name_keep_both_outputs(tmp_path):
    from experiments.guard import RunConflict

    first = run(cfg_for(tmp_path))
    before = snapshot(tmp_path)
    with pytest.raises(RunConflict):
        run(cfg_for(tmp_path, extra=["adapter.K=10"]))
    assert snapshot(tmp_path) == before
    second = run(cfg_for(tmp_path, extra=["adapter.K=10", f"run_name={RUN}__K10"]))  # its own name: both kept
    assert json.loads((tmp_path / "results" / f"{RUN}.json").read_text())["metrics"] == first["metrics"]
    assert second["config"]["adapter"]["K"] == 10 and (tmp_path / "runs" / f"{RUN}__K10" / "adapter").is_dir()


def test_rerunning_a_finished_run_says_done_and_force_retrains(tmp_path, capsys):
    first = run(cfg_for(tmp_path))
    before = snapshot(tmp_path)
    capsys.readouterr()
    again = run(cfg_for(tmp_path))
    assert "already done" in capsys.readouterr().out and again["metrics"] == first["metrics"]
    assert snapshot(tmp_path) == before
    (tmp_path / "runs" / RUN / "notes.txt").write_text("mine")  # a user's file in the run folder survives
    forced = run(cfg_for(tmp_path, extra=["trainer.force=true", "trainer.progress=true"]))
    assert forced["metrics"] == first["metrics"] and (tmp_path / "runs" / RUN / "notes.txt").read_text() == "mine"
    steps = [json.loads(r)["step"] for r in (tmp_path / "runs" / RUN / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "a forced restart starts metrics.jsonl afresh"


def test_load_adapter_restores_the_saved_layer_settings(tmp_path):
    """Onto a model that already has LR-LoRA layers with other center/pre/post scales, the saved ones win."""
    model, kw = tiny("lrlora")
    apply_lrlora(model, LRLoRAConfig(**{**kw, "center": True, "pre_scale": 2.0, "post_scale": 0.5}))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    ids = torch.randint(0, 100, (2, 8))
    model.eval()
    expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "a")
    other, _ = tiny("lrlora")
    apply_lrlora(other, LRLoRAConfig(**kw))  # center False, scales 1
    load_adapter(other, tmp_path / "a")
    other.eval()
    assert torch.equal(other(input_ids=ids).logits, expected)
    assert all(m.center and m.pre_scale == 2.0 and m.post_scale == 0.5 for m in lrlora_modules(other).values())


def test_save_into_our_folder_replaces_only_our_files(tmp_path):
    model, kw = tiny("lora")
    h = apply_adapter(model, name="lora", **kw)
    h.save(tmp_path / "a")
    (tmp_path / "a" / "README-mine.txt").write_text("keep me")
    weights = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    next(p for p in h.model.parameters() if p.requires_grad).data.add_(1.0)
    h.save(tmp_path / "a")
    assert (tmp_path / "a" / "README-mine.txt").read_text() == "keep me"
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != weights
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_a_crash_between_the_two_renames_of_a_swap_is_recovered(tmp_path):
    """The one window of a folder swap: the old folder renamed away, the new one not yet in place. The next
    read (or write) puts the folder back."""
    from lrlora._atomic import _hidden_temp

    model, kw = tiny("lora")
    h = apply_adapter(model, name="lora", **kw)
    h.save(tmp_path / "a")
    away = _hidden_temp(tmp_path / "a", "old")
    away.rmdir()
    (tmp_path / "a").rename(away)  # what the first rename does; the crash comes before the second
    load_adapted(tiny("lora")[0], tmp_path / "a")
    assert (tmp_path / "a" / "baselines_meta.json").is_file() and not away.exists()


def test_atomic_writers_never_share_a_temp_name(tmp_path):
    with atomic_file(tmp_path / "x.json") as a, atomic_file(tmp_path / "x.json") as b:
        assert a != b
        a.write_text("1")
        b.write_text("2")
    assert (tmp_path / "x.json").read_text() in ("1", "2")
    with atomic_directory(tmp_path / "d") as d1, atomic_directory(tmp_path / "e") as d2:
        assert d1 != d2


# --- kill -9 at random points, then the same command -------------------------------------------------------------
@pytest.mark.slow
def test_kill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    import random

    def cmd(root):
        return [sys.executable, "-m", "experiments.train", "backbone=tiny_encoder", "regime=bbc_news", "logger=none",
                "adapter.r=2", "trainer.max_steps=16", "trainer.save_every=1", "trainer.eval_every=4", "trainer.log_every=1",
                "trainer.progress=false", "trainer.num_threads=1", f"paths.root={root}", "regime.n_train=16",
                "regime.n_val=8", "regime.n_test=8", "regime.max_length=32", "regime.train.batch_size=8",
                "regime.adapter_dropout=0.1", f"run_name={RUN}"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd(tmp_path / "a"), check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
    duration = time.perf_counter() - t0  # start-up + 16 steps with 16 saves: kill somewhere inside that
    full = json.loads((tmp_path / "a" / "results" / f"{RUN}.json").read_text())
    rng, kills, mid_run = random.Random(0), 0, 0
    for _ in range(30):
        p = subprocess.Popen(cmd(tmp_path / "b"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.4, 0.95) * duration)
        if p.poll() is None:
            mid_run += (tmp_path / "b" / "runs" / RUN / "checkpoint").exists()  # killed after a checkpoint
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        if (tmp_path / "b" / "results" / f"{RUN}.json").exists():
            break
    out = subprocess.run(cmd(tmp_path / "b"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    resumed = json.loads((tmp_path / "b" / "results" / f"{RUN}.json").read_text())
    assert kills >= 1 and mid_run >= 1, (kills, mid_run)
    assert resumed["metrics"] == full["metrics"]
    rows = (tmp_path / "b" / "runs" / RUN / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(r)["step"] for r in rows if "train_loss" in r]
    assert steps == sorted(set(steps))


# --- the console: progress and results, not internals -----------------------------------------------------------
def test_checkpoint_saves_log_nothing_to_the_console(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    run(cfg_for(tmp_path, extra=["trainer.max_steps=2", "trainer.save_every=1"]))
    assert not [r for r in caplog.records if r.name.startswith("accelerate") and r.levelno < logging.WARNING]


def test_the_one_time_kernel_build_is_announced(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension as ext

    from lrlora import _kernels

    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose=False: str(tmp_path))
    _kernels._say_if_compiling("lrlora_x")
    assert "compiling the fused σ kernels for this CPU, once" in capsys.readouterr().out
    (tmp_path / "lrlora_x.so").write_bytes(b"")
    _kernels._say_if_compiling("lrlora_x")
    assert capsys.readouterr().out == ""
