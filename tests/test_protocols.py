"""Evaluation protocols (experiments/protocols): the registry, the GLUE metrics, and the paper's commonsense
generation protocol batched with left padding, on tiny random-weight backbones (CPU, seconds)."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from experiments.backbones import tiny_model
from experiments.data import alpaca_prompt
from experiments.protocols import EvalContext, UnknownProtocol, protocol_config, run_protocol
from experiments.protocols.commonsense_gen import extract_answer, generate, strict_answer
from experiments.protocols.forward import choice_accuracy, task_metrics


def test_unknown_protocol_names_the_known_ones():
    with pytest.raises(UnknownProtocol, match="Known protocols: .*commonsense_gen.*glue"):
        protocol_config("nope")
    with pytest.raises(UnknownProtocol, match="known: .*glue"):
        run_protocol("nope", EvalContext(model=None, processor=None, regime=None), {})


def test_protocol_config_merges_overrides():
    cfg = protocol_config("commonsense_gen", {"limit": 3})
    assert cfg.limit == 3 and cfg.batch_size == 8 and cfg.name == "commonsense_gen"


def test_glue_metrics_are_the_standard_ones():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    pred = np.array([1, 1, 0, 0, 0, 1, 1, 0])
    m = task_metrics(np.eye(2)[pred], labels, "classification")
    # TP 3, FP 1, FN 1, TN 3: accuracy 6/8, F1 = 2*3/(2*3+1+1), Matthews = (9-1)/sqrt(4*4*4*4)
    assert m == pytest.approx({"accuracy": 0.75, "f1": 0.75, "matthews": 0.5})
    assert "f1" not in task_metrics(np.eye(3)[[0, 1, 2]], np.array([0, 1, 1]), "classification")
    r = task_metrics(np.array([[1.0], [2.0], [3.0], [5.0]]), np.array([1.0, 2.0, 3.0, 4.0]), "regression")
    assert r["spearman"] == pytest.approx(1.0) and 0.9 < r["pearson"] < 1.0


def test_choice_accuracy_groups_option_pairs_by_question():
    examples = [{"group": 0, "label": 0}, {"group": 0, "label": 1}, {"group": 1, "label": 1}, {"group": 1, "label": 0}]
    logits = np.array([[0.0, 2.0], [0.0, 1.0], [0.0, 3.0], [0.0, 0.5]])  # q0 picks the wrong option, q1 the right
    assert choice_accuracy(logits, examples) == 0.5


def test_answer_extraction_first_match_and_strict():
    assert extract_answer("boolq", "the correct answer is false, not true") == "false"
    assert extract_answer("piqa", "no idea") == ""
    assert extract_answer("x", "answer3 or answer1", {"x": "answer1|answer2"}) == "answer1"
    assert strict_answer("winogrande", "the correct answer is option2") == "option2"
    assert strict_answer("winogrande", "I think option2") == ""
    with pytest.raises(KeyError, match="answer_patterns"):
        extract_answer("unknown_task", "answer1")


@pytest.fixture(scope="module")
def tiny_decoder():
    model, tok = tiny_model("decoder", "causal_lm", 2)
    return model.eval(), tok


PROMPTS = [alpaca_prompt(q) for q in ("Is the sky blue?", "Pick one.\n\nAnswer1: a cat sat on the mat today "
                                      "Answer2: dogs\n\nAnswer format: answer1/answer2", "x", "Why " * 12)]


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batched_generation_equals_batch_one(tiny_decoder, num_beams):
    """Left padding + attention mask: each prompt continues as it would alone (theirs runs batch 1)."""
    model, tok = tiny_decoder
    batched = generate(model, tok, PROMPTS, num_beams, 12, batch_size=4)
    single = generate(model, tok, PROMPTS, num_beams, 12, batch_size=1)
    assert batched == single
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) == len(PROMPTS)  # the batch really was padded
    if num_beams == 1:
        return
    # the same left-padded batch attending to its padding (no mask) continues differently: the test can fail
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = side
    out = model.generate(input_ids=enc["input_ids"], attention_mask=torch.ones_like(enc["input_ids"]),
                         num_beams=num_beams, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True) != single
    assert all(batched), "a random model still generates tokens"


def test_commonsense_gen_writes_every_prediction(tiny_decoder, tmp_path):
    model, tok = tiny_decoder
    test = [{"prompt": p, "answer": "answer1", "task": t} for p, t in zip(PROMPTS, ["a", "a", "b", "b"])]
    regime = OmegaConf.create({"task": "causal_lm", "generation": {"num_beams": 2, "max_new_tokens": 4},
                               "answer_patterns": {"a": "answer1|answer2", "b": "answer1|answer2"}})
    ctx = EvalContext(model=model, processor=tok, regime=regime, test=test, batch_size=2, out_dir=tmp_path)
    m = run_protocol("commonsense_gen", ctx, protocol_config("commonsense_gen"))
    rows = [json.loads(line) for line in open(tmp_path / m["predictions"])]  # relative to the run folder
    assert len(rows) == 4 and m["n"] == 4 and m["num_beams"] == 2 and m["max_new_tokens"] == 4
    for task in ("a", "b"):
        hits = [r["correct"] for r in rows if r["task"] == task]
        assert m["tasks"][task] == {"accuracy": np.mean(hits), "n": 2,
                                    "strict_accuracy": np.mean([r["strict_correct"] for r in rows if r["task"] == task])}
    assert m["accuracy"] == pytest.approx((m["tasks"]["a"]["accuracy"] + m["tasks"]["b"]["accuracy"]) / 2)
    assert all(r["prediction"] == extract_answer(r["task"], r["response"], regime.answer_patterns) for r in rows)


def test_merged_model_scores_like_the_adapter(tiny_decoder):
    """The generation protocol merges the adapter first (RandLoRA): same logits as the unmerged model."""
    from baselines import apply_adapter
    from experiments.protocols import merged_model

    model, tok = tiny_model("decoder", "causal_lm", 2)
    handle = apply_adapter(model, name="lrlora", r=2, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for p in handle.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(5, 100, (2, 7))
    with torch.no_grad():
        before = handle.model(input_ids=x).logits
        ctx = EvalContext(model=handle.model, processor=tok, regime=None, adapter=handle)
        after = merged_model(ctx)(input_ids=x).logits
    assert ctx._merged and merged_model(ctx) is ctx.model
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_lm_eval_scores_local_tasks_offline(tiny_decoder, tmp_path, monkeypatch):
    """lm-eval's HFLM on the in-memory model, task YAMLs generated from the test examples, no hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny_decoder
    test = [{"task": t, "question": f"question {i} of {t}?", "choices": ["yes", "no", "it depends"][: 2 + i % 2],
             "gold": i % 2, "answer": "answer1", "prompt": "p"} for t in ("a", "b") for i in range(5)]
    ctx = EvalContext(model=model, processor=tok, regime=OmegaConf.create({"task": "causal_lm"}), test=test,
                      batch_size=4, out_dir=tmp_path)
    m = run_protocol("lm_eval", ctx, protocol_config("lm_eval", {"limit": 4}))
    rows = [json.loads(line) for line in open(tmp_path / m["predictions"])]  # relative to the run folder
    assert m["task_source"] == "local" and m["n"] == 8 and len(rows) == 8
    assert (tmp_path / "lm_eval_tasks" / "a.yaml").exists()
    for task in ("a", "b"):
        t = m["tasks"][task]
        mine = [int(np.argmax(r["loglikelihoods"]) == r["gold"]) for r in rows if r["task"] == task]
        assert t["n"] == 4 and t["acc"] == pytest.approx(np.mean(mine)) and t["acc_stderr"] > 0
        assert 0 <= t["acc_norm"] <= 1
    assert m["acc"] == pytest.approx((m["tasks"]["a"]["acc"] + m["tasks"]["b"]["acc"]) / 2)
    assert [len(r["loglikelihoods"]) for r in rows if r["task"] == "a"] == [2, 3, 2, 3]


