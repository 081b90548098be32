"""MT-Bench (Zheng et al. 2023; the paper's Table 5): two-turn answers from the adapted model, each turn graded
1-10 by an LLM judge, as FastChat's `llm_judge` does it (gen_model_answer.py + gen_judgment.py --mode single).

    python -m experiments.evaluate run=RUN protocol=mt_bench protocol.data_dir=/path/to/mt_bench
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 python -m experiments.evaluate run=RUN protocol=mt_bench \
        protocol.judge.model=MODEL                  # any OpenAI-compatible judge (vLLM, `transformers serve`)

Data: the published files, downloaded by the user from FastChat (github.com/lm-sys/FastChat,
fastchat/llm_judge/data/): `mt_bench/question.jsonl`, `mt_bench/reference_answer/gpt-4.jsonl` and
`judge_prompts.jsonl` (beside mt_bench/ there, or inside data_dir). Outputs in ctx.out_dir:
`mt_bench_answers.jsonl` (FastChat's model_answer records) and `mt_bench_judgments.jsonl` (its single-judgment
records), so every score can be audited.

What follows the reference: the model's own chat template with both turns in one conversation (turn 2 sees
answer 1); temperature per category (FastChat's temperature_config), greedy below 1e-4, otherwise sampling with
the model's generation defaults (FastChat passes only do_sample/temperature/max_new_tokens), seed reset per
batch; single-answer grading with `single-v1`(-multi-turn), and `single-math-v1`(-multi-turn) plus the reference
answers for math/reasoning/coding; judge temperature 0, 2,048 tokens; the rating parsed from "[[N]]", falling
back to "[N]"; failed parses excluded from the means and counted. Differences: the judge is reached through
the current `openai` client at any base_url (FastChat: legacy openai<1, OpenAI/Anthropic names only); a judge
error after the client's bounded retries stops the protocol (FastChat records "$ERROR$" and scores -1); ratings
outside `rating_range` (1-10 by default) count as failed parses (FastChat keeps any number); answers are
generated in batches of one temperature with left padding (FastChat: one question at a time).
"""

from __future__ import annotations

import ast
import json
import os
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from experiments.data import DatasetMissing
from experiments.protocols import EvalContext, merged_model, protocol, write_jsonl
from lrlora.errors import UserError

# FastChat fastchat/llm_judge/common.py: temperature_config, NEED_REF_CATS, the two rating patterns.
CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
OTHER_TEMPERATURE = 0.7  # FastChat's value for a category not in the table
NEED_REFERENCE = ("math", "reasoning", "coding")
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
PROMPTS = {  # (reference-based?, multi-turn?) -> judge prompt name in judge_prompts.jsonl
    (False, False): "single-v1", (False, True): "single-v1-multi-turn",
    (True, False): "single-math-v1", (True, True): "single-math-v1-multi-turn",
}
WHERE = ("download them from FastChat (https://github.com/lm-sys/FastChat, folder fastchat/llm_judge/data/: "
         "mt_bench/question.jsonl, mt_bench/reference_answer/gpt-4.jsonl, judge_prompts.jsonl) into one folder "
         "and pass protocol.data_dir=/that/folder (default $LRLORA_DATA/mt_bench, i.e. data/mt_bench)")


class MTBenchError(UserError, RuntimeError):
    """MT-Bench cannot run as configured (no chat template, judge unreachable, nothing parsable); says the fix."""


class MTBenchDataMissing(DatasetMissing, MTBenchError):
    """The published MT-Bench files are not where the config points."""


class JudgeError(MTBenchError):
    """The judge endpoint failed after the client's bounded retries."""


# --- the published files ------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MTBenchDataMissing(f"{path} line {i} is not JSON ({e}); re-download it: {WHERE}") from None
    return rows


