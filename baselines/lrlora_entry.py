"""LR-LoRA (this project's method, `lrlora/`) behind the common interface.

    handle = apply_adapter(model, name="lrlora", r=8, target_modules=["query", "value"], K=50, L=3.0)

The kwargs are `LRLoRAConfig`'s fields; all the work is `lrlora`'s own (inject, merge, save, load).
"""

from __future__ import annotations

from pathlib import Path

import torch

from baselines.core import AdaptedModel, register


@register("lrlora")
class LRLoRA(AdaptedModel):
    def _apply(self, model, **kwargs):
        from lrlora import LRLoRAConfig, apply_lrlora

        kwargs["modules_to_save"] = list(kwargs.get("modules_to_save") or [])  # YAML null -> []
        return apply_lrlora(model, LRLoRAConfig(**kwargs))

    def modules(self):
        from lrlora import lrlora_modules

        return lrlora_modules(self.model)

    @torch.no_grad()
    def delta_weights(self):
        return {name: m.delta_weight().detach().float().clone() for name, m in self.modules().items()}

    def merge_and_unload(self):
        from lrlora import merge_and_unload

        return merge_and_unload(self.model)

    def _save_files(self, directory: Path) -> None:
        from lrlora import save_adapter

        save_adapter(self.model, str(directory))

    @classmethod
    def _load(cls, base_model, directory, kwargs):
        from lrlora import load_adapter

        self = cls._bare(base_model, kwargs)
        self.model = load_adapter(base_model, str(directory))
        return self
