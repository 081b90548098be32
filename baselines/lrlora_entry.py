"""LR-LoRA (this project's method, `lrlora/`) behind the common interface, through PEFT like LoRA.

    handle = apply_adapter(model, name="lrlora", r=8, target_modules=["query", "value"], K=50, L=3.0)

The kwargs are `LRLoRAConfig`'s fields. The model is a `peft.PeftModel` with the `lrlora` PEFT method
(`lrlora.peft`, whose layers run the library's ΔW and fused op), so LR-LoRA shares the PEFT entries'
body: one save format (`save_pretrained`), one merge, one loader. Adapters saved in the library's own
format (`lrlora.save_adapter`, and harness runs from before this change) still load: they are converted
exactly (`lrlora.peft.library_to_peft`) on the way in.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from baselines.core import register
from baselines.peft_methods import ADAPTER, PeftAdapted
from lrlora.config import LRLoRAConfig
from lrlora.errors import ConfigError


@register("lrlora")
class LRLoRA(PeftAdapted):
    label = "LR-LoRA"
    dropout_field = "dropout"

    @classmethod
    def validate(cls, kwargs):
        """Every check of `LRLoRAConfig` (its fields, ranges and combinations), with its message."""
        super().validate(kwargs)
        try:
            LRLoRAConfig(**kwargs)
        except ConfigError:
            raise
        except TypeError as e:  # a keyword LRLoRAConfig does not have
            raise ConfigError(f"{e}; see lrlora/config.py for the fields") from None

    @classmethod
    def parameters_per_module(cls, d_in, d_out, r=8, K=50, learn_bandwidth=True, **_):
        # A and B, plus σ's amplitudes and (when learned) bandwidths; σ per module (share="none", the default)
        return r * (d_in + d_out) + K * (2 if learn_bandwidth else 1)

    def _config(self, r=8, target_modules=None, dropout=0.0, modules_to_save=None, **rest):
        from lrlora.peft import LRLoRAPeftConfig

        return LRLoRAPeftConfig(**self._peft_kwargs(r, target_modules, dropout, modules_to_save, rest))

    @torch.no_grad()
    def sigma_arguments(self):
        from lrlora.peft import LAYER_ATTR
        from lrlora.rank import sigma_argument

        return {name: sigma_argument(getattr(m, LAYER_ATTR)[ADAPTER]) for name, m in self.tuner_layers().items()}

    @classmethod
    def _load(cls, base_model, directory: Path, kwargs):
        import lrlora.peft  # registers the method before PEFT reads the folder

        config = json.loads((Path(directory) / "adapter_config.json").read_text())
        if "peft_type" in config:
            return super()._load(base_model, directory, kwargs)
        with tempfile.TemporaryDirectory() as tmp:  # a library-format folder
            return super()._load(base_model, lrlora.peft.library_to_peft(directory, Path(tmp) / "peft"), kwargs)