def find_files(cfg) -> dict[str, Path]:
    """Paths of the three files, or MTBenchDataMissing naming every missing one and where to get it."""
    data_dir = Path(cfg.data_dir).expanduser()
    questions = data_dir / "question.jsonl"
    references = data_dir / "reference_answer" / f"{cfg.reference_model}.jsonl"
    if cfg.get("judge_prompts"):
        prompts = Path(cfg.judge_prompts).expanduser()
    else:  # FastChat keeps judge_prompts.jsonl one level above mt_bench/; accept it inside data_dir too
        inside, beside = data_dir / "judge_prompts.jsonl", data_dir.parent / "judge_prompts.jsonl"
        prompts = inside if inside.exists() or not beside.exists() else beside
    found = {"questions": questions, "references": references, "judge_prompts": prompts}
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        raise MTBenchDataMissing(f"MT-Bench files not found: {', '.join(missing)}. They are not redistributed "
                                 f"here; {WHERE}")
    return found


def load_bench(cfg) -> tuple[list[dict], dict[int, list[str]], dict[str, dict]]:
    """(questions, reference turns by question id, judge prompts by name), checked for what grading needs."""
    files = find_files(cfg)
    questions = _read_jsonl(files["questions"])
    for q in questions:
        if not {"question_id", "category", "turns"} <= set(q) or not 1 <= len(q["turns"]) <= 2:
            raise MTBenchDataMissing(f"{files['questions']}: question {q.get('question_id')} lacks question_id/"
                                     f"category/turns (one or two): not the MT-Bench format; {WHERE}")
    if cfg.get("question_ids"):
        wanted = set(cfg.question_ids)
        questions = [q for q in questions if q["question_id"] in wanted]
    if cfg.get("n_questions"):
        questions = questions[: cfg.n_questions]
    if not questions:
        raise MTBenchDataMissing(f"no questions selected from {files['questions']} "
                                 f"(check protocol.question_ids / protocol.n_questions)")
    references = {r["question_id"]: r["choices"][0]["turns"] for r in _read_jsonl(files["references"])}
    prompts = {p["name"]: p for p in _read_jsonl(files["judge_prompts"])}
    lacking = [n for n in PROMPTS.values() if n not in prompts]
    if lacking:
        raise MTBenchDataMissing(f"{files['judge_prompts']} lacks the judge prompts {lacking}; {WHERE}")
    for q in questions:
        if q["category"] in NEED_REFERENCE and q["question_id"] not in references:
            if q.get("reference"):  # newer question.jsonl files carry references inline
                references[q["question_id"]] = q["reference"]
            else:
                raise MTBenchDataMissing(f"no reference answer for {q['category']} question {q['question_id']} "
                                         f"in {files['references']}; {WHERE}")
    return questions, references, prompts


def temperature_for(category: str) -> float:
    return CATEGORY_TEMPERATURE.get(category, OTHER_TEMPERATURE)


# --- answers --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(ctx: EvalContext, questions: list[dict], cfg) -> list[dict]:
    """Both turns of every question with the model's chat template; FastChat's answer records."""
    tok = ctx.processor
    template = cfg.get("chat_template") or getattr(tok, "chat_template", None)
    if not template:
        raise MTBenchError("the backbone's tokenizer has no chat template, and MT-Bench answers are generated "
                           "with one: use a chat model (e.g. backbone=smollm2_135m) or set "
                           "protocol.chat_template='<a Jinja chat template>'")
    # merged (ctx.model becomes the merged model): an unmerged LR-LoRA would recompute σ(BA) at every token
    model = merged_model(ctx) if cfg.get("merge", True) else ctx.model
    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"  # every prompt continues from its own last token
    eos = model.generation_config.eos_token_id
    eos = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tok.eos_token_id} - {None})
    by_temperature = defaultdict(list)
    for q in questions:
        by_temperature[temperature_for(q["category"])].append(q)
    answers = {}
    try:
        for temperature, group in sorted(by_temperature.items()):
            for i in range(0, len(group), cfg.batch_size):
                chunk = group[i:i + cfg.batch_size]
                conversations = [[] for _ in chunk]
                turns = [[] for _ in chunk]
                for t in range(max(len(q["turns"]) for q in chunk)):
                    live = [k for k, q in enumerate(chunk) if t < len(q["turns"])]
                    for k in live:
                        conversations[k].append({"role": "user", "content": chunk[k]["turns"][t]})
                    prompts = [tok.apply_chat_template(conversations[k], chat_template=template, tokenize=False,
                                                       add_generation_prompt=True) for k in live]
                    texts = _generate(ctx, prompts, temperature, cfg, eos)
                    for k, text in zip(live, texts):
                        turns[k].append(text)
                        conversations[k].append({"role": "assistant", "content": text})
                for q, ts in zip(chunk, turns):
                    answers[q["question_id"]] = {
                        "question_id": q["question_id"], "answer_id": f"{ctx.run_name}-{q['question_id']}",
                        "model_id": ctx.run_name or "model", "choices": [{"index": 0, "turns": ts}],
                        "tstamp": time.time(), "category": q["category"],
                        "generate_params": {"do_sample": temperature >= 1e-4, "temperature": temperature,
                                            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}}
                print(f"[mt_bench] answered {len(answers)}/{len(questions)}", flush=True)
    finally:
        tok.padding_side = side
        model.train(was_training)
    return [answers[q["question_id"]] for q in questions]


