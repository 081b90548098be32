"""The reports' tables (REPRODUCTION.md, results/reproduction/REPORT.md; analysis/claims.py, analysis/report.py): the claim tables compute their effects
from the results files (pairing by seed, t-intervals, one-label runs), a report's generated blocks are rebuilt
in place without touching its prose, and the committed report equals what analysis rebuilds from the committed
results."""

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from analysis import report
from analysis.claims import claim1, claim2, claim8
from analysis.load import load_results
from analysis.registry import Context
from analysis.stats import paired_ci
from lrlora import cli

ROOT = Path(__file__).resolve().parent.parent


def _result(folder: Path, adapter: str, seed: int, acc: float, matthews: float = 0.3, r: int = 4,
            regime: str = "bb_winowhy", backbone: str = "minilm_l6", **adapter_cfg) -> None:
    name = f"{backbone}__{adapter}__{regime}__r{r}__s{seed}__" + "_".join(f"{k}={v}" for k, v in adapter_cfg.items())
    d = {"run_name": name, "backbone": backbone, "adapter": adapter, "regime": regime, "r": r, "seed": seed,
         "tags": [], "metrics": {"train": {"steps": 240, "best_val": 0.6},
                                 "glue": {"accuracy": acc, "matthews": matthews, "n": 500}},
         "config": {"adapter": {"name": adapter, "r": r, **adapter_cfg},
                    "regime": {"n_train": 1000, "n_test": 500}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(d))


@pytest.fixture
def grid(tmp_path):
    res = tmp_path / "results"
    for seed, lora, ours, paper_form in ((42, 0.60, 0.62, 0.564), (123, 0.70, 0.73, 0.564), (456, 0.65, 0.66, 0.60)):
        _result(res, "lora", seed, lora)
        _result(res, "lrlora", seed, ours, center=True)
        _result(res, "lrlora", seed, paper_form, matthews=0.0 if paper_form < 0.6 else 0.2, center=False)
    return res


def test_paired_ci_is_the_t_interval():
    mean, lo, hi, n = paired_ci([62, 73, 66], [60, 70, 65])
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert (mean, n) == (pytest.approx(2.0), 3) and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert paired_ci([1.0], [0.0]) == (1.0, None, None, 1) and paired_ci([], []) == (None, None, None, 0)


def test_multiple_choice_runs_are_not_judged_at_chance_by_pairwise_matthews(grid):
    """A pair-scored multiple-choice run that labels every pair negative (Matthews 0) can still rank the right
    option first (choice_accuracy 44% against chance 33%): the Matthews rule must not count it."""
    for seed in (42, 123, 456):
        path = grid / f"minilm_l6__lora__bb_timedial__r4__s{seed}__.json"
        _result(grid, "lora", seed, 0.667, matthews=0.0, regime="bb_timedial")
        d = json.loads(path.read_text())
        d["metrics"]["glue"]["choice_accuracy"] = 0.44
        path.write_text(json.dumps(d))
    t = claim1(load_results([grid]), Context(out=grid))
    assert any("LoRA 0/3" in n for n in t.notes)  # the three winowhy LoRA runs only (Matthews 0.3)


def test_claim1_pairs_by_seed_and_counts_runs_at_chance(grid):
    t = claim1(load_results([grid]), Context(out=grid))
    row = t.rows[0]
    assert row[:5] == ["minilm_l6, bb_winowhy", "accuracy", "65.0 ± 5.0 (n=3)",
                       "67.0 ± 5.6 (n=3)", "57.6 ± 2.1 (n=3)"]
    half = stats.t.ppf(0.975, 2) / math.sqrt(3)
    assert row[5] == f"+2.0 [{2 - half:+.1f}, {2 + half:+.1f}] (n=3)"
    assert row[6] == f"{stats.ttest_rel([62, 73, 66], [60, 70, 65]).pvalue:.3f}"
    assert any("LR-LoRA paper form 2/3" in n for n in t.notes)  # Matthews 0 twice; 0.2 > 1.96/sqrt(500)


def test_claim8_and_claim2_read_the_forms_apart(grid):
    df = load_results([grid])
    rows = {r[1]: r for r in claim8(df, Context(out=grid)).rows}
    assert rows["paper (center=false)"][2] == "57.6 ± 2.1 (n=3)" and rows["paper (center=false)"][-1] == "2/3"
    assert rows["centred (center=true)"][-1] == "0/3"
    (r4,) = claim2(df, Context(out=grid)).rows  # seed 42 only, the centred form's gain
    assert r4[:4] == ["4", "60.0", "62.0", "+2.0"]


def test_report_rebuilds_only_its_blocks(grid, tmp_path, capsys):
    doc = tmp_path / "REPORT.md"
    prose = "# Report\n\nOur words, kept as written.\n\n"
    doc.write_text(prose + "<!-- analysis: claim8 -->\nstale\n<!-- /analysis -->\n\nMore words.\n")
    assert report.main([str(doc), "--results", str(grid), "--check"]) == 1
    assert "stale" in doc.read_text()                       # --check writes nothing
    assert report.main([str(doc), "--results", str(grid)]) == 0
    text = doc.read_text()
    assert text.startswith(prose) and text.endswith("<!-- /analysis -->\n\nMore words.\n")
    assert "Claim 8" in text and "stale" not in text
    assert report.main([str(doc), "--results", str(grid), "--check"]) == 0
    doc.write_text("<!-- analysis: no_such_target -->\n<!-- /analysis -->\n")
    capsys.readouterr()
    assert cli.call(report.main, [str(doc), "--results", str(grid)]) == 2
    assert "error: report block 'no_such_target'" in capsys.readouterr().err


def test_reproduction_report_equals_what_analysis_rebuilds():
    """The first round's report answers the eight claims with tables that are exactly what analysis rebuilds from
    the committed results files (after new results land, `make report` brings it up to date)."""
    doc = ROOT / "results" / "reproduction" / "REPORT.md"
    names = report.blocks(doc.read_text())
    assert {"claim1", "claim2", "claim3", "claim4", "claim5", "claim6", "para", "claim8"} <= set(names)
    assert report.main([str(doc), "--results", str(ROOT / "results" / "reproduction" / "results"), "--check"]) == 0


def test_the_second_rounds_report_equals_what_analysis_rebuilds():
    """REPRODUCTION.md's blocks (the second round's choices, verdicts and mechanism) are what analysis rebuilds from
    results/reproduction2/ (each target reads the folder its rules file names)."""
    doc = ROOT / "REPRODUCTION.md"
    assert {"selection2", "engaged2", "scores2", "verdicts2", "verdict_tests2", "mechanism2", "cost2"} <= set(
        report.blocks(doc.read_text()))
    assert report.main([str(doc), "--check"]) == 0
    # the README's headline verdicts are the same rules applied to the same runs, and its prose quotes REPRODUCTION.md
    readme = ROOT / "README.md"
    assert report.blocks(readme.read_text()) == ["headline2"]
    assert report.main([str(readme), "--check"]) == 0


@pytest.mark.parametrize("name", ["fig_verdicts2", "fig_mechanism2", "fig_curves2"])
def test_the_second_rounds_figures_are_what_analysis_draws_now(name, tmp_path):
    """REPRODUCTION.md's figures are rebuilt by `make report` from the committed results: the committed PNG
    carries the digest of what the target draws now (a stale figure fails here as a stale table does above; the
    digest is of the values, so another matplotlib's rendering does not matter)."""
    from analysis.plots import digest_of
    from analysis.registry import build

    png = next(p for p in build(name, out=tmp_path) if p.suffix == ".png")
    committed = ROOT / "results" / "reproduction2" / "analysis" / png.name
    assert f"]({committed.relative_to(ROOT)})" in (ROOT / "REPRODUCTION.md").read_text()
    assert digest_of(png) is not None
    assert digest_of(committed) == digest_of(png), f"{committed.name} is stale: run `make report`"


def test_prose_that_cites_a_block_quotes_only_numbers_the_block_prints():
    block = "<!-- analysis: engaged2 -->\n| s | best val | energy |\n|---|---|---|\n| 10 | 44.33 | 0.026 |\n" \
            "| 30 | 42.3 | 3.1e-05 |\n<!-- /analysis -->\n"
    cited = ("<!-- cites: engaged2 -->\nAt s = 10 it reaches 44.3% (rounded), energy 0.03 and 0.026, lr 1e-3,\n"
             "and 42.30 at s = 30 (trailing zero), 3.1e-05 left alone.\n\n")
    assert report.misquoted(cited + block) == []
    wrong = cited.replace("42.30", "42.8") + "Unmarked prose: 99.9 is not checked.\n\n" + block
    assert report.misquoted(wrong, "R.md") == [
        "R.md:3: 42.8 is quoted from engaged2 but none of them holds it (a number there, rounded to 1 decimal)"]
    # a difference is not a quotation (44.33 − 42.3); the paragraph ends at its blank line
    diff = "<!-- cites: engaged2 -->\nIt trails by 2.0 points.\n\nNot cited: 7.7.\n\n" + block
    assert [p.split(": ", 1)[1][:3] for p in report.misquoted(diff)] == ["2.0"]
    with pytest.raises(report.ReportError, match="cites claim9, which this report has no block of; its blocks: engaged2"):
        report.misquoted("<!-- cites: claim9 -->\n1.5\n\n" + block)


def test_prose_may_cite_another_reports_block(tmp_path):
    (tmp_path / "REPRODUCTION.md").write_text("Words.\n<!-- analysis: engaged2 -->\n| 44.33 |\n<!-- /analysis -->\n")
    readme = tmp_path / "README.md"
    assert report.misquoted("<!-- cites: REPRODUCTION.md#engaged2 -->\nIt reaches 44.3%.\n", str(readme)) == []
    assert len(report.misquoted("<!-- cites: REPRODUCTION.md#engaged2 -->\nIt reaches 45.3%.\n", str(readme))) == 1
    with pytest.raises(report.ReportError, match="cites NOTES.md#engaged2, but there is no file"):
        report.misquoted("<!-- cites: NOTES.md#engaged2 -->\n1.5\n", str(readme))
    with pytest.raises(report.ReportError, match="which REPRODUCTION.md has no block of; its blocks: engaged2"):
        report.misquoted("<!-- cites: REPRODUCTION.md#claim1 -->\n1.5\n", str(readme))


def test_check_fails_on_a_misquoted_number_and_names_it(grid, tmp_path, capsys):
    doc = tmp_path / "REPORT.md"
    doc.write_text("# Report\n\n<!-- analysis: claim8 -->\n<!-- /analysis -->\n")
    assert report.main([str(doc), "--results", str(grid)]) == 0          # the block as analysis builds it
    built = doc.read_text()
    doc.write_text(built.replace("# Report\n\n", "# Report\n\n<!-- cites: claim8 -->\nIt reached 12.345.\n\n"))
    capsys.readouterr()
    assert report.main([str(doc), "--results", str(grid), "--check"]) == 1
    assert "REPORT.md:4: 12.345 is quoted from claim8 but none of them holds it" in capsys.readouterr().out
