"""`lm_eval`: the second commonsense protocol, log-likelihood multiple choice through EleutherAI's
lm-evaluation-harness, on the adapted model merged in memory (`HFLM(pretrained=<model>)`, no export).

    python -m experiments.evaluate run=RUN protocol=lm_eval                      # the regime's tasks
    python -m experiments.evaluate run=RUN protocol=lm_eval 'protocol.tasks=[boolq,piqa]'   # lm-eval's (hub)

Offline (regime=commonsense_bb): the run's test examples are written as JSONL beside the results and scored
through task YAMLs generated here (`dataset_path: json`), each question followed by each option; acc is the
option with the highest summed log-likelihood, acc_norm the highest per byte (lm-eval's definitions).
With the hub, lm-eval's own tasks (the regime's `lm_eval_tasks` for commonsense_15k/170k: boolq piqa
social_iqa hellaswag winogrande arc_easy arc_challenge openbookqa). Some of those define acc only; acc_norm is
then null. Per-document log-likelihoods go to {run folder}/predictions/lm_eval.jsonl.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from experiments.data import DatasetMissing
from experiments.protocols import EvalContext, merged_model, protocol, write_jsonl

PREFIX = "lrlora_"  # local task names: lm-eval ships its own social_iqa etc.


def write_local_tasks(examples: list[dict], directory: Path, doc_to_text: str) -> list[str]:
    """One JSONL + one task YAML per task of `examples` (dicts with task, question, choices, gold)."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[dict]] = {}
    for ex in examples:
        by_task.setdefault(ex["task"], []).append({"question": ex["question"], "choices": list(ex["choices"]),
                                                   "gold": int(ex["gold"])})
    names = []
    for task, rows in by_task.items():
        data = write_jsonl(rows, directory / f"{task}.jsonl")
        spec = {"task": PREFIX + task, "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}, "test_split": "test",
                "output_type": "multiple_choice", "doc_to_text": doc_to_text, "doc_to_choice": "{{choices}}",
                "doc_to_target": "gold", "target_delimiter": " ",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")],
                "metadata": {"version": 1.0}}
        (directory / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        names.append(PREFIX + task)
    return names


def _metric(task_result: dict, name: str):
    value = task_result.get(f"{name},none")
    return None if value is None or value == "N/A" else float(value)


@protocol("lm_eval")
def lm_eval(ctx: EvalContext, cfg) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if ctx.regime.task != "causal_lm":
        raise ValueError(f"protocol lm_eval scores decoder (causal_lm) regimes, not {ctx.regime.task!r}")
    if ctx.out_dir is None:
        raise ValueError("protocol lm_eval writes its task files into the run folder: EvalContext.out_dir is unset")
    out = Path(ctx.out_dir)
    tasks = cfg.get("tasks") or ctx.regime.get("lm_eval_tasks")
    if tasks:  # lm-eval's own task names: the data comes from the hub
        names, manager = list(tasks), TaskManager()
    else:
        local = [ex for ex in ctx.test if ex.get("choices")]
        if not local:
            raise ValueError("protocol lm_eval needs test examples with their options (regime=commonsense_bb), "
                             "or lm-eval task names: protocol.tasks=[boolq,piqa,...] (those need the hub)")
        names = write_local_tasks(local, out / "lm_eval_tasks", cfg.doc_to_text)
        manager = TaskManager(include_path=str(out / "lm_eval_tasks"))
    model = merged_model(ctx) if cfg.get("merge", True) else ctx.model
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=ctx.processor, batch_size=cfg.get("batch_size") or ctx.batch_size,
                  device=str(ctx.device), max_length=cfg.get("max_length"))
        try:
            res = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=cfg.get("limit"),
                                  num_fewshot=cfg.get("num_fewshot"), log_samples=True,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        except (ConnectionError, OSError, ValueError, KeyError) as e:
            if not tasks:
                raise
            raise DatasetMissing(
                f"lm-eval tasks {names} could not be loaded: they need the Hugging Face hub (or its cache) and "
                f"known task names. Offline, score regime=commonsense_bb, whose test sets run as local tasks."
                f"\n  ({type(e).__name__}: {str(e)[:200]})") from None
    finally:
        model.train(was_training)

    per_task, rows = {}, []
    for name in names:
        r = res["results"][name]
        short = name.removeprefix(PREFIX)
        samples = res["samples"][name]
        per_task[short] = {"acc": _metric(r, "acc"), "acc_stderr": _metric(r, "acc_stderr"),
                           "acc_norm": _metric(r, "acc_norm"), "acc_norm_stderr": _metric(r, "acc_norm_stderr"),
                           "n": len(samples)}
        for s in samples:
            rows.append({"task": short, "doc_id": s["doc_id"], "gold": s["target"],
                         "loglikelihoods": [float(x[0]) for x in s["filtered_resps"]],
                         "acc": s.get("acc"), "acc_norm": s.get("acc_norm")})
    path = write_jsonl(rows, out / "predictions" / "lm_eval.jsonl")

    def mean(field):
        values = [t[field] for t in per_task.values() if t[field] is not None]
        return float(np.mean(values)) if values else None

    return {"acc": mean("acc"), "acc_norm": mean("acc_norm"), "n": sum(t["n"] for t in per_task.values()),
            "tasks": per_task, "task_source": "hub" if tasks else "local", "merged": ctx._merged,
            "predictions": str(path), "lm_eval_version": metadata.version("lm-eval")}