def _generate(ctx: EvalContext, prompts: list[str], temperature: float, cfg, eos: list[int]) -> list[str]:
    tok = ctx.processor
    # The chat template already writes any BOS the model needs; adding special tokens would double it.
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: enc[k].to(ctx.device) for k in ("input_ids", "attention_mask")}
    sample = temperature >= 1e-4  # FastChat: greedy below 1e-4
    kwargs = {"do_sample": True, "temperature": temperature} if sample else {"do_sample": False}
    torch.manual_seed(cfg.seed)  # FastChat seeds each question's sampling (torch.manual_seed(choice index))
    with ctx.autocast() if ctx.autocast else nullcontext():
        out = ctx.model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=eos, **kwargs)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]


# --- judging --------------------------------------------------------------------------------------------
def judge_client(cfg):
    """An `openai.OpenAI` client for the judge: base_url from the config or OPENAI_BASE_URL, key from the
    environment variable the config names (local servers ignore the key, so one is invented for them)."""
    from openai import OpenAI

    base_url = cfg.judge.get("base_url") or os.environ.get("OPENAI_BASE_URL") or None
    key = os.environ.get(cfg.judge.api_key_env)
    if not key:
        if base_url is None:
            raise MTBenchError(f"the judge is OpenAI's API ({cfg.judge.model}) and ${cfg.judge.api_key_env} is "
                               f"not set: export it, or point protocol.judge.base_url (or OPENAI_BASE_URL) at "
                               f"an OpenAI-compatible server")
        key = "unused"
    return OpenAI(base_url=base_url, api_key=key, timeout=cfg.judge.timeout_s, max_retries=cfg.judge.max_retries)


def parse_rating(judgment: str, rating_range=(1, 10)) -> float:
    """FastChat's parse: the first "[[N]]", else the first "[N]"; -1 when none (or, here, outside the range)."""
    match = RATING.search(judgment) or RATING_FALLBACK.search(judgment)
    if not match:
        return -1
    rating = float(ast.literal_eval(match.group(1)))
    if rating_range is not None and not rating_range[0] <= rating <= rating_range[1]:
        return -1
    return rating


def judge_matches(questions, answers, references, prompts) -> list[dict]:
    """One single-answer match per (question, turn): the prompt name and the filled user prompt."""
    matches = []
    for q, a in zip(questions, answers):
        ref_based = q["category"] in NEED_REFERENCE
        fields = {}
        if ref_based:
            ref = references[q["question_id"]]
            fields = {"ref_answer_1": ref[0], "ref_answer_2": ref[1] if len(ref) > 1 else ""}
        ans = a["choices"][0]["turns"]
        for turn in range(1, len(q["turns"]) + 1):
            prompt = prompts[PROMPTS[(ref_based, turn == 2)]]
            if turn == 1:
                user = prompt["prompt_template"].format(question=q["turns"][0], answer=ans[0], **fields)
            else:
                user = prompt["prompt_template"].format(question_1=q["turns"][0], question_2=q["turns"][1],
                                                        answer_1=ans[0], answer_2=ans[1], **fields)
            matches.append({"question_id": q["question_id"], "category": q["category"], "turn": turn,
                            "prompt": prompt, "user_prompt": user})
    return matches


