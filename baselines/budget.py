"""Parameter-count formulas per method, and the hyperparameter that meets a target "% trainable".

    from baselines import match_budget, parameter_count
    match_budget(model, "randlora", 0.35, ["q_proj", "v_proj"])   # -> {"r": ...}
    parameter_count(model, "lora", ["q_proj", "v_proj"], r=16)     # adapter params, heads excluded

The % is of the backbone's parameters (`AdaptedModel.total_parameters()`). Each formula is the
method's own (per adapted linear d_in -> d_out), checked against real counts in
tests/test_baselines.py, so a matched budget is exact and not an estimate.
"""

from __future__ import annotations

import math

from torch import nn

from baselines.core import count_parameters, matches_target


def target_shapes(model: nn.Module, target_modules) -> list[tuple[int, int]]:
    """(d_in, d_out) of every nn.Linear a method would adapt."""
    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and matches_target(n, target_modules)]


def _randlora(i, o, r):
    n = math.ceil(min(i, o) / r)  # bases needed for full rank (PEFT RandLoRA)
    return r * n + n * min(i, o)


# method -> (the knob match_budget turns, per-module count given (d_in, d_out, **kwargs))
FORMULAS = {
    "lora": ("r", lambda i, o, r=8, **_: r * (i + o)),
    "dora": ("r", lambda i, o, r=8, **_: r * (i + o) + o),
    "vera": ("r", lambda i, o, r=256, **_: r + o),
    "randlora": ("r", lambda i, o, r=32, **_: _randlora(i, o, r)),
    "adalora": ("r", lambda i, o, r=12, **_: r * (i + o + 1)),
    "sinelora": ("r", lambda i, o, r=8, **_: r * (i + o)),
    "dylora": ("r", lambda i, o, r=8, **_: r * (i + o)),
    "elalora": ("r", lambda i, o, r=8, r_max=None, **_: (2 * r if r_max is None else r_max) * (i + o + 1)),
    "nola": ("num_basis", lambda i, o, num_basis_A=64, num_basis_B=64, **_: num_basis_A + num_basis_B),
    "lrlora": ("r", lambda i, o, r=8, K=50, learn_bandwidth=True, **_: r * (i + o) + K * (2 if learn_bandwidth else 1)),
}


def parameter_count(model: nn.Module, method: str, target_modules, **kwargs) -> int:
    """Trainable adapter parameters `method` adds to `model` (heads in modules_to_save excluded).

    For lrlora the formula is the default per-module transfer function (share="none")."""
    return _count(method, target_shapes(model, target_modules), kwargs)


def _count(method: str, shapes: list[tuple[int, int]], kwargs: dict) -> int:
    if method not in FORMULAS:
        raise ValueError(f"no parameter formula for {method!r}; known: {sorted(FORMULAS)}")
    _, per_module = FORMULAS[method]
    return sum(per_module(i, o, **kwargs) for i, o in shapes)


def _knob_kwargs(method: str, value: int) -> dict:
    knob, _ = FORMULAS[method]
    if knob == "num_basis":
        return {"num_basis_A": value, "num_basis_B": value}
    return {knob: value}


def match_budget(model: nn.Module, method: str, target_pct: float, target_modules, max_value: int = 4096,
                 **fixed) -> dict:
    """The kwargs (e.g. {"r": 10}) whose trainable % of `model`'s parameters is closest to `target_pct`.

    `fixed` holds the method's other kwargs (e.g. r for nola). Ties go to the smaller value.
    """
    total, shapes = count_parameters(model), target_shapes(model, target_modules)
    best = None
    for value in range(1, max_value + 1):
        pct = 100.0 * _count(method, shapes, {**fixed, **_knob_kwargs(method, value)}) / total
        if best is None or abs(pct - target_pct) < best[0]:
            best = (abs(pct - target_pct), _knob_kwargs(method, value))
    return best[1]


def budget_percent(model: nn.Module, method: str, target_modules, **kwargs) -> float:
    return 100.0 * parameter_count(model, method, target_modules, **kwargs) / count_parameters(model)
