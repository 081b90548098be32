"""The demo's table and figure are built from results files; the slow test runs its whole pipeline
(real MiniLM weights, real BBC News) on a small slice."""

import json

import pandas as pd
import pytest

from analysis import build
from analysis.load import to_row
from experiments.demo import main


def fake_results(method, acc, ranks):
    per_layer = {f"encoder.layer.{i}.attention.self.{t}": {"stable_rank": ranks[i], "type": t, "layer": i,
                                                            "shape": [4, 4]}
                 for i in range(len(ranks)) for t in ("query", "value")}
    return {"run_name": f"minilm_l6__{method}__bbc_news__r4__s42", "r": 4, "seed": 42, "backbone": "minilm_l6",
            "adapter": method, "regime": "bbc_news", "config": {"adapter": {}, "regime": {"task": "classification"}},
            "metrics": {"train": {"best_val": acc + 0.01, "best_val_metric": "accuracy", "steps": 4},
                        "glue": {"accuracy": acc, "loss": 0.5, "n": 300}},
            "params": {"trainable": 1234, "trainable_percent": 0.5},
            "stable_ranks": {"all": {"mean": sum(ranks) / len(ranks), "std": 0.5},
                             "by_type": {"query": {}, "value": {}}, "per_layer": per_layer},
            "timing": {"train_s": 12.0}}


def frame(*results):
    return pd.DataFrame([to_row(r) for r in results])


def test_table_golden(tmp_path):
    """The demo's table is analysis' `demo` target over the two results files."""
    t = build("demo", df=frame(fake_results("lrlora", 0.9, [1.0, 1.0]), fake_results("lora", 0.8, [2.0, 4.0])),
              out=tmp_path).markdown().splitlines()
    assert t[4] == "| LoRA (r=4) | 0.800 | 0.810 (accuracy) | 1,234 (0.50%) | 3.00 ± 0.50 | 12 s |"
    assert t[5].startswith("| LR-LoRA (r=4) | 0.900 |")


def test_figure_is_written(tmp_path):
    paths = build("fig_layer_ranks", df=frame(fake_results("lora", 0.8, [2.0, 4.0])), out=tmp_path)
    assert [p.suffix for p in paths] == [".png", ".pdf"] and paths[0].stat().st_size > 1000


@pytest.mark.slow
def test_demo_pipeline_on_a_small_slice(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    results = main(["--out", str(tmp_path), "regime.n_train=32", "regime.n_val=16", "regime.n_test=32",
                    "regime.max_length=64", "trainer.max_steps=3", "logger=none"])
    out = capsys.readouterr().out
    assert "| LoRA (r=4) |" in out and "| LR-LoRA (r=4, center=True) |" in out  # the variant is named
    assert (tmp_path / "fig_layer_ranks.png").exists() and (tmp_path / "table.md").exists()
    for r in results.values():
        on_disk = json.loads((tmp_path / "results" / f"{r['run_name']}.json").read_text())
        assert on_disk["metrics"]["train"]["steps"] == 3 and on_disk["backbone"] == "minilm_l6"
        assert len(on_disk["stable_ranks"]["per_layer"]) == 36  # 6 layers x 6 module types
