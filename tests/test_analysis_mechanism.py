"""analysis/mechanism.py: the `mechanism` table and `fig_mechanism` from small results files written here
(docs/RESULTS.md's layout, tests/fixtures/make_results.py's helper): energy beyond r from a known kept spectrum,
the results file's `mechanism` taking precedence over the spectrum, the random-initialisation baseline, and the
figure written."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import build, load_results
from analysis.mechanism import MECHANISM, SPECTRUM, energy_from_spectrum, random_init
from tests.fixtures.make_results import result

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (96, 128)  # d_out x d_in: more than the 64 kept singular values, so a spectrum is a truncated one
MODULES = {"model.layers.0.self_attn.q_proj": ("q_proj", 0), "model.layers.1.self_attn.q_proj": ("q_proj", 1),
           "model.layers.0.mlp.down_proj": ("down_proj", 0)}
KNOWN = [1.0, 1.0, 0.5] + [0.0] * 61  # r = 2: energy beyond r = 0.5² / (1 + 1 + 0.5²) = 0.25 / 2.25


def write_run(folder: Path, adapter: str, r: int, seed: int, spectrum=KNOWN, mechanism=None, sr_mean=2.0):
    """One results file: every module with `spectrum` in stable_ranks; `mechanism` = {field: [value per module]}."""
    d = result(adapter, r, seed, {"boolq": 0.5, "piqa": 0.5})
    d["stable_ranks"] = {"per_layer": {name: {"stable_rank": 2.0, "type": t, "layer": layer, "shape": list(SHAPE),
                                              "spectrum": list(spectrum)} for name, (t, layer) in MODULES.items()},
                         "all": {"mean": sr_mean, "std": 0.0, "min": sr_mean, "max": sr_mean, "n": len(MODULES)},
                         "by_type": {}}
    if mechanism is not None:
        per_layer = {name: {f: v[i] for f, v in mechanism.items()} for i, name in enumerate(MODULES)}
        d["mechanism"] = {"r": r, "per_layer": per_layer,
                          "summary": {f: {"mean": float(np.mean(v)), "median": float(np.median(v)), "min": min(v),
                                          "max": max(v), "n": len(v)}
                                      for f, v in mechanism.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{d['run_name']}.json").write_text(json.dumps(d))


@pytest.fixture
def runs(tmp_path):
    folder = tmp_path / "results"
    write_run(folder, "lora", 2, 42)  # spectrum only (a file from before `mechanism`)
    write_run(folder, "lora", 4, 42, mechanism={"energy_beyond_r": [1e-13, 2e-13, 3e-13]})
    # LR-LoRA, two seeds: both have the spectrum (which alone would give 0.11) and a mechanism, which wins
    write_run(folder, "lrlora", 2, 42, sr_mean=2.5, mechanism={
        "energy_beyond_r": [1e-6, 2e-6, 3e-6], "t_absmax": [0.5, 1.0, 1.5], "t_rms": [0.1, 0.2, 0.3],
        "linear_residual": [0.01, 0.02, 0.03], "ba_stable_rank": [1.0, 2.0, 3.0]})
    write_run(folder, "lrlora", 2, 123, sr_mean=3.5, mechanism={
        "energy_beyond_r": [2.2e-6, 0.05, 1e-7], "t_absmax": [2.0, 3.0, 4.0], "t_rms": [0.1, 0.2, 0.3],
        "linear_residual": [0.04, 0.05, 0.06], "ba_stable_rank": [1.0, 2.0, 3.0]})
    return load_results([folder])


def rows_by(table):
    col = {c: i for i, c in enumerate(table.columns)}
    return {(r[col["method"]], r[col["r"]]): {c: r[i] for c, i in col.items()} for r in table.rows}


def test_the_loader_keeps_the_per_layer_mechanism_whole(runs):
    lr = runs[(runs.adapter == "lrlora") & (runs.seed == 42)].iloc[0]
    assert lr["mechanism.per_layer"]["model.layers.0.mlp.down_proj"]["linear_residual"] == 0.03
    assert lr["mechanism.summary.t_absmax.median"] == 1.0 and lr["mechanism.r"] == 2
    assert not [c for c in runs.columns if c.startswith("mechanism.per_layer.")]


def test_energy_beyond_r_from_a_known_spectrum():
    assert energy_from_spectrum(KNOWN, 2, SHAPE) == pytest.approx(0.25 / 2.25)
    assert energy_from_spectrum(KNOWN, 1, SHAPE) == pytest.approx(1.25 / 2.25)
    assert energy_from_spectrum([0.0] * 64, 2, SHAPE) == 0.0            # ΔW = 0: nothing beyond r
    assert energy_from_spectrum([1.0] * 64, 64, SHAPE) is None          # cut at 64: beyond r = 64 is unknown
    assert energy_from_spectrum([1.0, 0.5], 2, (2, 3)) == 0.0           # the whole spectrum: nothing beyond


def test_the_table_from_spectra_and_from_mechanism(runs, tmp_path):
    table = build("mechanism", df=runs, out=tmp_path / "out")
    rows = rows_by(table)
    assert list(rows) == [("LoRA", "2"), ("LoRA", "4"), ("LR-LoRA", "2")]
    spec = rows[("LoRA", "2")]  # 0.25 / 2.25 = 0.111 on every matrix
    assert (spec["energy beyond r (median)"], spec["matrices ≥ 0.01"], spec["source"]) == ("0.11", "3/3", SPECTRUM)
    assert SPECTRUM == "spectrum (first 64 values)"
    lora = rows[("LoRA", "4")]
    assert lora["energy beyond r (median)"] == "2e-13" and lora["source"] == MECHANISM
    assert lora["t_absmax (median)"] == lora["linear residual (median)"] == lora["stable rank BA (mean)"] == "—"
    lr = rows[("LR-LoRA", "2")]
    # per-run medians 2e-6 and 2.2e-6 -> 2.1e-6 (the spectrum's 0.11 is not used); one matrix of six ≥ 1e-2
    assert lr["energy beyond r (median)"] == "2.1e-06" and lr["matrices ≥ 0.01"] == "1/6"
    assert lr["source"] == MECHANISM and lr["runs"] == "2"
    assert lr["t_absmax (median)"] == "2" and lr["linear residual (median)"] == "0.035"  # medians 1, 3; .02, .05
    assert lr["stable rank BA (mean)"] == "2.00" and lr["stable rank ΔW (mean)"] == "3.00"
    assert lr["stable rank BA at init (mean)"] == f"{random_init(SHAPE, 2)[0]:.2f}"
    assert (tmp_path / "out" / "mechanism.md").read_text() == table.markdown()


def test_the_random_init_baseline_is_lrloras_init_and_deterministic():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    random_init.cache_clear()
    first = random_init(SHAPE, 4)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG is left where it was
    random_init.cache_clear()
    assert random_init(SHAPE, 4) == first
    # the same draw by hand: A (r x d_in) then B (d_out x r), Kaiming-uniform a = √5 as lrlora.layer does
    from lrlora import stable_rank

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(0)
        a, b = torch.empty(4, SHAPE[1]), torch.empty(SHAPE[0], 4)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    assert first[0] == pytest.approx(stable_rank(b @ a), rel=1e-6)
    assert random_init(SHAPE, 1)[0] == pytest.approx(1.0)  # rank one: stable rank 1
    assert 1.5 < first[0] <= 4 and random_init(SHAPE, 2)[0] > 1.0
    assert first[1] < 1e-10  # rank r: nothing beyond r but rounding


def test_the_figure_is_written(runs, tmp_path):
    paths = build("fig_mechanism", df=runs, out=tmp_path)
    assert [p.name for p in paths] == ["fig_mechanism.png", "fig_mechanism.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
    no_layers = runs.drop(columns=["stable_ranks.per_layer", "mechanism.per_layer"])
    assert build("fig_mechanism", df=no_layers, out=tmp_path / "empty") == []
    assert build("mechanism", df=no_layers, out=tmp_path / "empty").rows == []


def test_the_first_round_results_read():
    """The committed reproduction results predate `mechanism`: every row from the kept spectra; LoRA's ΔW has rank
    r, so none of its matrices has energy beyond r, and RandLoRA's full-rank ΔW has it on every matrix."""
    table = build("mechanism", results=[ROOT / "results" / "reproduction" / "results"], write=False)
    col = {c: i for i, c in enumerate(table.columns)}
    assert {r[col["source"]] for r in table.rows} == {SPECTRUM}
    lora = [r for r in table.rows if r[col["method"]] == "LoRA"]
    assert lora and all(r[col["matrices ≥ 0.01"]].startswith("0/") for r in lora)
    assert [r[col["matrices ≥ 0.01"]] for r in table.rows if r[col["method"]] == "RandLoRA"] == ["36/36"]


