"""analysis/: fixed results files (tests/fixtures/results, written by tests/fixtures/make_results.py) -> exact
table text (tests/fixtures/golden); missing runs show as missing; the t-test / Holm path against numbers
computed by hand; the paper's numbers are the paper's; bad input fails with one line.

Regenerate the golden files after an intended change: LRLORA_UPDATE_GOLDEN=1 pytest tests/test_analysis.py
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import build, load_results
from analysis.load import upgrade_legacy
from analysis.stats import holm, paired_ttest

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
TABLES = ["table1", "table1_tasks", "table2", "table3", "table4", "table5", "table8", "table9", "table12", "table13",
          "table20", "table23", "table24"]


@pytest.fixture(scope="module")
def df():
    return load_results([FIX / "results"])


@pytest.mark.parametrize("name", TABLES)
def test_golden_tables(df, name, tmp_path):
    table = build(name, df=df, out=tmp_path)
    golden = FIX / "golden" / f"{name}.md"
    if os.environ.get("LRLORA_UPDATE_GOLDEN"):
        golden.write_text(table.markdown())
    assert table.markdown() == golden.read_text()
    for ext in ("md", "csv", "tex"):
        assert (tmp_path / f"{name}.{ext}").stat().st_size > 0
    with (tmp_path / f"{name}.csv").open() as f:
        assert list(csv.reader(f))[0] == table.columns
    assert "\\begin{tabular}" in (tmp_path / f"{name}.tex").read_text()


def test_loader_flattens_by_the_contract(df):
    assert len(df) == 14
    lr = df[(df.method == "LR-LoRA") & (df.variant == "") & (df.backbone == "tiny_decoder")]
    assert sorted(lr.seed) == [42, 123, 456]
    assert lr.sort_values("seed")["metrics.commonsense_gen.tasks.boolq.accuracy"].round(2).tolist() == [0.45, 0.46, 0.5]
    assert set(df.variant) == {"", "K=25", "basis=gaussian"}
    assert (df[df.regime == "sst2"].score == 90.0).all()
    assert df[df.backbone == "tiny_decoder"].column.unique().tolist() == ["tiny_decoder, bbc_news_gen[n=16]"]


def test_missing_runs_show_as_missing(df, tmp_path):
    rows = {r[0]: r for r in build("table1", df=df, out=tmp_path).rows}
    assert rows["NoLA"][1] == "missing" and rows["RandLoRA"][1] == "missing"  # no run: kept, marked
    assert rows["VeRA"][1] == "42.00 ± 2.83 (n=2/3)"  # two of three seeds: says so
    assert rows["LR-LoRA"][2] == "55.88 ± 0.12"  # the paper's Table 1 beside ours
    empty = build("table1", df=df[df.method == "LoRA"], out=tmp_path)
    assert {r[0]: r[1] for r in empty.rows}["LR-LoRA"] == "missing"


def test_paired_ttest_and_holm_by_hand():
    # LR-LoRA - LoRA by seed: 5, 4, 6 points -> t = 5 / (1/sqrt 3); df = 2: p = 1 - t / sqrt(t^2 + 2)
    t, p = paired_ttest([55, 56, 60], [50, 52, 54])
    assert t == pytest.approx(5 * math.sqrt(3))
    assert p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert p == pytest.approx(0.013072, abs=1e-6)
    # Holm: sorted p 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(1*0.04, 0.06): 0.03, 0.06, 0.06
    reject, adj = holm([0.01, 0.04, 0.03, None])
    assert reject == [True, False, False, None]
    assert adj[:3] == pytest.approx([0.03, 0.06, 0.06]) and adj[3] is None
    assert paired_ttest([1, 2], [0, 1]) == (None, None)  # equal differences: t undefined, not a fake p


def test_table1_significance_is_holm_across_the_column(df, tmp_path):
    # VeRA vs LoRA by seed: -10, -8 -> t = -9 / (sqrt 2 / sqrt 2) = -9, df = 1, p = 0.0704; LR-LoRA p = 0.01307.
    # Holm over the two: 2 * 0.01307 = 0.026 (rejects), max(0.0704, 0.026) = 0.0704 (does not).
    t, p = paired_ttest([40, 44], [50, 52])
    assert t == pytest.approx(-9) and p == pytest.approx(2 * (0.5 - math.atan(9) / math.pi))
    rows = {r[0]: r for r in build("table1", df=df, out=tmp_path).rows}
    assert "*" in rows["LR-LoRA"][1] and "*" not in rows["VeRA"][1]


def test_paper_values_come_from_the_paper_text():
    text = (ROOT / "analysis" / "paper").glob("*.csv")
    paper = Path("/work/shared/seeds/lr-lora-paper.txt")
    if not paper.exists():
        pytest.skip("the paper's text is not on this machine")
    body = paper.read_text()
    for path in text:
        with path.open() as f:
            for r in csv.DictReader(f):
                assert r["mean"] in body, (path.name, r)
                if r["std"]:
                    assert (f"{r['mean']} {r['std']}" in body or f"{r['mean']} ± {r['std']}" in body), (path.name, r)


def test_legacy_flat_results_are_read_under_the_contract():
    legacy = {"run_name": "x", "backbone": "b", "adapter": "lora", "regime": "bbc_news_gen", "r": 4, "seed": 1,
              "config": {"regime": {"task": "causal_lm"}},
              "metrics": {"test_accuracy": 0.5, "test_strict_accuracy": 0.25, "test_per_task": {"bbc": 0.5},
                          "best_val_loss": 1.2, "best_step": 3, "final_train_loss": 1.0, "steps": 4,
                          "stopped_early": False}}
    m = upgrade_legacy(legacy)["metrics"]
    assert m["train"] == {"best_val": 1.2, "best_val_metric": "loss", "best_step": 3, "final_train_loss": 1.0,
                          "steps": 4, "stopped_early": False}
    assert m["commonsense_gen"] == {"accuracy": 0.5, "strict_accuracy": 0.25, "tasks": {"bbc": {"accuracy": 0.5}}}
    new = {**legacy, "metrics": {"train": {"steps": 1}}}
    assert upgrade_legacy(new) is new


def test_pair_regimes_score_the_task_accuracy_not_the_pairs():
    """bb_<task> option regimes train on (question, option) pairs; their headline is choice_accuracy (the share of
    questions whose best option is right), not pair accuracy (predicting 'wrong' everywhere gets 0.8 of pairs)."""
    from analysis.load import to_row

    d = {"run_name": "x", "backbone": "minilm_l6", "adapter": "lora", "regime": "bb_wikihow_goal", "r": 4, "seed": 42,
         "config": {"regime": {"task": "classification", "pairs": True}},
         "metrics": {"glue": {"accuracy": 0.8, "choice_accuracy": 0.25, "n": 1000}}}
    assert to_row(d)["score"] == 25.0
    d["metrics"]["glue"].pop("choice_accuracy")
    assert to_row(d)["score"] == 80.0   # a plain classification regime: its accuracy


@pytest.mark.parametrize("args,needle", [(["tableX"], "unknown target"),
                                         (["table1", "--results", "/nonexistent/folder"], "no such results folder")])
def test_cli_errors_are_one_line(args, needle):
    p = subprocess.run([sys.executable, "-m", "analysis", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: ")


def test_figures_from_results(df, tmp_path):
    for name in ("fig2", "fig_spectra", "fig_layer_ranks"):
        paths = build(name, df=df, out=tmp_path)
        assert [p.name for p in paths] == [f"{name}.png", f"{name}.pdf"], name
        assert all(p.stat().st_size > 1000 for p in paths)
    assert build("fig2", df=df.iloc[0:0], out=tmp_path / "empty") == []  # nothing to draw: nothing written


def test_sigma_snapshots_and_landscape_on_a_real_tiny_run(tmp_path, monkeypatch):
    """trainer.sigma_snapshots saves σ at the chosen steps (a callback passed to the loop); fig_sigma draws them;
    fig_landscape reloads the saved adapter onto its backbone."""
    from hydra import compose, initialize_config_dir

    from experiments.train import run
    from tests.test_naming import TINY

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.root={tmp_path}", "trainer.sigma_snapshots=[1,2]"])
    res = run(cfg)
    snap = json.loads((tmp_path / "runs" / res["run_name"] / "sigma_snapshots.json").read_text())
    assert sorted(snap["steps"]) == ["1", "2"] and len(snap["modules"]) == 14  # 2 layers x 7 projections
    assert snap["steps"]["1"] != snap["steps"]["2"]  # σ moved between the two steps
    frame = load_results([tmp_path / "results"])
    assert [p.name for p in build("fig_sigma", df=frame, out=tmp_path / "fig")] == ["fig_sigma.png", "fig_sigma.pdf"]
    paths = build("fig_landscape", run=tmp_path / "runs" / res["run_name"], out=tmp_path / "fig", examples=4,
                  points=3)
    assert paths[0].stat().st_size > 1000
    surface = json.loads((tmp_path / "fig" / f"fig_landscape__{res['run_name']}.json").read_text())["surface"]
    assert len(surface) == 3 and all(math.isfinite(v) for row in surface for v in row)


def test_para_table_from_its_results_files(tmp_path):
    """scripts/para_bbc.py writes ordinary results files; docs/methods.md's PARA table is built from them."""
    rows = {(r[0], r[1]): r for r in build("para", results=[ROOT / "benchmarks" / "results" / "para_bbc"],
                                           out=tmp_path).rows}
    assert rows[("LoRA (r=8, seed 0)", "none")][2:5] == ["95.2", "—", "331,776"]
    assert rows[("LoRA (r=8, seed 0)", "keep-energy 0.80")][2:] == ["95.2", "+0.0", "59,520", "82.1%", "0.804"]
    assert rows[("LoRA (r=8, seed 0)", "reduction 0.90")][2:5] == ["88.8", "-6.4", "33,024"]
    assert rows[("LR-LoRA (r=8, seed 0)", "reduction 0.90")][2:5] == ["86.0", "-6.8", "32,640"]
    assert len(rows) == 16


def test_wandb_grouping_follows_the_tables():
    from hydra import compose, initialize_config_dir

    from experiments.tracking import flat_config, wandb_grouping

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["backbone=tiny_decoder", "regime=bbc_news_gen", "adapter.center=true",
                                          "tags=[table3]"])
    group, job_type, tags = wandb_grouping(cfg)
    assert (group, job_type) == ("table3", "lrlora")
    assert tags == ["table3", "row:lrlora-r16", "center=true"]
    assert flat_config({"adapter": {"r": 4, "K": 50}, "seed": 1}) == {"adapter.r": 4, "adapter.K": 50, "seed": 1}
