"""Nothing lost, nothing false, nothing left behind. A copied outputs folder is re-scored and compressed in the
copy alone; a run is scored only on the data it was trained on, every test example counted; one run in two results
files counts once; `--out` and `analysis.report` replace only what they wrote; `make clean` removes only what the
harness wrote, by its marks; a run that fails leaves no run folder until it has a checkpoint, none leaves a lock
file, and a second launch of a running run is refused; a printed run name works as printed; refused settings never
load the backbone; and a PEFT-format adapter loads without `lrlora.peft` imported first.

    python -m pytest -q tests/guarantees/test_guarantees_files.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.train import run
from lrlora import cli
from lrlora._atomic import exclusive_lock, lock_file
from lrlora.errors import UserError
from tests.guarantees.world import (
    AN,
    BLOCK,
    EV,
    LORA_RUN,
    NEW,
    REPO,
    RUN,
    _edit_json,
    _nan_from_step,
    argv_in,
    call_entry,
    cfg_for,
    snapshot,
)
from tests.test_harness import cfg_for as _harness_cfg


# --- nothing lost: a copied outputs folder is re-scored and compressed in the copy alone ----------------------
def _tree(world: Path, top: str) -> dict:
    return {k: v for k, v in snapshot(world).items() if k == top or k.startswith(top + "/")}


def test_rescoring_and_compressing_a_copy_write_only_into_the_copy(world, capsys):
    """`run=COPY/runs/X` and `paths.root=COPY`: the copy's results file, run folder and PARA run change; the
    original not by a byte, also when the copy's results files record the original's absolute paths (as results
    files did before paths were relative to their root); and a copy stands alone (its original moved away)."""
    shutil.copytree(world / "out", world / "copy")
    shutil.copytree(world / "lora_out", world / "lora_copy")
    _edit_json(f"copy/results/{RUN}.json",
               lambda d: d.update(adapter_dir=str(world / "out" / "runs" / RUN / "adapter")))(world)
    _edit_json(f"lora_copy/results/{LORA_RUN}.json",
               lambda d: d.update(adapter_dir=str(world / "lora_out" / "runs" / LORA_RUN / "adapter")))(world)
    originals = {top: _tree(world, top) for top in ("out", "lora_out")}
    assert call_entry("experiments.para", [f"run={LORA_RUN}", f"paths.root={world / 'lora_copy'}",
                                           "para.keep_energy=0.9"]) == 0
    assert call_entry("experiments.evaluate", [f"run={world / 'copy' / 'runs' / RUN}", "protocol=glue"]) == 0
    assert {top: _tree(world, top) for top in originals} == originals, "the original outputs folder changed"
    (world / "out").rename(world / "moved")  # the original gone: the copy is re-scored from itself
    assert call_entry("experiments.evaluate", [f"run={RUN}", f"paths.root={world / 'copy'}", "protocol=glue"]) == 0
    rescored = json.loads((world / "copy" / "results" / f"{RUN}.json").read_text())
    assert rescored["protocols"]["glue"]["by"] == "experiments.evaluate"
    para = json.loads((world / "lora_copy" / "results" / f"{LORA_RUN}__para-keep0.90.json").read_text())
    assert para["adapter_dir"] == f"runs/{LORA_RUN}__para-keep0.90/adapter"  # relative to its root
    assert (world / "lora_copy" / para["adapter_dir"] / "adapter_model.safetensors").is_file()
    assert para["source"]["adapter_dir"] == f"runs/{LORA_RUN}/adapter"
    assert para["source"]["results_file"] == f"results/{LORA_RUN}.json"


def test_results_files_record_paths_relative_to_their_root(template):
    d = json.loads((template / "out" / "results" / f"{RUN}.json").read_text())
    assert d["adapter_dir"] == f"runs/{RUN}/adapter" and len(d["data_fingerprint"]) == 64


# --- nothing false: the data a run is scored on, every test example ---------------------------------------------
def _commonsense_cfg(root: Path, data: Path, extra=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "backbone=tiny_decoder", "regime=commonsense_15k", "adapter=lora", "adapter.r=2", "logger=none",
            "trainer.max_steps=1", "trainer.progress=false", "trainer.num_threads=1", f"paths.root={root}",
            f"regime.data_path={data / 'train.json'}", f"regime.eval_dir={data}", "regime.eval_tasks=[boolq]",
            "regime.n_val=1", "regime.train.batch_size=2", "regime.max_length=48", "eval.protocols=[glue]",
            *extra])


def test_evaluate_scores_only_the_data_the_run_was_trained_on(tmp_path, capsys):
    """Test data changed after training is refused (not scored under the run's old identity); the same data
    scores; a test example whose answer is empty is an error, never left out of `n`."""
    data = tmp_path / "data"
    (data / "boolq").mkdir(parents=True)
    rows = [{"instruction": f"Is {i} even?", "input": "", "output": f"the correct answer is {'true' if i % 2 else 'false'}",
             "answer": "true" if i % 2 else "false"} for i in range(6)]
    (data / "train.json").write_text(json.dumps(rows))
    (data / "boolq" / "test.json").write_text(json.dumps(rows[:4]))
    res = run(_commonsense_cfg(tmp_path / "out", data, ["eval.protocols=[]"]))
    results = tmp_path / "out" / "results" / f"{res['run_name']}.json"
    args = [f"run={tmp_path / 'out' / 'runs' / res['run_name']}", "protocol=commonsense_gen", "protocol.limit=2",
            "protocol.max_new_tokens=2", "protocol.num_beams=1"]
    assert call_entry("experiments.evaluate", args) == 0
    scored = json.loads(results.read_text())
    assert scored["metrics"]["commonsense_gen"]["n"] == 2
    (data / "boolq" / "test.json").write_text(json.dumps(rows[1:5]))  # the test set changed after training
    before = results.read_bytes()
    capsys.readouterr()
    assert call_entry("experiments.evaluate", args) == 2
    assert re.match(r"error: the data of regime commonsense_15k .* is not the data run .* was trained and tested on",
                    capsys.readouterr().err)
    assert results.read_bytes() == before
    (data / "boolq" / "test.json").write_text(json.dumps([rows[0], {**rows[1], "answer": ""}, *rows[2:4]]))
    assert call_entry("experiments.evaluate", args) == 2
    assert "test example 1 of regime commonsense_15k has an empty 'answer'" in capsys.readouterr().err
    assert results.read_bytes() == before


def test_the_generation_protocol_never_scores_a_quiet_subset():
    """Called directly (an EvalContext built by hand), an example without its answer is an error, not dropped."""
    from omegaconf import OmegaConf

    from experiments.protocols import EvalContext, ProtocolError
    from experiments.protocols.commonsense_gen import commonsense_gen

    regime = OmegaConf.create({"task": "causal_lm", "name": "x"})
    ctx = EvalContext(model=None, processor=None, regime=regime,
                      test=[{"prompt": "p", "answer": "true", "task": "boolq"}, {"prompt": "p", "answer": "", "task": "boolq"}])
    with pytest.raises(ProtocolError, match="test example 1 has no answer"):
        commonsense_gen(ctx, OmegaConf.create({"limit": None}))


def test_two_copies_of_one_results_file_count_once(world):
    """The same run in two folders with the same numbers is one run; with other numbers, an error (the table)."""
    from analysis.load import load_results

    (world / "dup").mkdir()
    shutil.copy(world / "out" / "results" / f"{RUN}.json", world / "dup")
    df = load_results([world / "out" / "results", world / "dup"])
    assert list(df["run_name"]).count(RUN) == 1


def test_out_replaces_only_the_files_analysis_wrote_there(world, capsys):
    """A second build into the same --out replaces its own files; a user's file beside them stays."""
    (world / "tables").mkdir()
    (world / "tables" / "mine.md").write_text("mine\n")
    argv = argv_in(world, ["table1", *AN])
    assert call_entry("analysis", argv) == 0
    first = (world / "tables" / "table1.md").read_text()
    assert call_entry("analysis", argv) == 0
    assert (world / "tables" / "table1.md").read_text() == first
    assert (world / "tables" / "mine.md").read_text() == "mine\n"


def test_report_rebuilds_blocks_and_nothing_outside_them(world):
    """Prose before, between and after blocks stays byte for byte; only the block body is rebuilt."""
    doc = world / "report.md"
    prose = "# Notes\n\nMy words <!-- a comment of mine -->, and `<!-- analysis: x -->` quoted.\n\n"
    doc.write_text(prose + BLOCK + "<!-- /analysis -->\n\nMiddle words.\n\n" + BLOCK + "<!-- /analysis -->\nEnd.\n")
    assert call_entry("analysis.report", [str(doc), "--results", str(world / "out" / "results")]) == 0
    text = doc.read_text()
    assert text.startswith(prose + "<!-- analysis: table1 -->\n") and text.endswith("<!-- /analysis -->\nEnd.\n")
    assert "\n<!-- /analysis -->\n\nMiddle words.\n\n<!-- analysis: table1 -->\n" in text and "old table" not in text


# --- make clean: only what the harness wrote, by its marks ------------------------------------------------------
def test_clean_removes_only_what_the_harness_wrote(world, capsys):
    """Run folders, results files, PARA runs and analysis tables go; a user's notes in outputs/ (in a run folder
    too), a table the user edited, and a top-level runs/ the harness never writes stay."""
    out = world / "out"
    assert call_entry("experiments.para", [f"run={LORA_RUN}", f"paths.root={world / 'lora_out'}",
                                           "para.keep_energy=0.9"]) == 0
    shutil.copytree(world / "lora_out" / "runs", out / "runs", dirs_exist_ok=True)
    shutil.copytree(world / "lora_out" / "results", out / "results", dirs_exist_ok=True)
    assert call_entry("analysis", ["table1", "--results", str(out / "results"), "--out", str(out / "analysis")]) == 0
    (out / "analysis" / "table1.csv").write_text("edited by me\n")
    (out / "notes.txt").write_text("mine\n")
    (out / "runs" / RUN / "mine.txt").write_text("mine\n")
    (out / "results" / "mine.json").write_text('{"not": "a results file"}')
    (world / "runs").mkdir()
    (world / "runs" / "keep.txt").write_text("a top-level runs/ of mine\n")
    assert call_entry("experiments.clean", ["--root", str(out)]) == 0
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["analysis/.lrlora-files", "analysis/table1.csv", "notes.txt", "results/mine.json",
                    f"runs/{RUN}/mine.txt"], left
    assert (world / "runs" / "keep.txt").is_file()
    recipe = subprocess.run(["make", "-n", "clean", f"OUTPUTS={out}"], capture_output=True, text=True, cwd=REPO).stdout
    assert "experiments.clean" in recipe and not re.search(r"rm -rf[^\n]*\b(outputs|runs|multirun)\b", recipe)


# --- leftovers: failed runs, locks ------------------------------------------------------------------------------
def _nan_in_validation(monkeypatch):
    import experiments.train as train_mod

    real = train_mod.build_backbone

    def build(*a, **k):
        model, proc = real(*a, **k)
        forward = model.forward

        def nan_forward(*fa, **fk):
            out = forward(*fa, **fk)
            if not model.training:
                out.loss = out.loss * float("nan")
            return out

        model.forward = nan_forward
        return model, proc

    monkeypatch.setattr(train_mod, "build_backbone", build)


def test_a_nan_validation_loss_is_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    _nan_in_validation(monkeypatch)
    cfg = cfg_for(tmp_path / "out", extra=["trainer.max_steps=2"])
    assert cli.call(run, cfg) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: validation loss is not finite at step 2 of .*: the model diverged "
                                        r"and nothing was recorded; try a lower regime\.train\.lr", lines[0]), lines
    assert not (tmp_path / "out").exists(), "a run that failed before its first checkpoint leaves nothing"