def judge_one(client, cfg, match: dict) -> str:
    from openai import OpenAIError

    messages = [{"role": "system", "content": match["prompt"]["system_prompt"]},
                {"role": "user", "content": match["user_prompt"]}]
    try:
        response = client.chat.completions.create(model=cfg.judge.model, messages=messages, temperature=0,
                                                  max_tokens=cfg.judge.max_tokens)
    except OpenAIError as e:
        raise JudgeError(f"the judge {cfg.judge.model!r} at {client.base_url} failed on question "
                         f"{match['question_id']} turn {match['turn']} after {cfg.judge.max_retries} retries: "
                         f"{type(e).__name__}: {e}. Check protocol.judge.base_url / OPENAI_BASE_URL, "
                         f"${cfg.judge.api_key_env} and protocol.judge.model (answers are saved already)") from None
    return response.choices[0].message.content or ""


def summarise(judgments: list[dict]) -> dict:
    """FastChat's show_result: drop score -1, mean per turn and overall; plus the mean per category."""
    valid = [j for j in judgments if j["score"] != -1]
    if not valid:
        raise MTBenchError(f"the judge gave no parsable rating in {len(judgments)} judgments (none had "
                           f"'[[N]]' or '[N]' with N in range): see mt_bench_judgments.jsonl; a stronger judge "
                           f"model is needed")

    def mean(rows):
        return float(np.mean([j["score"] for j in rows])) if rows else None

    turns = {str(t): mean([j for j in valid if j["turn"] == t]) for t in sorted({j["turn"] for j in judgments})}
    categories = {c: mean([j for j in valid if j["category"] == c]) for c in sorted({j["category"] for j in judgments})}
    return {"score": mean(valid), "turns": turns, "categories": categories, "judged": len(valid),
            "failed_parses": len(judgments) - len(valid)}


@protocol("mt_bench", tasks=("causal_lm",))
def mt_bench(ctx: EvalContext, cfg) -> dict:
    """Answer, judge, average. Returns metrics.mt_bench (docs/RESULTS.md)."""
    if ctx.out_dir is None:  # the answers and judgments are part of the result: they need the run folder
        raise MTBenchError("MT-Bench writes its answers and judgments into the run folder: EvalContext.out_dir "
                           "must be set")
    questions, references, prompts = load_bench(cfg)  # bad paths fail before minutes of generation
    client = judge_client(cfg)
    out_dir = Path(ctx.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    answers_path, judgments_path = out_dir / "mt_bench_answers.jsonl", out_dir / "mt_bench_judgments.jsonl"

    answers = generate_answers(ctx, questions, cfg)
    write_jsonl(answers, answers_path)

    matches = judge_matches(questions, answers, references, prompts)
    rating_range = tuple(cfg.rating_range) if cfg.get("rating_range") else None
    with ThreadPoolExecutor(max_workers=max(1, cfg.judge.parallel)) as pool:
        futures = [pool.submit(judge_one, client, cfg, m) for m in matches]
        try:
            outputs = [f.result() for f in futures]
        except BaseException:  # one failure stops the rest: a dead judge should not be asked 160 times
            for f in futures:
                f.cancel()
            raise
    judgments = [{
        "question_id": m["question_id"], "model": ctx.run_name or "model", "judge": [cfg.judge.model, m["prompt"]["name"]],
        "user_prompt": m["user_prompt"], "judgment": text, "score": parse_rating(text, rating_range),
        "turn": m["turn"], "category": m["category"], "tstamp": time.time(),
    } for m, text in zip(matches, outputs)]
    write_jsonl(judgments, judgments_path)

    metrics = summarise(judgments)
    metrics.update(judge=cfg.judge.model, questions=len(questions), answers=ctx.recorded(answers_path),
                   judgments=ctx.recorded(judgments_path))
    print(f"[mt_bench] score {metrics['score']:.2f} over {metrics['judged']} judgments "
          f"({metrics['failed_parses']} failed parses), judge {cfg.judge.model}", flush=True)
    return metrics
