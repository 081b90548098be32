"""Every baseline of the paper behind one interface, plus PARA (post-hoc rank allocation).

    from baselines import apply_adapter, load_adapted, ADAPTERS
    handle = apply_adapter(model, name="lora", r=8, target_modules=["query", "value"],
                           modules_to_save=["classifier"])
    handle.trainable_parameters(), handle.total_parameters(), handle.delta_weights()
    handle.on_step(step, total_steps)   # after every optimizer step, before zero_grad
    handle.save("out/adapter"); handle2 = load_adapted(fresh_model, "out/adapter")
    merged = handle.merge_and_unload()

A new method: subclass `AdaptedModel` (or `baselines.layers.SelfWrittenAdapted`), decorate it
with `@register("name")`, add `conf/adapter/name.yaml` and one row in tests/test_baselines.py.
"""

# Importing the method modules fills the registry.
from baselines import dylora, elalora, lrlora_entry, nola, peft_methods, sinelora  # noqa: F401
from baselines.budget import match_budget, parameter_count
from baselines.core import ADAPTERS, AdaptedModel, apply_adapter, load_adapted, register

__all__ = ["ADAPTERS", "AdaptedModel", "apply_adapter", "load_adapted", "match_budget", "parameter_count",
           "register"]
