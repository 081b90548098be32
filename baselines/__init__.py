"""Every baseline of the paper behind one interface, plus PARA (post-hoc rank allocation).

    from baselines import apply_adapter, load_adapted, methods
    handle = apply_adapter(model, name="lora", r=8, target_modules=["query", "value"],
                           modules_to_save=["classifier"])
    handle.trainable_parameters(), handle.total_parameters(), handle.delta_weights()
    handle.on_step(step, total_steps)   # after every optimizer step, before zero_grad
    handle.save("out/adapter"); handle2 = load_adapted(fresh_model, "out/adapter")
    merged = handle.merge_and_unload()
    {name: cls.label for name, cls in methods().items()}     # every method, found in this package

A new method: a module here with a subclass of `AdaptedModel` (or `baselines.layers.SelfWrittenAdapted`)
decorated with `@register("name")`, `conf/adapter/name.yaml`, and one row in tests/test_baselines.py
(CONTRIBUTING.md, "Adding a method").
"""

from baselines.budget import match_budget, parameter_count
from baselines.core import AdaptedModel, apply_adapter, get_method, load_adapted, methods, register

__all__ = ["ADAPTERS", "AdaptedModel", "apply_adapter", "get_method", "load_adapted", "match_budget", "methods",
           "parameter_count", "register"]


def __getattr__(name: str):
    if name == "ADAPTERS":  # the registry, filled on first use (`methods()` imports the method modules)
        return methods()
    raise AttributeError(f"module 'baselines' has no attribute {name!r}")