def test_engaged2_reads_the_round_and_its_exploratory_folder_and_shows_validation_only(tmp_path):
    """REPRODUCTION.md's engaged2 block: centred LR-LoRA on task_a by s and lr, pre-registered pilot and selection
    runs (seeds 1, 2) beside the exploratory folder's; no test-seed run, no other method, no test score."""
    from tests.test_verdicts import _write, run

    root = tmp_path / "round"
    res, exp = root / "results", root / "exploratory" / "results"
    ours = {"center": True, "pre_scale": 10.0, "share": "none"}

    def with_mechanism(folder, d, energy, residual, t):
        d["mechanism"] = {"summary": {"energy_beyond_r": {"median": energy}, "linear_residual": {"median": residual},
                                      "t_absmax": {"median": t}}}
        (folder / f"{d['run_name']}.json").write_text(json.dumps(d))

    with_mechanism(res, run(res, "lrlora", 1, 28.0, "cs_hellaswag", lr=1e-3, val=0.27, **ours), 0.034, 0.16, 0.78)
    with_mechanism(exp, run(exp, "lrlora", 1, 44.0, "cs_hellaswag", lr=1e-4, val=0.451, **ours), 0.02, 0.1, 0.5)
    run(res, "lrlora", 101, 60.0, "cs_hellaswag", lr=1e-3, val=0.5, **ours)            # a test seed: not here
    run(res, "lora", 1, 48.0, "cs_hellaswag", lr=1e-3, val=0.477)                      # not LR-LoRA: not here
    run(res, "lrlora", 1, 40.0, "cs_openbookqa", lr=1e-3, val=0.4, **ours)             # not task_a: not here
    (root / "selection.json").write_text(json.dumps({"task_a": "cs_hellaswag"}))
    rules = {"results": str(res), "selection": str(root / "selection.json"), "alpha": 0.05, "seeds": [101],
             "arms": {"lora": {"adapter": "lora"}},
             "claims": [{"claim": "1", "statement": "s", "combine": "all", "tests": [
                 {"label": "x", "kind": "within", "metric": "score", "arm": "lora", "versus": 0, "min_n": 1,
                  "margin": 0.0}]}]}
    table = build("engaged2", out=tmp_path, write=False, rules=_write(tmp_path, rules))
    assert "test" not in table.columns
    assert [row[:5] + row[-1:] for row in table.rows] == [["10", "1", "0.0001", "1", "45.1", "exploratory"],
                                                          ["10", "1", "0.001", "1", "27.0", "pre-registered"]]
    assert table.rows[1][5:8] == ["0.034", "0.16", "0.78"]


