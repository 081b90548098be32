"""`vision`: top-1 accuracy on the test split, images prepared by the backbone's own image processor
(experiments/data.py's collate), as in the paper's Tables 8 and 9.

    python -m experiments.evaluate run=RUN protocol=vision
"""

from __future__ import annotations

from experiments.protocols import EvalContext, protocol
from experiments.protocols.forward import evaluate


@protocol("vision", tasks=("image_classification",))
def vision(ctx: EvalContext, cfg) -> dict:
    if ctx.regime.task != "image_classification":
        raise ValueError(f"protocol vision scores image_classification regimes, not {ctx.regime.task!r}")
    test = ctx.test[: cfg.limit] if cfg.get("limit") else ctx.test
    m = evaluate(ctx.model, test, ctx.collate, "image_classification", ctx.batch_size, ctx.device, ctx.autocast)
    return {"top1": m["accuracy"], "loss": m["loss"], "n": len(test)}
