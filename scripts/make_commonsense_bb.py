"""Build the BIG-bench stand-in suite (`regime=commonsense_bb`, `bb_<task>`) from BIG-bench's real task files.

An optional, older source: the reproduction's first round ran on it. PyPI may no longer serve the sdist it
needs; `make data` (experiments/commonsense_suite.py) builds the paper's own eight tasks instead.

    python -m scripts.make_commonsense_bb                 # = make data-bb; writes data/commonsense_bb/
    python -m scripts.make_commonsense_bb --out DIR --cache DIR

Downloads the BIG-bench sdist from PyPI once (`pip download --no-deps bigbench==1.0.0`, ~360 MB, Apache-2.0;
kept in the cache folder, checked against its SHA-256), reads only the eight task.json files below from the
archive (nothing is installed), and writes the suite in the LLM-Adapters layout the commonsense loader reads:

    train.json                      the small training mix (the paper's commonsense_15k in miniature)
    train_full.json                 every training example (commonsense_170k in miniature)
    dataset/<task>/test.json        per-task test sets
    dataset/<task>/train.json       per-task training sets (the bb_<task> encoder regimes)
    MANIFEST.json, SHA256SUMS       sizes, seeds, the source archive's hash, every file's hash

Records are {instruction, input, output, answer} as in LLM-Adapters: the options numbered in the instruction,
"Answer format: answer1/answer2/...", output "the correct answer is answerK"; plus question, choices and
label (the gold option's index) for the log-likelihood protocol (lm_eval) and the encoder regimes.
Splits are seeded and made by question, so no question (hence no instruction) is in both train and test.
The build is deterministic: `--check` compares the files with scripts/commonsense_bb.sha256.
"""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

from experiments.commonsense_suite import build_command, fetch_pinned, write_checksums
from lrlora import cli
from lrlora._atomic import atomic_write

SDIST = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SEED = 0
SMALL_MIX = 1000          # commonsense_15k is ~9% of commonsense_170k; 1,000 is ~9% of the full mix here
MAX_TEST, MIN_TEST = 500, 200

# (suite name, BIG-bench task folder, the paper's task it stands in for, fixed option order or None)
# Fixed-label tasks keep one option order (like BoolQ's true/false); the others are shuffled per example,
# because BIG-bench stores the gold option at a fixed position in some tasks (timedial: always the third).
TASKS = [
    ("strategyqa", "strategyqa", "boolq", ["Yes", "No"]),
    ("wikihow_step", "goal_step_wikihow/step_inference", "piqa", None),
    ("social_iqa", "social_iqa", "social_i_qa", None),
    ("wikihow_goal", "goal_step_wikihow/goal_inference", "hellaswag", None),
    ("winowhy", "winowhy", "winogrande", ["correct", "incorrect"]),
    ("timedial", "timedial", "ARC-Easy", None),
    ("date_understanding", "date_understanding", "ARC-Challenge", None),
    ("sports_understanding", "sports_understanding", "openbookqa", ["plausible", "implausible"]),
]
ROOT = Path(__file__).resolve().parent.parent
CHECKSUMS = ROOT / "scripts" / "commonsense_bb.sha256"


def fetch_sdist(cache: Path) -> Path:
    # --no-binary: the sdist holds the task files. PyPI has stopped serving 1.0.0 (only a 0.0.1 placeholder is listed)
    return fetch_pinned(cache, SDIST, "bigbench==1.0.0", SDIST_SHA256, "~360 MB", ["--no-binary", ":all:"],
                        "the BIG-bench stand-in suite cannot be built without that sdist; `make data` builds the "
                        "paper's own eight commonsense tasks instead")


def question_text(task: dict, example: dict) -> str:
    prefix = task.get("task_prefix", "").strip()
    text = example["input"].strip()
    return f"{prefix}\n{text}" if prefix else text