def test_a_figure_saved_twice_is_the_same_bytes(tmp_path):
    """`make report` rewrites the committed figures: the same figure must give the same files (no creation date in
    the PDF), or every rebuild would leave git dirty."""
    from analysis.plots import pyplot, save

    def draw(out):
        fig, ax = pyplot().subplots()
        ax.plot([0, 1, 2], [1, 0, 2])
        return save(fig, out, "f")

    first = [p.read_bytes() for p in draw(tmp_path / "a")]
    time.sleep(1.1)  # a creation date has one-second resolution
    assert [p.read_bytes() for p in draw(tmp_path / "b")] == first


def test_a_figure_carries_the_digest_of_the_values_it_draws(tmp_path):
    from analysis.plots import digest, digest_of, pyplot, save

    def draw(out, ys):
        fig, ax = pyplot().subplots()
        ax.plot([0, 1, 2], ys)
        return save(fig, out, "f", data=ys)

    png, pdf = draw(tmp_path / "a", [1, 0, 2])
    assert digest_of(png) == digest([1, 0, 2]) and (b"lrlora-data:" + digest([1, 0, 2]).encode()) in pdf.read_bytes()
    assert digest_of(draw(tmp_path / "b", [1, 0, 3])[0]) != digest_of(png)
    fig, _ = pyplot().subplots()
    assert digest_of(save(fig, tmp_path / "c", "f")[0]) is None  # no data given: no digest claimed


def test_the_second_rounds_figure_reads_its_rules_folder_and_test_seeds(runs, tmp_path):
    import yaml

    from tests.test_verdicts import rules_dict

    rules = {**rules_dict(tmp_path), "seeds": [123]}  # results: tmp_path/results, the `runs` fixture's folder
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules, allow_unicode=True, sort_keys=False))
    paths = build("fig_mechanism2", out=tmp_path / "fig", rules=str(path))
    assert [p.name for p in paths] == ["fig_mechanism2.png", "fig_mechanism2.pdf"]
    # no run has one of the round's test seeds: nothing is drawn
    path.write_text(yaml.safe_dump({**rules, "seeds": [7]}, allow_unicode=True, sort_keys=False))
    assert build("fig_mechanism2", out=tmp_path / "none", rules=str(path)) == []