def test_a_crash_inside_training_keeps_its_traceback_and_leaves_no_run_folder(tmp_path, monkeypatch):
    import experiments.train as train_mod

    def crash(*a, **k):
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(train_mod, "train", crash)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        cli.call(run, cfg_for(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_run_stopped_after_a_checkpoint_keeps_it(tmp_path, monkeypatch):
    """What a failed run leaves is exactly what a resume needs: its folder, once a checkpoint exists."""
    _nan_from_step(monkeypatch, 3)
    with pytest.raises(UserError):
        run(cfg_for(tmp_path, extra=["trainer.max_steps=4", "trainer.save_every=2"]))
    assert (tmp_path / "runs" / RUN / "checkpoint" / "checkpoint.json").is_file()


def test_evaluate_and_train_leave_no_lock_file(world):
    assert call_entry("experiments.evaluate", [f"run={world / 'out' / 'runs' / RUN}", "protocol=glue"]) == 0
    results = world / "out" / "results" / f"{RUN}.json"
    assert not lock_file(results).exists() and not list(world.rglob("*.lock"))
    assert not lock_file(world / "out" / "runs" / RUN).exists()


def test_a_second_launch_of_a_running_run_is_refused_as_a_process(tmp_path):
    """While one process holds a run (here: this test, as the first launch would), `python -m experiments.train`
    of the same run is one line and exit 2, writing nothing; once it is released, the lock file is gone."""
    argv = [sys.executable, "-m", "experiments.train", "backbone=tiny_encoder", "logger=none", "adapter.r=2",
            "trainer.max_steps=2", "trainer.progress=false", f"paths.root={tmp_path}", f"run_name={RUN}"]
    with exclusive_lock(tmp_path / "runs" / RUN, wait=False):
        p = subprocess.run(argv, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                           timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert re.match(rf"error: run {RUN} is already running in another process \(process {os.getpid()}\); wait",
                    lines[0]), lines
    assert not any(tmp_path.iterdir()) and not lock_file(tmp_path / "runs" / RUN).exists()


def test_a_printed_run_name_works_as_printed(tmp_path, capsys):
    """Run names carry their settings (`__center=true`): passed back as `run=NAME` they parse."""
    res = run(_harness_cfg(tmp_path, "tiny_encoder", "lrlora", ["adapter.center=true"]))
    assert "center=true" in res["run_name"] and f"[{res['run_name']}]" in capsys.readouterr().out
    p = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"run={res['run_name']}",
                        f"paths.root={tmp_path}", "protocol=glue"], capture_output=True, text=True, cwd=REPO,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0 and f"[{res['run_name']}] glue:" in p.stdout, p.stderr


def test_refused_settings_never_load_the_backbone(world, monkeypatch):
    """A protocol that does not fit, an impossible setting: refused before minutes of backbone loading."""
    import experiments.evaluate as evaluate_mod
    import experiments.train as train_mod

    def no(*a, **k):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(train_mod, "build_backbone", no)
    monkeypatch.setattr(evaluate_mod, "build_backbone", no)
    assert call_entry("experiments.train", argv_in(world, ["eval.protocols=[vision]", *NEW])) == 2
    assert call_entry("experiments.evaluate", argv_in(world, [EV[0], "protocol=vision"])) == 2
    assert call_entry("experiments.evaluate", argv_in(world, [*EV, "batch_size=-1"])) == 2


def test_a_peft_folder_loads_without_importing_lrlora_peft_first(template):
    """An LR-LoRA adapter in PEFT's format (what a run saves), read by this repository's loader in a fresh process
    that never imported lrlora.peft: the loader registers the method itself."""
    code = ("import sys; from baselines import load_adapted; from tests.guarantees.world import tiny; "
            "assert 'lrlora.peft' not in sys.modules; "
            f"h = load_adapted(tiny('lrlora')[0], {str(template / 'lrlora_run_adapter')!r}); print(h.name)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0 and p.stdout.strip().endswith("lrlora"), p.stderr
