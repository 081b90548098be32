"""The baselines PEFT already has (LoRA, DoRA, VeRA, RandLoRA, AdaLoRA), behind `AdaptedModel`.

    handle = apply_adapter(model, name="adalora", r=12, target_r=8, target_modules=["query", "value"])

Nothing here re-implements a method: each entry only maps our common kwargs
(`r`, `target_modules`, `dropout`, `modules_to_save`) onto the PEFT config; every other kwarg
goes to the PEFT config unchanged (a wrong name fails there). Save/load are PEFT's own
`save_pretrained` / `PeftModel.from_pretrained`. PEFT is imported where it is used: reading the registry
(a method's label, its parameter formula) costs no PEFT import.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from baselines.core import AdaptedModel, alpha_or_default, register, schedule_steps
from lrlora.errors import AdapterError

ADAPTER = "default"
PREFIX = "base_model.model."


class PeftAdapted(AdaptedModel):
    """Common body of the PEFT entries; a subclass gives only `_config(**kwargs)`."""

    dropout_field = "lora_dropout"

    def _config(self, r=8, target_modules=None, dropout=0.0, modules_to_save=None, **rest):
        raise NotImplementedError

    def _peft_kwargs(self, r, target_modules, dropout, modules_to_save, rest):
        if not target_modules:
            raise ValueError(f"{self.method}: target_modules is required")
        return dict(
            r=r,
            target_modules=list(target_modules),
            modules_to_save=list(modules_to_save) if modules_to_save else None,
            **{self.dropout_field: dropout},
            **rest,
        )

    def _apply(self, model, **kwargs):
        from peft import get_peft_model

        return get_peft_model(model, self._config(**kwargs))

    @classmethod
    def _load(cls, base_model, directory: Path, kwargs):
        weights = Path(directory) / "adapter_model.safetensors"
        try:  # check the weights before PEFT changes the model
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                bad = [k for k in f.keys() if not torch.isfinite(f.get_tensor(k)).all()]
        except Exception as e:
            raise AdapterError(f"{weights} is missing or unreadable ({str(e)[:200]}); re-save the adapter") from None
        if bad:
            raise AdapterError(f"{weights} holds NaN/inf in {bad[0]}: the run that saved it diverged; retrain it")
        from peft import PeftModel

        self = cls._bare(base_model, kwargs)
        self.model = PeftModel.from_pretrained(base_model, str(directory), is_trainable=True)
        return self

    def _save_files(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory))

    def tuner_layers(self) -> dict[str, nn.Module]:
        """Adapted modules (PEFT's BaseTunerLayer) by their name in the original model."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        return {
            name.removeprefix(PREFIX): m
            for name, m in self.model.named_modules()
            if isinstance(m, BaseTunerLayer) and hasattr(m, "get_delta_weight") and ADAPTER in m.active_adapters
            and _has_adapter(m)
        }

    @torch.no_grad()
    def delta_weights(self):
        out = {}
        for name, m in self.tuner_layers().items():
            variant = getattr(m, "lora_variant", {}).get(ADAPTER)
            if variant is None:
                dw = m.get_delta_weight(ADAPTER)
            else:  # DoRA: the update includes the magnitude rescaling; take it from PEFT's own merge
                w0 = m.get_base_layer().weight
                dw = variant.merge_safe(m, ADAPTER, w0.detach().clone()) - w0
            out[name] = dw.detach().float().clone()
        return out

    def merge_and_unload(self) -> nn.Module:
        return self.model.merge_and_unload()


def _has_adapter(m) -> bool:
    # A BaseTunerLayer whose adapter was dropped for this module (e.g. AdaLoRA rank 0) has no entry.
    for attr in ("lora_A", "vera_lambda_b", "randlora_lambda"):
        if hasattr(m, attr):
            return ADAPTER in getattr(m, attr)
    return True


@register("lora")
class LoRA(PeftAdapted):
    """LoRA (PEFT). `lora_alpha` defaults to 2r, as in the RandLoRA/LLM-Adapters harness (docs/SOURCES.md)."""

    label = "LoRA"
    use_dora = False

    @classmethod
    def parameters_per_module(cls, d_in, d_out, r=8, **_):
        return r * (d_in + d_out)

    def _config(self, r=8, target_modules=None, dropout=0.0, modules_to_save=None, lora_alpha=None, **rest):
        from peft import LoraConfig

        kw = self._peft_kwargs(r, target_modules, dropout, modules_to_save, rest)
        return LoraConfig(lora_alpha=alpha_or_default(r, lora_alpha), use_dora=self.use_dora, **kw)


@register("dora")
class DoRA(LoRA):
    """DoRA = PEFT LoRA with `use_dora=True` (magnitude vector per output row)."""

    label = "DoRA"
    use_dora = True

    @classmethod
    def parameters_per_module(cls, d_in, d_out, **kwargs):
        return super().parameters_per_module(d_in, d_out, **kwargs) + d_out  # LoRA's, plus the magnitude vector