def test_lm_eval_without_options_says_what_to_do(tiny_decoder, tmp_path):
    model, tok = tiny_decoder
    ctx = EvalContext(model=model, processor=tok, regime=OmegaConf.create({"task": "causal_lm"}),
                      test=[{"prompt": "p", "answer": "true", "task": "boolq"}], out_dir=tmp_path)
    with pytest.raises(ValueError, match="protocol.tasks="):
        run_protocol("lm_eval", ctx, protocol_config("lm_eval"))


def test_evaluate_rescores_a_finished_run(tmp_path, monkeypatch):
    """experiments.evaluate reloads the saved adapter and reproduces the training run's own test metrics,
    merging them into the results file without touching anything else."""
    import subprocess
    import sys
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from experiments.evaluate import evaluate_run
    from experiments.train import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[
            "backbone=tiny_encoder", "regime=bbc_news", "adapter=lrlora", "adapter.r=2", "logger=none",
            "trainer.max_steps=2", "trainer.progress=false", "trainer.num_threads=1", f"paths.root={tmp_path}",
            "regime.n_train=16", "regime.n_val=8", "regime.n_test=8", "regime.max_length=32",
            "regime.train.batch_size=8"])
    trained = run(cfg)
    path = tmp_path / "results" / f"{trained['run_name']}.json"
    before = json.loads(path.read_text())
    assert before["protocols"]["glue"]["by"] == "experiments.train"

    m = evaluate_run(str(tmp_path / "runs" / trained["run_name"]), protocol_config("glue"), tmp_path / "results")
    after = json.loads(path.read_text())
    assert m["accuracy"] == before["metrics"]["glue"]["accuracy"]
    assert m["loss"] == pytest.approx(before["metrics"]["glue"]["loss"], rel=1e-5)
    assert after["protocols"]["glue"]["by"] == "experiments.evaluate"
    assert {k: v for k, v in after.items() if k != "protocols"} == {
        k: v for k, v in before.items() if k != "protocols"} | {"metrics": {**before["metrics"], "glue": m}}

    # the command line: a run name, a protocol setting, and a one-line error for a run that does not exist
    cmd = [sys.executable, "-m", "experiments.evaluate", f"run={trained['run_name']}", "protocol=glue",
           "protocol.limit=4", f"paths.root={tmp_path}", "num_threads=1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(path.read_text())["metrics"]["glue"]["n"] == 4
    p = subprocess.run([*cmd[:3], "run=nope", "protocol=glue", f"paths.root={tmp_path}"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0 and "error: no results file for run 'nope'" in p.stderr and "Traceback" not in p.stderr


def test_every_regime_names_registered_protocols():
    """Each regime's default protocols exist as a function and a YAML; each YAML has its function."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from experiments.protocols import CONF_DIR, PROTOCOLS, _load_all

    _load_all()
    assert {p.stem for p in CONF_DIR.glob("*.yaml")} <= set(PROTOCOLS)
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for path in sorted((conf / "regime").glob("[!_]*.yaml")):
            regime = compose("train", overrides=[f"regime={path.stem}"]).regime
            for name in regime.protocols:
                assert name in PROTOCOLS and protocol_config(name).name == name, (path.stem, name)


def test_unknown_protocol_fails_before_training(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "experiments.train", "backbone=tiny_encoder", "regime=bbc_news", "logger=none",
           "eval.protocols=[glue,nope]", f"paths.root={tmp_path}", "trainer.num_threads=1", "regime.n_train=8"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "error: unknown protocol 'nope'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("state.pt"))


def test_lm_eval_hub_tasks_offline_say_what_to_do(tiny_decoder, tmp_path, monkeypatch):
    from experiments.data import DatasetMissing

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny_decoder
    ctx = EvalContext(model=model, processor=tok, regime=OmegaConf.create({"task": "causal_lm"}), out_dir=tmp_path)
    with pytest.raises(DatasetMissing, match="need the Hugging Face hub.*mirror them"):
        run_protocol("lm_eval", ctx, protocol_config("lm_eval", {"tasks": ["boolq"], "limit": 2}))
