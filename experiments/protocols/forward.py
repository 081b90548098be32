"""One pass over labelled examples: mean loss plus the task's metrics. The training loop's validation and the
`glue` / `vision` protocols all call `evaluate`, so the number a run is selected on and the number it reports
are computed the same way.

    m = evaluate(model, examples, collate, task="classification", batch_size=32, device="cpu")
    # {"loss", "accuracy", "matthews", "f1"?} | {"loss", "pearson", "spearman"} | {"loss"} (causal_lm)

Metrics come from scikit-learn and scipy (GLUE's own definitions: CoLA Matthews, MRPC F1, STS-B Pearson and
Spearman), not from formulas written here.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch

from lrlora.errors import NonFiniteError, UserError
from lrlora.model import merged


class NoExamples(UserError, ValueError):
    """Nothing to score: a metric over no examples is not a result."""


def task_metrics(logits: np.ndarray, labels: np.ndarray, task: str) -> dict:
    """accuracy + Matthews (+ F1 of class 1 for binary tasks), or Pearson + Spearman for regression."""
    if task == "regression":
        from scipy.stats import pearsonr, spearmanr

        pred = logits.reshape(-1)
        if np.ptp(pred) == 0 or np.ptp(labels) == 0:  # a constant prediction has no correlation: say so, no NaN
            return {"pearson": 0.0, "spearman": 0.0}
        return {"pearson": float(pearsonr(pred, labels)[0]), "spearman": float(spearmanr(pred, labels)[0])}
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    pred = logits.argmax(-1)
    out = {"accuracy": float(accuracy_score(labels, pred)), "matthews": float(matthews_corrcoef(labels, pred))}
    if logits.shape[-1] == 2:
        out["f1"] = float(f1_score(labels, pred, zero_division=0.0))
    return out


def choice_accuracy(logits: np.ndarray, examples) -> float:
    """Multiple choice posed as (question, option) pairs labelled 1 for the right option: the share of
    questions whose highest-scoring option is the right one (`group` ties the pairs of one question)."""
    best: dict = {}
    for ex, row in zip(examples, logits):
        score = float(row[1] - row[0])
        g = ex["group"]
        if g not in best or score > best[g][0]:
            best[g] = (score, ex["label"] == 1)
    return float(np.mean([hit for _, hit in best.values()]))


@torch.no_grad()
def predict(model, examples, collate, task: str, batch_size: int, device, autocast=None):
    """(mean loss, logits or None, labels or None); the loss is token-averaged for causal LM."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: the callers check it is a positive integer")
    if len(examples) == 0:  # a loss of 0 over nothing would read as a result
        raise NoExamples("there are no examples to score (an empty split, or a limit that keeps none); check the "
                         "data and the protocol's limit")
    was_training = model.training
    model.eval()
    total_loss, total_weight, logits_all, labels_all = 0.0, 0, [], []
    # LR-LoRA's ΔW once per evaluation, folded into the weights (given back bit for bit after), not σ per batch
    with merged(model):
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
    loss = total_loss / max(total_weight, 1)
    if not math.isfinite(loss):
        raise NonFiniteError(f"evaluation loss is {loss}: the model's outputs are not finite, so there is no score; "
                             f"the adapter diverged: retrain with a lower regime.train.lr")
    if not logits_all:
        return loss, None, None
    return loss, np.concatenate(logits_all), np.concatenate(labels_all)


def evaluate(model, examples, collate, task: str, batch_size: int, device, autocast=None) -> dict:
    """Mean loss over the examples plus the task's metrics (classification, regression, image classification)."""
    loss, logits, labels = predict(model, examples, collate, task, batch_size, device, autocast)
    metrics = {"loss": loss}
    if logits is not None:
        metrics.update(task_metrics(logits, labels, "regression" if task == "regression" else "classification"))
        if examples and "group" in examples[0]:
            metrics["choice_accuracy"] = choice_accuracy(logits, examples)
    return metrics
