"""`glue`: every classification / regression regime (GLUE, bbc_news, bb_<task>) on its test split, each task's
own metric as the paper and RandLoRA report it: CoLA Matthews, STS-B Pearson and Spearman, MRPC accuracy
and F1, the rest accuracy. GLUE test labels are hidden, so GLUE regimes test on the validation split
(experiments/data.py), as LoRA, VeRA and RandLoRA do.

    python -m experiments.evaluate run=RUN protocol=glue
"""

from __future__ import annotations

from experiments.protocols import EvalContext, protocol
from experiments.protocols.forward import evaluate


@protocol("glue", tasks=("classification", "regression"))
def glue(ctx: EvalContext, cfg) -> dict:
    if ctx.regime.task not in ("classification", "regression"):
        raise ValueError(f"protocol glue scores classification/regression regimes, not {ctx.regime.task!r}")
    test = ctx.test[: cfg.limit] if cfg.get("limit") else ctx.test
    metrics = evaluate(ctx.model, test, ctx.collate, ctx.regime.task, ctx.batch_size, ctx.device, ctx.autocast)
    return {**metrics, "n": len(test)}