@register("vera")
class VeRA(PeftAdapted):
    """VeRA (PEFT): shared frozen random A, B (seeded by `projection_prng_key`), trainable λ_b (d_out), λ_d (r)."""

    label = "VeRA"
    dropout_field = "vera_dropout"
    rank_may_exceed_layer = True  # VeRA's r is the shared projection size (paper: up to 1024 on 768-wide layers)

    @classmethod
    def parameters_per_module(cls, d_in, d_out, r=256, **_):
        return r + d_out

    def _config(self, r=256, target_modules=None, dropout=0.0, modules_to_save=None, **rest):
        from peft import VeraConfig

        rest.setdefault("save_projection", True)  # exact round trip without relying on the PRNG
        return VeraConfig(**self._peft_kwargs(r, target_modules, dropout, modules_to_save, rest))


@register("randlora")
class RandLoRA(PeftAdapted):
    """RandLoRA (PEFT >= 0.16). α set explicitly: default 2r, PEFT's recommendation (docs/SOURCES.md)."""

    label = "RandLoRA"
    dropout_field = "randlora_dropout"

    @classmethod
    def parameters_per_module(cls, d_in, d_out, r=32, **_):
        n = math.ceil(min(d_in, d_out) / r)  # bases needed for full rank (PEFT RandLoRA)
        return r * n + n * min(d_in, d_out)

    def _config(self, r=32, target_modules=None, dropout=0.0, modules_to_save=None, randlora_alpha=None, **rest):
        from peft import RandLoraConfig

        rest.setdefault("save_projection", True)
        kw = self._peft_kwargs(r, target_modules, dropout, modules_to_save, rest)
        return RandLoraConfig(randlora_alpha=alpha_or_default(r, randlora_alpha), **kw)


@register("adalora")
class AdaLoRA(PeftAdapted):
    """AdaLoRA (PEFT). `r` is the initial rank per module (PEFT's `init_r`), `target_r` the average final one.

    `total_step` may be given; otherwise it is set from `on_step(step, total_steps)` on the first call
    (the budget schedule reads it from the shared config object). `tinit`/`tfinal` below 1 are fractions
    of `total_step`. The harness must call `on_step` after `optimizer.step()` and before `zero_grad()`
    (PEFT #432: nothing else calls `update_and_allocate`).

    PEFT behaviours seen here (0.21.2): ranks are MASKED during training (E entries set to 0), not
    shrunk (#1801), so `extra_results()["ranks"]` counts the non-zero E entries; `save` writes the
    tensors cut to the final `rank_pattern` and `load_adapted` rebuilds them at that size, so a reloaded
    handle reports fewer trainable parameters and gives the same ΔW (outputs equal to float rounding).
    A module that ends at rank 0 is saved as 0-size tensors (PEFT warns; reload works in 0.21.2, #1539).
    """

    label = "AdaLoRA"

    @classmethod
    def parameters_per_module(cls, d_in, d_out, r=12, **_):
        return r * (d_in + d_out + 1)

    def _config(self, r=12, target_modules=None, dropout=0.0, modules_to_save=None, target_r=None,
                lora_alpha=None, total_step=None, tinit=0.1, tfinal=0.2, deltaT=1, **rest):
        from peft import AdaLoraConfig

        kw = self._peft_kwargs(r, target_modules, dropout, modules_to_save, rest)
        kw.pop("r")
        self._schedule = dict(tinit=tinit, tfinal=tfinal)
        steps = total_step or 1000  # placeholder until on_step tells the real run length
        return AdaLoraConfig(
            init_r=r, target_r=target_r or max(1, round(2 * r / 3)), lora_alpha=alpha_or_default(r, lora_alpha),
            total_step=steps, deltaT=deltaT, **self._steps(steps), **kw,
        )

    def _steps(self, total):
        return {k: schedule_steps(self._schedule[k], total) for k in ("tinit", "tfinal")}

    def on_step(self, step, total_steps):
        cfg = self.model.peft_config[ADAPTER]
        if self.kwargs.get("total_step") is None and cfg.total_step != total_steps:
            cfg.total_step = total_steps
            for k, v in self._steps(total_steps).items():
                setattr(cfg, k, v)
        self.model.base_model.update_and_allocate(step)

    def training_state(self):
        cfg, alloc = self.model.peft_config[ADAPTER], self.model.base_model.rankallocator
        return {"config": {k: getattr(cfg, k) for k in ("total_step", "tinit", "tfinal", "rank_pattern")},
                "allocator": {k: dict(getattr(alloc, k)) for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}}

    def load_training_state(self, state):
        cfg, alloc = self.model.peft_config[ADAPTER], self.model.base_model.rankallocator
        for k, v in state["config"].items():
            setattr(cfg, k, v)
        for k, v in state["allocator"].items():
            setattr(alloc, k, dict(v))

    def ranks(self) -> dict[str, int]:
        """Per-module rank now: the number of unmasked (non-zero) entries of E."""
        out = {}
        for name, m in self.tuner_layers().items():
            out[name] = int((m.lora_E[ADAPTER] != 0).sum().item())
        return out

    def extra_results(self):
        return {"ranks": self.ranks()}

    @classmethod
    def _load(cls, base_model, directory, kwargs):
        self = super()._load(base_model, directory, kwargs)
        self._schedule = {"tinit": kwargs.get("tinit", 0.1), "tfinal": kwargs.get("tfinal", 0.2)}
        return self
