"""`make reproduce-table1` (analysis.reproduce): the grid of analysis/scales.yaml, exactly the missing or stale
runs trained, then the table built from the results files; a second call trains nothing; a results file from
another commit or config is stale. The whole smoke scale end to end is a slow test."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from analysis.reproduce import ReproduceError, main, plan, sweep_grid
from lrlora import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_grids():
    assert len(plan("table1", "smoke")) == 9 * 2 * 3      # nine methods x two columns x three seeds
    assert len(plan("table1", "paper")) == 9 * 6 * 3      # three backbones x two regimes
    assert len(sweep_grid("table3")) == 3 * 2 * 2           # Hydra's product of the sweep's params
    assert len(plan("table3", "smoke")) == (12 + 1) * 2 * 3  # + the LoRA baseline
    assert len(plan("table12", "smoke")) == 2 * 4 * 2 * 3   # smoke ranks 2..16 (the tiny k_proj is 16 wide)
    assert all("tags=[table13]" in c.overrides for c in plan("table13", "smoke"))  # analysis/W&B find them
    with pytest.raises(ReproduceError, match="unknown scale"):
        plan("table1", "huge")
    with pytest.raises(ReproduceError, match="no grid for"):
        plan("fig2", "smoke")


def test_make_target_runs_the_reproduce_command():
    out = subprocess.run(["make", "-n", "reproduce-table1", "SCALE=smoke", "OUTPUTS=/tmp/x"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    assert "-m analysis.reproduce table1 --scale smoke --root /tmp/x" in out


def _results(root):
    return sorted((root / "results").glob("*.json"))


@pytest.fixture
def pinned_commit(monkeypatch):
    """The checkout's commit, pinned: a copy without .git (a source archive) has none (git_info() gives None,
    and then no results file can be stale by commit), so the staleness test would not run there. Every module
    that imported git_info sees the same fixed commit, the runs' results files and the staleness check alike."""
    import sys

    import experiments.results
    import experiments.train  # noqa: F401  (bind its git_info before the swap below reaches it)

    commit = "c0ffee" + "0" * 34
    real = experiments.results.git_info
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("experiments", "analysis") and getattr(module, "git_info", None) is real:
            monkeypatch.setattr(module, "git_info", lambda: {"commit": commit, "dirty": False})
    return commit


