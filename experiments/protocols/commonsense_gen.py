"""`commonsense_gen`: the paper's commonsense protocol (Table 1), as LLM-Adapters, DoRA and RandLoRA run it.

    python -m experiments.evaluate run=RUN protocol=commonsense_gen

The Alpaca prompt the model was trained on (experiments.data.alpaca_prompt, the same function at training and
at test), the adapter merged into the weights, deterministic 4-beam search for 32 new tokens, the text after
"### Response:", and the FIRST match of the task's answer pattern (re.findall on the stripped response,
case-sensitive) compared with the label: `accuracy`. `strict_accuracy` also requires the whole response to
be "the correct answer is <label>". Their scripts run batch 1 because they pass no attention mask; here prompts
are batched with left padding and an attention mask, which gives the same predictions (tested). Every
prediction goes to {run folder}/predictions/commonsense_gen.jsonl so any accuracy can be audited.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from experiments.protocols import EvalContext, ProtocolError, merged_model, protocol, write_jsonl

# LLM-Adapters' patterns (commonsense_evaluate.py), plus the offline regimes': the options are numbered
# answer1..answerN in the commonsense_bb suite (conf/regime/commonsense_bb.yaml adds its own per task).
ANSWER_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "bbc_news": r"business|entertainment|politics|sports|tech",
}


def answer_pattern(task: str, extra: dict | None = None) -> str:
    pattern = (extra or {}).get(task) or ANSWER_PATTERNS.get(task)
    if pattern is None:
        raise KeyError(f"no answer pattern for task {task!r}: add it to the regime's answer_patterns "
                       f"(known: {sorted({**ANSWER_PATTERNS, **(extra or {})})})")
    return pattern


def extract_answer(task: str, response: str, extra: dict | None = None) -> str:
    """The first match of the task's pattern in the response ('' when none), as LLM-Adapters scores it."""
    found = re.findall(answer_pattern(task, extra), response.strip())
    return found[0] if found else ""


def strict_answer(task: str, response: str, extra: dict | None = None) -> str:
    """The label only when the response is exactly the trained format "the correct answer is X"."""
    m = re.fullmatch(rf"the correct answer is ({answer_pattern(task, extra)})\.?", response.strip())
    return m.group(1) if m else ""


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], num_beams: int, max_new_tokens: int, batch_size: int,
             device="cpu") -> list[str]:
    """Beam-search continuations of `prompts` (in order), batched with left padding and an attention mask.

    Prompts are grouped by length so a batch pads little; position ids follow the attention mask inside
    `generate`, so a padded prompt continues exactly as it would alone."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # every prompt ends where generation starts
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}  # no token_type_ids
            gen = model.generate(**enc, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(idx, texts):
                out[i] = text
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


@protocol("commonsense_gen", tasks=("causal_lm",))
def commonsense_gen(ctx: EvalContext, cfg) -> dict:
    test = list(ctx.test)
    lacking = next((i for i, ex in enumerate(test) if not str(ex.get("answer") or "").strip()), None)
    if ctx.regime.task != "causal_lm" or not test or lacking is not None:  # never scored on a quiet subset
        where = f": test example {lacking} has no answer (or an empty one); fix the data" if lacking is not None else ""
        raise ProtocolError(f"protocol commonsense_gen needs a causal-LM regime whose test examples all carry an "
                            f"answer (commonsense_*, commonsense_bb, bbc_news_gen){where}")
    if cfg.get("limit"):  # the first n of each task
        by_task: dict = defaultdict(list)
        for ex in test:
            by_task[ex["task"]].append(ex)
        test = [ex for rows in by_task.values() for ex in rows[: cfg.limit]]
    gen = ctx.regime.get("generation") or {}
    num_beams = cfg.get("num_beams") or gen.get("num_beams", 4)
    max_new_tokens = cfg.get("max_new_tokens") or gen.get("max_new_tokens", 32)
    patterns = dict(ctx.regime.get("answer_patterns") or {})
    model = merged_model(ctx) if cfg.get("merge", True) else ctx.model
    texts = generate(model, ctx.processor, [ex["prompt"] for ex in test], num_beams, max_new_tokens,
                     cfg.get("batch_size") or ctx.batch_size, ctx.device)

    hits, strict, rows = defaultdict(list), defaultdict(list), []
    for i, (ex, text) in enumerate(zip(test, texts)):
        response = text.split("### Response:")[-1]  # as their scripts split the decoded output
        pred, pred_strict = extract_answer(ex["task"], response, patterns), strict_answer(ex["task"], response, patterns)
        hits[ex["task"]].append(pred == ex["answer"])
        strict[ex["task"]].append(pred_strict == ex["answer"])
        rows.append({"i": i, "task": ex["task"], "answer": ex["answer"], "prediction": pred,
                     "correct": pred == ex["answer"], "strict_correct": pred_strict == ex["answer"],
                     "response": response, "prompt": ex["prompt"]})
    path = None
    if ctx.out_dir is not None:
        path = write_jsonl(rows, Path(ctx.out_dir) / "predictions" / "commonsense_gen.jsonl")
    tasks = {t: {"accuracy": float(np.mean(hits[t])), "strict_accuracy": float(np.mean(strict[t])),
                 "n": len(hits[t])} for t in hits}
    return {  # means over tasks, as the paper's average column
        "accuracy": float(np.mean([v["accuracy"] for v in tasks.values()])),
        "strict_accuracy": float(np.mean([v["strict_accuracy"] for v in tasks.values()])),
        "n": len(test), "num_beams": num_beams, "max_new_tokens": max_new_tokens, "merged": ctx._merged,
        "tasks": tasks, "predictions": ctx.recorded(path) if path else None,
    }