def records(name: str, task: dict, fixed: list[str] | None) -> list[dict]:
    """One LLM-Adapters record per distinct (question, options) example."""
    out, seen = [], set()
    for i, ex in enumerate(task["examples"]):
        scores = {k.strip(): v for k, v in ex["target_scores"].items()}
        gold = max(scores, key=scores.get)
        if fixed is not None:
            assert set(scores) == set(fixed), (name, scores)
            choices = list(fixed)
        else:
            choices = sorted(scores)
            random.Random(f"{SEED}-{name}-{i}").shuffle(choices)
        q = question_text(task, ex)
        if (q, tuple(choices)) in seen:
            continue
        seen.add((q, tuple(choices)))
        k = choices.index(gold) + 1
        options = " ".join(f"Answer{j}: {c}" for j, c in enumerate(choices, 1))
        fmt = "/".join(f"answer{j}" for j in range(1, len(choices) + 1))
        out.append({"instruction": f"Please choose the correct answer to the question: {q}\n\n{options}\n\n"
                                   f"Answer format: {fmt}",
                    "input": "", "output": f"the correct answer is answer{k}", "answer": f"answer{k}",
                    "question": q, "choices": choices, "label": k - 1})
    return out


def split(name: str, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Seeded split by question text: every example of a question lands on the same side."""
    by_q: dict[str, list[dict]] = {}
    for r in rows:
        by_q.setdefault(r["question"], []).append(r)
    questions = sorted(by_q)
    random.Random(f"{SEED}-{name}").shuffle(questions)
    n_test = min(MAX_TEST, max(MIN_TEST, len(rows) // 2))
    test, train = [], []
    for q in questions:
        (test if len(test) < n_test else train).extend(by_q[q])
    assert not {r["instruction"] for r in test} & {r["instruction"] for r in train}
    return train, test


def write_json(obj, path: Path) -> None:
    atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def build(sdist: Path, out: Path) -> dict:
    manifest = {"source": f"PyPI bigbench==1.0.0 ({SDIST}, sha256 {SDIST_SHA256}), Apache-2.0", "seed": SEED,
                "tasks": {}}
    full = []
    with tarfile.open(sdist) as tf:
        for name, folder, paper_task, fixed in TASKS:
            member = f"bigbench-1.0.0/bigbench/benchmark_tasks/{folder}/task.json"
            task = json.load(tf.extractfile(member))
            rows = records(name, task, fixed)
            train, test = split(name, rows)
            write_json(test, out / "dataset" / name / "test.json")
            write_json(train, out / "dataset" / name / "train.json")
            full += [{k: r[k] for k in ("instruction", "input", "output", "answer")} | {"task": name} for r in train]
            manifest["tasks"][name] = {"bigbench_task": folder, "stands_in_for": paper_task,
                                       "examples": len(task["examples"]), "distinct": len(rows),
                                       "train": len(train), "test": len(test),
                                       "options": sorted({len(r["choices"]) for r in rows})}
    random.Random(SEED).shuffle(full)
    write_json(full, out / "train_full.json")
    write_json(full[:SMALL_MIX], out / "train.json")
    manifest["train_full"], manifest["train"] = len(full), min(SMALL_MIX, len(full))
    write_json(manifest, out / "MANIFEST.json")
    write_checksums(out)
    return manifest


def report(manifest: dict, out: Path) -> str:
    lines = [f"{'task':<22}{'BIG-bench task':<36}{'for':<15}{'train':>7}{'test':>6}  options"]
    for name, t in manifest["tasks"].items():
        lines.append(f"{name:<22}{t['bigbench_task']:<36}{t['stands_in_for']:<15}{t['train']:>7}{t['test']:>6}  "
                     f"{t['options']}")
    lines.append(f"training mixes: train.json {manifest['train']}, train_full.json {manifest['train_full']} -> {out}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return build_command(argv, prog="python -m scripts.make_commonsense_bb", description=__doc__.split("\n\n")[0],
                         out=ROOT / "data" / "commonsense_bb", source="sdist", fetch=fetch_sdist, build=build,
                         report=report, checksums=CHECKSUMS)


if __name__ == "__main__":
    cli.run(main)
