"""`lm_eval`: the second commonsense protocol, log-likelihood multiple choice through EleutherAI's
lm-evaluation-harness, on the adapted model merged in memory (`HFLM(pretrained=<model>)`, no export).

    python -m experiments.evaluate run=RUN protocol=lm_eval                      # the regime's tasks
    python -m experiments.evaluate run=RUN protocol=lm_eval 'protocol.tasks=[boolq,piqa]'   # lm-eval's (hub)

Offline (the default): the run's test examples are written as JSONL beside the results and scored through
task YAMLs generated here (`dataset_path: json`). For `make data`'s suite (regime=commonsense_15k/170k) each
local task includes lm-eval's built-in task of the same name (boolq, piqa, social_iqa, hellaswag, winogrande,
arc_easy, arc_challenge, openbookqa; the regime's `lm_eval_mirror`) and swaps only the data source, so the
prompt, the options, the target and the metrics (acc; acc_norm where the built-in defines it, else null) are
lm-eval's own, on the very examples `commonsense_gen` scores. Other suites (commonsense_bb) use a generic
template: each question followed by each option; acc is the option with the highest summed log-likelihood,
acc_norm the highest per byte (lm-eval's definitions). lm-eval's own tasks from the hub only when asked:
`protocol.tasks=[boolq,...]`. Per-document log-likelihoods go to {run folder}/predictions/lm_eval.jsonl.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from experiments.data import DataFileError, DatasetMissing
from experiments.protocols import EvalContext, merged_model, protocol, write_jsonl
from lrlora.errors import UserError

PREFIX = "lrlora_"  # local task names: lm-eval ships its own social_iqa etc.

# lm-eval's built-in tasks that the local tasks of `make data`'s suite mirror: the YAML (relative to
# lm_eval/tasks/) whose prompt, options, target and metrics the local task takes over by `include:`, and the
# split name it evaluates. tests/test_commonsense_suite.py checks these paths against lm-eval's own task index.
BUILTIN_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


def builtin_yaml(name: str) -> Path:
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / BUILTIN_YAML[name]
    if not path.exists():
        raise UserError(f"lm-eval {metadata.version('lm-eval')} has no {BUILTIN_YAML[name]} for its {name!r} task; "
                        f"install the lm-eval version pyproject.toml pins (pip install -e '.[experiments]')")
    return path


def write_local_tasks(examples: list[dict], directory: Path, doc_to_text: str, mirror: dict | None = None) -> list[str]:
    """One JSONL + one task YAML per task of `examples`. A task named in `mirror` (our task -> lm-eval's
    built-in task) whose examples carry `lm_eval` (the example in the built-in's fields) includes the built-in
    YAML and swaps only its data source: the same prompt, options, target and metrics. Any other task is
    written from `question`, `choices` and `gold` with `doc_to_text`, scored by acc and acc_norm."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[dict]] = {}
    for ex in examples:
        by_task.setdefault(ex["task"], []).append(ex)
    names = []
    for task, rows in by_task.items():
        builtin = (mirror or {}).get(task)
        if builtin and all("lm_eval" in ex for ex in rows):
            data = write_jsonl([ex["lm_eval"] for ex in rows], directory / f"{task}.jsonl")
            # every split the built-in names points at this one file, so whichever it evaluates is ours
            spec = {"include": str(builtin_yaml(builtin)), "task": PREFIX + task, "tag": [],
                    "dataset_path": "json", "dataset_name": None,
                    "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
                    "training_split": None, "validation_split": None, "test_split": "test",
                    "fewshot_split": None}
        else:
            data = write_jsonl([{"question": ex["question"], "choices": list(ex["choices"]), "gold": int(ex["gold"])}
                                for ex in rows], directory / f"{task}.jsonl")
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


@protocol("lm_eval", tasks=("causal_lm",))
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
            raise DataFileError("protocol lm_eval needs test examples with their options, as `make data` builds "
                                "them (regime=commonsense_15k/170k read data/commonsense/); LLM-Adapters' own test "
                                "files carry none: build the suite, or name lm-eval's tasks with "
                                "protocol.tasks=[boolq,piqa,...] (those need the hub)")
        names = write_local_tasks(local, out / "lm_eval_tasks", cfg.doc_to_text, ctx.regime.get("lm_eval_mirror"))
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
                f"known task names. Offline, leave protocol.tasks unset: the suite `make data` builds runs as local "
                f"tasks that mirror them."
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
            "predictions": ctx.recorded(path), "lm_eval_version": metadata.version("lm-eval")}
