"""Parameter budgets: how many parameters a method adds, and the setting that meets a target "% trainable".

    from baselines import match_budget, parameter_count
    match_budget(model, "randlora", 0.35, ["q_proj", "v_proj"])   # -> {"r": ...}
    parameter_count(model, "lora", ["q_proj", "v_proj"], r=16)     # adapter params, heads excluded

The % is of the backbone's parameters (`AdaptedModel.total_parameters()`). Each method gives its own count
per adapted linear d_in -> d_out (`parameters_per_module` on its class), checked against real counts in
tests/test_baselines.py, so a matched budget is exact and not an estimate.
"""

from __future__ import annotations

from torch import nn

from baselines.core import count_parameters, get_method
from lrlora.targets import find_targets


def target_shapes(model: nn.Module, target_modules) -> list[tuple[int, int]]:
    """(d_in, d_out) of every nn.Linear a method would adapt."""
    return [(m.in_features, m.out_features) for _, m in find_targets(model, target_modules, non_linear="skip")]


def parameter_count(model: nn.Module, method: str, target_modules, **kwargs) -> int:
    """Trainable adapter parameters `method` adds to `model` (heads in modules_to_save excluded)."""
    return _count(method, target_shapes(model, target_modules), kwargs)


def _count(method: str, shapes: list[tuple[int, int]], kwargs: dict) -> int:
    per_module = get_method(method).parameters_per_module
    return sum(per_module(i, o, **kwargs) for i, o in shapes)


def match_budget(model: nn.Module, method: str, target_pct: float, target_modules, max_value: int = 4096,
                 **fixed) -> dict:
    """The kwargs (e.g. {"r": 10}) whose trainable % of `model`'s parameters is closest to `target_pct`.

    `fixed` holds the method's other kwargs (e.g. r for nola). Ties go to the smaller value.
    """
    knob = get_method(method).budget_kwargs
    total, shapes = count_parameters(model), target_shapes(model, target_modules)
    best = None
    for value in range(1, max_value + 1):
        pct = 100.0 * _count(method, shapes, {**fixed, **knob(value)}) / total
        if best is None or abs(pct - target_pct) < best[0]:
            best = (abs(pct - target_pct), knob(value))
    return best[1]


def budget_percent(model: nn.Module, method: str, target_modules, **kwargs) -> float:
    return 100.0 * parameter_count(model, method, target_modules, **kwargs) / count_parameters(model)
