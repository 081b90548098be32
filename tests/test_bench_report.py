"""benchmarks/report.py: the performance target table is computed from the benchmark files, so a result over a
limit reads "no" and one under it "yes"."""

from benchmarks.report import target_table


def _summary(method, tokens, ratio, mem_mb, layers=2):
    return {"model": "qwen2_0.5b", "layers": layers, "tokens": tokens, "method": method, "vs": "lora",
            "step_time_ratio": ratio, "memory_above_vs_bytes": mem_mb * 2**20}


def _rows(table):
    return {line.split(" | ")[0].lstrip("| "): line.rsplit(" | ", 1)[1].rstrip(" |")
            for line in table.splitlines()[2:]}


def test_targets_read_from_the_files():
    train = {"summary": [_summary("lrlora", 512, 1.7, 8), _summary("lrlora", 2048, 1.2, 4),
                         _summary("lrlora_d05", 512, 2.1, -20), _summary("lrlora_d05", 2048, 1.5, 10, layers=4)],
             "inference": [{"model": "qwen2_0.5b", "layers": 2, "tokens": 512, "merged_over_base": 1.01}]}
    sigma = {"cases": [{"path": "fast", "shape": [896, 4864], "median_s": 0.02, "x_elementwise": 30.0,
                        "x_elementwise_into_buffer": 31.0}]}
    rows = _rows(target_table(train, sigma))
    assert rows["LR-LoRA / LoRA step time ≤ 1.6× at ≥ 2,048 tokens (dropout 0)"] == "yes"
    assert rows["≤ 1.8× at 512 tokens (dropout 0)"] == "yes"
    assert rows["≤ 2.0× with dropout 0.05 (against LoRA with dropout 0.05)"] == "no"  # 2.1× at 512
    mem = next(v for k, v in rows.items() if k.startswith("peak memory"))
    assert mem == "yes"
    assert next(v for k, v in rows.items() if k.startswith("merged model")) == "yes"
    assert next(v for k, v in rows.items() if k.startswith("σ op")) == "no"

    # outside ±0.03: "not resolved" only where the base model's own timings spread wider and the merged model is
    # the base's module types; otherwise "no"
    noisy = {"model": "qwen2_0.5b", "layers": 2, "tokens": 8192, "merged_over_base": 0.93,
             "times_s": {"base": [8.5, 8.9, 9.2]}, "merged_is_plain_model": True}  # spread 0.7 / 8.9 = 0.079
    train["inference"].append(noisy)
    merged = next(v for k, v in _rows(target_table(train, None)).items() if k.startswith("merged model"))
    assert merged == "not resolved: this run's base-to-base spread ±0.08 is wider than the band"
    for change in ({"times_s": {"base": [8.8, 8.9, 9.0]}}, {"merged_is_plain_model": False}, {"times_s": {}}):
        train["inference"][-1] = {**noisy, **change}
        assert next(v for k, v in _rows(target_table(train, None)).items() if k.startswith("merged model")) == "no"
    train["inference"].pop()

    train["summary"].append(_summary("lrlora", 512, 1.5, 60, layers=4))  # 60 MB > 3 × 17.4 MB
    rows = _rows(target_table(train, None))
    assert next(v for k, v in rows.items() if k.startswith("peak memory")) == "no"
    assert not any(k.startswith("σ op") for k in rows)  # no σ file: no row, not a guess


def _cell(name, lora, lrlora, floor_ratio, eval_ratio, mem_ratio):
    return {"cell": name, "tokens_per_example": 56.0, "padded_tokens_per_step": 896,
            "median_step_s": {"lora": lora, "lrlora": lrlora}, "step_ratio": lrlora / lora,
            "floor": {"dense_products_s": 0.2, "sigma_op_s": 0.05, "step_s": lora * floor_ratio, "ratio": floor_ratio},
            "median_eval_s": {"lora": 1.0, "lrlora": eval_ratio}, "eval_ratio": eval_ratio,
            "memory": {"lora": {"peak_rss_bytes": 800 * 2**20}, "lrlora": {"peak_rss_bytes": mem_ratio * 800 * 2**20}},
            "memory_ratio": mem_ratio, "load_average_before": [1.0], "load_average_after": [1.2],
            "profile": {"lrlora": {"step_s": lrlora, "top": [{"name": "aten::mm", "self_s_per_step": 0.4, "share": 0.3}]}}}


def test_workload_targets_and_tables_read_from_the_file():
    """The workload file's cells give the step, evaluation and memory rows (limits 1.5×, 1.1×, 1.1×) and the
    whole runs' row; a cell over a limit reads "no"; the tables show the floor and the profile."""
    from benchmarks.report import floor_table, workload_tables

    work = {"cells": [_cell("minilm_56", 1.0, 1.4, 1.35, 1.02, 0.95), _cell("minilm_128", 2.0, 2.6, 1.25, 1.2, 1.0)],
            "runs": {"median": {m: {"train_s": t, "wall_s": t + 10, "rest_s": 10} for m, t in (("lora", 40), ("lrlora", 56))},
                     "ratio": {"train_s": 1.4, "wall_s": 66 / 50, "rest_s": 1.0}}}
    rows = _rows(target_table(None, None, work))
    assert next(v for k, v in rows.items() if k.startswith("whole LR-LoRA run")) == "yes"
    assert next(v for k, v in rows.items() if k.startswith("LR-LoRA / LoRA step on the short-input")) == "yes"
    assert next(v for k, v in rows.items() if k.startswith("evaluation")) == "no"  # 1.2× on minilm_128
    assert next(v for k, v in rows.items() if k.startswith("peak memory ≤ 1.1")) == "yes"
    work["runs"]["ratio"]["wall_s"] = 1.6
    assert next(v for k, v in _rows(target_table(None, None, work)).items() if k.startswith("whole")) == "no"
    text = workload_tables(work)
    assert "| minilm_56 | 56 | 1,000 ms | 1,400 ms | 1.40× | 1.35× |" in text
    assert "| timing.train_s (the steps) | 40.0 s | 56.0 s | 1.40× |" in text and "aten::mm 400 ms (30%)" in text
    assert "| minilm_56 | 896 | 1,000 ms | 200 ms | 50 ms | 1,350 ms | 1.35× | 1.40× | +4% |" in floor_table(work)


def test_sigma_breakdown_target_names_the_page_faults():
    breakdown = {"x_elementwise": {"whole op (forward + backward)": 40.0,
                                   "whole op, freed memory kept mapped (no page faults)": 22.0}}
    rows = _rows(target_table(None, None, None, breakdown))
    assert next(v for k, v in rows.items() if k.startswith("σ op ≤ 25×")) == "only without page faults"
