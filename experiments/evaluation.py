"""Evaluation protocols: validation loss + task metrics, and generation scored by answer extraction.

    metrics = evaluate(model, examples, collate, task="classification", batch_size=32, device=...)
    metrics = generate_and_score(model, tokenizer, examples, num_beams=4, max_new_tokens=32)

Commonsense answers are scored like the LLM-Adapters/RandLoRA harness (BASELINES.md): the text after
"### Response:", FIRST regex match per task == label ("accuracy"); "strict_accuracy" also requires the
response to be exactly "the correct answer is <label>".
"""

from __future__ import annotations

import re
from collections import defaultdict
from contextlib import nullcontext

import numpy as np
import torch

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


def extract_answer(task: str, response: str) -> str:
    """The first match of the task's pattern in the response ('' when none)."""
    found = re.findall(ANSWER_PATTERNS[task], response.strip())
    return found[0] if found else ""


def strict_answer(task: str, response: str) -> str:
    m = re.fullmatch(rf"the correct answer is ({ANSWER_PATTERNS[task]})\.?", response.strip())
    return m.group(1) if m else ""


def _matthews(pred, labels) -> float:
    classes = np.unique(np.concatenate([pred, labels]))
    c = np.array([[np.sum((labels == a) & (pred == b)) for b in classes] for a in classes], dtype=float)
    t, p, n = c.sum(1), c.sum(0), c.sum()
    cov = np.trace(c) * n - t @ p
    denom = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float(cov / denom) if denom > 0 else 0.0


def _f1_binary(pred, labels) -> float:
    tp = np.sum((pred == 1) & (labels == 1))
    denom = np.sum(pred == 1) + np.sum(labels == 1)
    return float(2 * tp / denom) if denom > 0 else 0.0


@torch.no_grad()
def evaluate(model, examples, collate, task: str, batch_size: int, device, autocast=None) -> dict:
    """Mean loss over examples (+ accuracy etc. for classification). Token-averaged for causal LM."""
    was_training = model.training
    model.eval()
    total_loss, total_weight, logits_all, labels_all = 0.0, 0, [], []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size]).items()}
        with autocast() if autocast else nullcontext():
            out = model(**batch)
        if task == "causal_lm":
            n = int((batch["labels"][:, 1:] != -100).sum())
        else:
            n = len(batch["labels"])
            logits_all.append(out.logits.float().cpu().numpy())
            labels_all.append(batch["labels"].cpu().numpy())
        total_loss += float(out.loss) * n
        total_weight += n
    model.train(was_training)
    metrics = {"loss": total_loss / max(total_weight, 1)}
    if task != "causal_lm" and logits_all:
        logits, labels = np.concatenate(logits_all), np.concatenate(labels_all)
        if task == "regression":
            from scipy.stats import pearsonr, spearmanr

            pred = logits.reshape(-1)
            metrics.update(pearson=float(pearsonr(pred, labels)[0]), spearman=float(spearmanr(pred, labels)[0]))
        else:
            pred = logits.argmax(-1)
            metrics.update(accuracy=float((pred == labels).mean()), matthews=_matthews(pred, labels))
            if logits.shape[-1] == 2:
                metrics["f1"] = _f1_binary(pred, labels)
    return metrics


@torch.no_grad()
def generate_and_score(model, tokenizer, examples, num_beams: int = 4, max_new_tokens: int = 32,
                       batch_size: int = 8, device="cpu") -> dict:
    """Generate a response per prompt; per-task and mean accuracy by first-match (and strict) extraction."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the end of every prompt
    hits, strict = defaultdict(list), defaultdict(list)
    samples = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        enc = tokenizer([ex["prompt"] for ex in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}  # no token_type_ids for a decoder
        out = model.generate(**enc, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for ex, text in zip(chunk, texts):
            response = text.split("### Response:")[-1]
            hits[ex["task"]].append(extract_answer(ex["task"], response) == ex["answer"])
            strict[ex["task"]].append(strict_answer(ex["task"], response) == ex["answer"])
            if len(samples) < 5:
                samples.append({"task": ex["task"], "answer": ex["answer"], "response": response[:200]})
    tokenizer.padding_side = side
    model.train(was_training)
    per_task = {t: float(np.mean(v)) for t, v in hits.items()}
    return {
        "accuracy": float(np.mean(list(per_task.values()))) if per_task else float("nan"),
        "strict_accuracy": float(np.mean([np.mean(v) for v in strict.values()])) if strict else float("nan"),
        "per_task": per_task,
        "samples": samples,
    }