def test_reproduce_runs_only_what_is_missing_or_stale(tmp_path, capsys, pinned_commit):
    args = ["table1", "--scale", "smoke", "--root", str(tmp_path), "--seeds", "42", "--variants", "LoRA", "LR-LoRA"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 to run" in out and len(_results(tmp_path)) == 4
    table = (tmp_path / "analysis" / "smoke" / "table1.md").read_text()
    assert re.search(r"\| LoRA \| \d+\.\d\d \(n=1/3\) \| 52\.34 ± 0\.14 \|", table), table  # one seed of three
    assert "| NoLA | missing |" in table                        # not in this partial grid: shown, not dropped
    mtimes = [p.stat().st_mtime for p in _results(tmp_path)]
    assert main(args) == 0
    assert "0 to run (4 current)" in capsys.readouterr().out
    assert [p.stat().st_mtime for p in _results(tmp_path)] == mtimes
    # a results file from another commit is stale, and only it runs again
    path = _results(tmp_path)[0]
    d = json.loads(path.read_text())
    d["git"]["commit"] = "f" * 40
    path.write_text(json.dumps(d))
    time.sleep(0.01)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 to run" in out and f"written by commit ffffffff, now {pinned_commit[:8]}" in out
    assert json.loads(path.read_text())["git"]["commit"] == pinned_commit
    # ... and so is one written from another config under the same name (e.g. a changed YAML default); that
    # one is another configuration's output, so it is reported and refused, never overwritten (experiments/guard)
    d = json.loads(path.read_text())
    d["config"]["regime"]["n_val"] = 99
    path.write_text(json.dumps(d))
    before = path.read_bytes()
    assert cli.call(main, args) == 2  # as python -m analysis.reproduce runs main (the CLI helper)
    captured = capsys.readouterr()
    assert "1 to run" in captured.out and "written from another config (regime.n_val)" in captured.out
    assert "holds the results of another configuration; nothing was changed" in captured.err
    assert path.read_bytes() == before


@pytest.mark.slow
def test_reproduce_table1_smoke_end_to_end(tmp_path, capsys):
    """= make reproduce-table1 SCALE=smoke: 54 runs of tiny random models, then Table 1 (a few minutes)."""
    t0 = time.perf_counter()
    assert main(["table1", "--scale", "smoke", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert len(_results(tmp_path)) == 54 and "| missing" not in out.split("**Table 1")[1]  # every cell ran
    assert "| LR-LoRA |" in out and "55.88 ± 0.12" in out and "61.05 ± 0.09" in out
    print(f"smoke Table 1: {time.perf_counter() - t0:.0f} s")
    # the notebooks run on these smoke results too
    from tests.test_notebooks import NOTEBOOKS, execute

    for nb in NOTEBOOKS:
        cells = execute(nb, str(tmp_path / "results"), tmp_path / "nb").cells
        assert not [o for c in cells if c.cell_type == "code" for o in c.get("outputs", [])
                    if o.get("output_type") == "error"], nb.name


def test_reproduction_grid_is_the_claims_grid(tmp_path, capsys):
    """`make reproduction`: every step of scales.yaml's `reproduction:` composes; shared cells count once; a
    dry run lists the cells still to run and trains nothing."""
    from analysis.reproduce import reproduction_plan, run_reproduction

    steps = reproduction_plan()
    claims = {step["claim"] for step, _ in steps}
    assert claims == {"1a", "1b", "2", "3", "4", "5", "7", "8"}
    assert all(any(o.startswith("backbone=") for o in c.overrides) for _, c in steps)
    assert run_reproduction(str(tmp_path), dry_run=True) == 0
    out = capsys.readouterr().out
    n = int(re.search(r"(\d+) runs in the grid, (\d+) to run", out).group(1))
    assert n < len(steps)                                     # LoRA/LR-LoRA r=4 seed 42 serve claims 1b, 2, 3 ...
    assert f"{n} to run (0 done)" in out and not (tmp_path / "results").exists()
    assert out.count("python -m experiments.train ") == n
    with pytest.raises(ReproduceError, match="no column"):
        plan("repro_methods", "repro_minilm", columns=["bb_no_such_task"])


def test_reproduction_para_steps_wait_for_their_runs_then_list_para(tmp_path, capsys):
    """Claim 7's steps train nothing: each LoRA cell's PARA settings wait for its run; once the run's results file
    exists, a dry run lists `python -m experiments.para` at each setting (and shards deal them out)."""
    from omegaconf import OmegaConf

    from analysis.reproduce import compose, para_settings, reproduction_plan, run_reproduction

    para = [(step, cell) for step, cell in reproduction_plan() if step.get("para")]
    assert {step["claim"] for step, _ in para} == {"7"} and len(para) == 3 + 1  # r=4 x 3 seeds, r=16 seed 42
    assert para_settings(para[0][0]) == [(0.9, None), (None, 0.75), (None, 0.9)]
    run_reproduction(str(tmp_path), dry_run=True)
    out = capsys.readouterr().out
    assert "12 PARA runs in the grid, 12 to run (12 of them waiting for their run; 0 done)" in out
    assert "python -m experiments.para" not in out and out.count(": waiting for ") == 12

    cfg = compose(para[0][1].overrides, str(tmp_path))  # LoRA r=4 seed 42 has trained (a results file)
    (tmp_path / "results").mkdir()
    config = OmegaConf.to_container(cfg, resolve=True)
    (tmp_path / "results" / f"{cfg.run_name}.json").write_text(json.dumps({"run_name": cfg.run_name,
                                                                           "seed": cfg.seed, "config": config}))
    run_reproduction(str(tmp_path), dry_run=True)
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith("python -m experiments.para")]
    assert listed == [f"python -m experiments.para run={cfg.run_name} {s} paths.root={tmp_path}"
                      for s in ("para.keep_energy=0.9", "para.reduction=0.75", "para.reduction=0.9")]
    assert out.count(f"# {cfg.run_name}'s run folder is gone: it is re-trained into") == 1  # a fresh machine
    (tmp_path / "results" / f"{cfg.run_name}__para-red0.75.json").write_text("{}")  # that setting is done
    shards = []
    for i in (0, 1):  # shards deal out source runs, each with all its settings: one process restores a source
        run_reproduction(str(tmp_path), dry_run=True, shard=(i, 2))
        out = capsys.readouterr().out
        assert "12 PARA runs in the grid, 11 to run (9 of them waiting for their run; 1 done)" in out
        shards.append([line.split()[-2] for line in out.splitlines()
                       if line.startswith("python -m experiments.para")])
    assert shards == [["para.keep_energy=0.9", "para.reduction=0.9"], []]
    with pytest.raises(ReproduceError, match="para entry 'keep=0.9'"):
        para_settings({"claim": "7", "para": ["keep=0.9"]})
    with pytest.raises(ReproduceError, match="reduction must be in"):
        para_settings({"claim": "7", "para": ["reduction=1.5"]})


def test_a_para_source_whose_run_folder_is_gone_is_retrained_and_put_back_only_if_it_reproduces(tmp_path, capsys):
    """A fresh machine has a grid's results files but not its run folders (runs/ is not committed): PARA needs the
    source's adapter, so the runner re-trains the source into runs/_restore/ and moves the folder into place only if
    the re-trained scores, ranks and mechanism equal the committed ones; a run that does not reproduce is refused."""
    import shutil

    from analysis.reproduce import compose, plan
    from analysis.restore import RestoreError, restore_source
    from experiments.train import run

    cell = plan("table1", "smoke", [42], ["LoRA"])[0]
    cfg = compose(cell.overrides, str(tmp_path))
    run(cfg)
    folder = tmp_path / "runs" / cfg.run_name
    committed = json.loads((tmp_path / "results" / f"{cfg.run_name}.json").read_text())
    assert restore_source(cfg, cell.overrides) is False  # its folder is here: nothing to do
    shutil.rmtree(folder)
    assert restore_source(cfg, cell.overrides) is True
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    again = json.loads((folder / "restored.json").read_text())
    assert again["metrics"] == committed["metrics"] and again["stable_ranks"] == committed["stable_ranks"]
    assert not any((tmp_path / "runs" / "_restore" / "runs").iterdir())  # moved, not copied
    assert "its run folder is back" in capsys.readouterr().out

    # a committed score the re-trained run does not give: refused, and no folder appears
    committed["metrics"]["train"]["best_val"] += 0.01
    (tmp_path / "results" / f"{cfg.run_name}.json").write_text(json.dumps(committed))
    shutil.rmtree(folder)
    with pytest.raises(RestoreError, match=r"does not reproduce its committed results \(1 field\(s\) differ: "
                                             r"metrics.train.best_val;"):
        restore_source(cfg, cell.overrides)
    assert not folder.exists()
    (folder / "checkpoint").mkdir(parents=True)  # a folder without its adapter is not replaced
    with pytest.raises(RestoreError, match="exists without an adapter"):
        restore_source(cfg, cell.overrides)


def test_a_re_trained_run_agrees_with_its_results_file_to_float_rounding():
    """What restore_source compares: real numbers to float rounding (an SVD on another CPU differs at 1e-7), counts
    and the checkpoint's validation score exactly, a test accuracy to two questions in 2,000 (a near-tie can flip)."""
    from analysis.restore import differences, reproduced, score_changes

    committed = {"metrics": {"glue": {"loss": 0.554235221862793, "choice_accuracy": 0.427, "n": 8000},
                             "train": {"best_val": 0.49}},
                 "stable_ranks": {"all": {"mean": 1.444368173678716}, "spectrum": [0.5594903, 8.5e-07, 1.1e-08]},
                 "mechanism": {"energy_beyond_r": 1.51e-15}, "protocols": {"glue": {"settings": {"b": 8}, "at": "x"}}}
    again = json.loads(json.dumps(committed))
    again["metrics"]["glue"]["loss"] = 0.5542352268695832
    # a rank-4 ΔW's values beyond the fourth are float32 rounding: 8.5e-7 against 2.2e-6 on two CPUs
    again["stable_ranks"] = {"all": {"mean": 1.4443681902355618}, "spectrum": [0.5594907, 2.15e-06, 1.4e-08]}
    again["mechanism"]["energy_beyond_r"] = 1.49e-15
    again["protocols"]["glue"]["at"] = "y"  # when it ran is not the result
    assert differences(reproduced(committed), reproduced(again)) == []
    # one question of 2,000 whose options tie to rounding: scored on another CPU, said, not refused
    again["metrics"]["glue"]["choice_accuracy"] = 0.4275
    assert differences(reproduced(committed), reproduced(again)) == []
    assert score_changes(reproduced(again), reproduced(committed)) == [("metrics.glue.choice_accuracy", 0.4275, 0.427)]
    again["metrics"]["glue"]["choice_accuracy"] = 0.429   # four questions: another adapter
    again["metrics"]["train"]["best_val"] = 0.49 + 1 / 300  # the checkpoint's validation score: exactly
    again["stable_ranks"]["all"]["mean"] = 1.4444
    again["protocols"]["glue"]["settings"]["b"] = 16
    assert differences(reproduced(committed), reproduced(again)) == [
        "metrics.glue.choice_accuracy", "metrics.train.best_val", "protocols.glue.b", "stable_ranks.all.mean"]


def test_reproduction_shards_split_the_grid_without_overlap(tmp_path, capsys):
    """`--shard 1/2` and `--shard 2/2` together list every missing cell exactly once; a bad shard is an error."""
    from analysis.reproduce import parse_shard, run_reproduction

    def listed(shard):
        run_reproduction(str(tmp_path), dry_run=True, shard=shard)
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("python -m ")]

    whole, first, second = listed((0, 1)), listed((0, 2)), listed((1, 2))
    assert first and second and not set(first) & set(second)
    assert sorted(first + second) == sorted(whole)
    assert parse_shard("2/3") == (1, 3)
    for bad in ("0/2", "3/2", "x", "1-2"):
        with pytest.raises(ReproduceError, match="--shard"):
            parse_shard(bad)


def test_reproduction_claims_filter(tmp_path, capsys):
    """`--claims 7` lists only claim 7's steps (PARA jobs, which train nothing); an unknown claim is an error."""
    assert main(["reproduction", "--root", str(tmp_path), "--claims", "7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0 runs in the grid" in out and "python -m experiments.train" not in out
    assert "PARA runs in the grid" in out
    assert cli.call(main, ["reproduction", "--root", str(tmp_path), "--claims", "9"]) == 2
    assert "error: no step of the grid is for claim(s) ['9']" in capsys.readouterr().err


def test_the_grid_runner_runs_each_cell_once_skips_held_ones_and_unlocks_waiting_steps(tmp_path, monkeypatch, capsys):
    """The runner (not dry): a cell another process holds (Busy) is skipped, a failing cell is reported and not
    retried, every other cell runs once; in round 2 a step waiting on a selection runs as soon as the selection
    file holds its value (here written by the fake run, standing in for the pilot's rule)."""
    from omegaconf import OmegaConf

    import experiments.train
    from analysis import selection
    from analysis.reproduce import run_reproduction
    from lrlora._atomic import Busy
    from lrlora.errors import ConfigError

    calls = []

    def fake_run(cfg):
        calls.append(cfg.run_name)
        if "s123" in cfg.run_name:
            raise Busy("held by another process")
        if "s456" in cfg.run_name:
            raise ConfigError("a bad cell")
        out = Path(cfg.paths.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{cfg.run_name}.json").write_text(json.dumps(
            {"run_name": cfg.run_name, "seed": cfg.seed, "config": OmegaConf.to_container(cfg, resolve=True)}))

    monkeypatch.setattr(experiments.train, "run", fake_run)
    assert run_reproduction(str(tmp_path), dry_run=False, claims=["8"]) == 1  # the failing cell
    assert len(calls) == len(set(calls)) and sum("s456" in c for c in calls) == 2  # both forms' seed 456, once
    done = {p.stem for p in (tmp_path / "results").glob("*.json")}
    assert done == {c for c in calls if "s42" in c} and done
    captured = capsys.readouterr()
    assert "a bad cell" in captured.err
    # each cell run says how many are left and a rough time for them (its median cell so far, over the shards)
    assert re.search(r"\[reproduction\] \d+ to go: claim 8: \S+ \(\d+\.\d s; about \d+\.\d h left at this "
                     r"process's median cell over 1 shard\(s\)\)", captured.out)

    # round 2: SmolLM2 LoRA's rate selection runs at once; the pilot waits for nothing; a step on @task_a waits
    # until the (fake) selection chooses it, then runs in the same call
    calls.clear()
    state = {"n": 0}

    def fake_update(rules, root, write=True):
        state["n"] += 1
        return ({"head": "cls", "task_a": "cs_piqa"} if len(calls) >= 2 else {}), {}

    monkeypatch.setattr(selection, "update", fake_update)
    monkeypatch.setattr("analysis.reproduce.reproduction_plan", _first_cells_of(monkeypatch))
    run_reproduction(str(tmp_path / "r2"), dry_run=False, grid="reproduction2")
    assert state["n"] >= 3 and len(calls) == len(set(calls)) == 2 + 3  # two pilot cells, then the unlocked three
    assert sum("cs_piqa" in c and "pre_scale" in c for c in calls) == 3


def _first_cells_of(monkeypatch):
    """reproduction_plan cut to two pilot cells and the engage pilot's, so the test trains (fakes) a handful."""
    from analysis import reproduce

    real = reproduce.reproduction_plan

    def plan(claims=None, grid="reproduction", chosen=None, waiting=None):
        cells = real(claims, grid, chosen, waiting)
        pilot = [c for c in cells if c[0]["claim"] == "pilot" and "adapter=lora" in c[1].overrides][:2]
        return pilot + [c for c in cells if c[0]["claim"] == "pilot" and "adapter=lrlora" in c[1].overrides]
    return plan
