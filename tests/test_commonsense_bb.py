"""The offline commonsense suite: scripts/make_commonsense_bb.py on a fixture archive shaped like the BIG-bench
sdist (the real 360 MB download is `make data-bb`, never a test), and the regimes that read what it writes."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.data import load_splits
from experiments.protocols.commonsense_gen import extract_answer
from scripts import make_commonsense_bb as mk

ROOT = Path(__file__).resolve().parent.parent


def fake_task(folder: str, fixed, n: int) -> dict:
    examples = []
    for i in range(n):
        options = list(fixed) if fixed else [f"{folder} option {i}-{k}" for k in range(3)]  # every pattern allows 3
        gold = options[i % 2] if fixed else options[-1]  # gold always last, as timedial stores it
        q = f"{folder} question {i % (n - 2)}?"      # two questions repeat, with the same options for fixed tasks
        examples.append({"input": q, "target_scores": {o: int(o == gold) for o in options}})
    return {"name": folder, "task_prefix": "Prefix line.\n" if folder == "winowhy" else "", "examples": examples}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bb")
    sdist = tmp / mk.SDIST
    with tarfile.open(sdist, "w:gz") as tf:
        for _, folder, _, fixed in mk.TASKS:
            data = json.dumps(fake_task(folder, fixed, 40)).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{folder}/task.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    mp = pytest.MonkeyPatch()
    mp.setattr(mk, "MIN_TEST", 12)
    mp.setattr(mk, "MAX_TEST", 15)
    mp.setattr(mk, "SMALL_MIX", 50)
    manifest = mk.build(sdist, tmp / "commonsense_bb")
    mp.undo()
    return tmp, manifest


def test_records_in_the_llm_adapters_format(suite):
    tmp, manifest = suite
    assert len(manifest["tasks"]) == 8
    for name, t in manifest["tasks"].items():
        test = json.loads((tmp / "commonsense_bb" / "dataset" / name / "test.json").read_text())
        train = json.loads((tmp / "commonsense_bb" / "dataset" / name / "train.json").read_text())
        assert len(test) == t["test"] >= 12 and len(train) == t["train"] > 0
        assert not {r["instruction"] for r in test} & {r["instruction"] for r in train}
        assert not {r["question"] for r in test} & {r["question"] for r in train}
        for r in test + train:
            k = r["label"] + 1
            assert r["answer"] == f"answer{k}" and r["output"] == f"the correct answer is answer{k}"
            assert r["instruction"].endswith("Answer format: " + "/".join(f"answer{j}" for j in
                                                                          range(1, len(r["choices"]) + 1)))
            assert f"Answer{k}: {r['choices'][r['label']]}" in r["instruction"] and r["input"] == ""
        if name == "winowhy":
            assert test[0]["question"].startswith("Prefix line.\n")
    # the gold option sits last in every fixture example: shuffling must move it
    timedial = json.loads((tmp / "commonsense_bb" / "dataset" / "timedial" / "test.json").read_text())
    assert len({r["label"] for r in timedial}) > 1
    full = json.loads((tmp / "commonsense_bb" / "train_full.json").read_text())
    assert len(full) == sum(t["train"] for t in manifest["tasks"].values())
    assert json.loads((tmp / "commonsense_bb" / "train.json").read_text()) == full[:50]
    sums = (tmp / "commonsense_bb" / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 18 and all(len(line.split()[0]) == 64 for line in sums)


def _regime(name, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"regime={name}", *overrides]).regime


def test_commonsense_bb_regime_reads_the_suite(suite):
    tmp, manifest = suite
    s = load_splits(_regime("commonsense_bb", "regime.n_val=5", "regime.n_test=16"), str(tmp))
    assert len(s.train) == 45 and len(s.val) == 5
    assert sorted({e["task"] for e in s.test}) == sorted(manifest["tasks"]) and len(s.test) == 16  # 2 per task
    ex = s.test[0]
    assert ex["prompt"].startswith("Below is an instruction") and ex["target"] == f"the correct answer is {ex['answer']}"
    assert ex["choices"] and ex["answer"] == f"answer{ex['gold'] + 1}"
    patterns = _regime("commonsense_bb").answer_patterns
    assert all(extract_answer(e["task"], e["target"], patterns) == e["answer"] for e in s.test)
    full = load_splits(_regime("commonsense_bb_full", "regime.n_val=5"), str(tmp))
    assert len(full.train) + len(full.val) == sum(t["train"] for t in manifest["tasks"].values())


def test_bb_regimes_for_encoders(suite):
    tmp, _ = suite
    binary = load_splits(_regime("bb_strategyqa"), str(tmp))
    assert {e["label"] for e in binary.test} == {0, 1} and "text_pair" not in binary.test[0]
    pairs = load_splits(_regime("bb_social_iqa", "regime.n_test=3"), str(tmp))
    groups = {e["group"] for e in pairs.test}
    assert len(groups) == 3  # capped by whole questions
    for g in groups:
        rows = [e for e in pairs.test if e["group"] == g]
        assert len(rows) >= 3 and sum(e["label"] for e in rows) == 1
    train_q = {e["text"] for e in pairs.train}
    assert not train_q & {e["text"] for e in pairs.val} and not train_q & {e["text"] for e in pairs.test}


def test_missing_suite_says_make_data(tmp_path):
    from experiments.data import DatasetMissing

    for regime in ("commonsense_bb", "bb_winowhy"):
        with pytest.raises(DatasetMissing, match="make data"):
            load_splits(_regime(regime), str(tmp_path))


def test_unavailable_sdist_is_one_error_line(tmp_path, monkeypatch, capsys):
    """PyPI no longer serves bigbench==1.0.0: the optional build says so in one line and names `make data`."""
    import subprocess

    from experiments import commonsense_suite
    from lrlora import cli

    monkeypatch.setattr(commonsense_suite.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: no"))
    code = cli.call(mk.main, ["--cache", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: bigbench==1.0.0 is not available from the package registry") and "make data" in err[0]
    assert not (tmp_path / "out").exists()
