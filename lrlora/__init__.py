"""LR-LoRA: parameter-efficient fine-tuning with learnable rank, ΔW = σ(BA) (Garg et al., 2026).

Needs torch (and safetensors for save/load) only:

    from lrlora import LRLoRAConfig, apply_lrlora, merge_and_unload, save_adapter, load_adapter, rank_report
    model = apply_lrlora(model, LRLoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...train as usual: only the adapters require grad...
    save_adapter(model, "adapter/")
    print(rank_report(model))               # per-layer stable ranks of ΔW and BA
    model = merge_and_unload(model)         # plain model, zero inference overhead
"""

from lrlora._atomic import atomic_directory, atomic_file, atomic_json, atomic_write
from lrlora.config import LRLoRAConfig
from lrlora.errors import AdapterError, CheckpointError, ConfigError, NonFiniteError, UnsafeWrite, UserError
from lrlora.io import load_adapter, read_adapter_config, save_adapter
from lrlora.layer import AdaptedLinear, LRLoRALinear
from lrlora.model import adapter_parameter_count, apply_lrlora, lrlora_modules, merge_and_unload
from lrlora.ops import sigma, sigma_naive
from lrlora.rank import mechanism, normalized_spectrum, rank_report, sigma_argument, stable_rank
from lrlora.targets import find_targets, layer_index
from lrlora.transfer import BASES, TransferFunction

__all__ = [
    "AdaptedLinear",
    "AdapterError",
    "BASES",
    "CheckpointError",
    "ConfigError",
    "NonFiniteError",
    "UnsafeWrite",
    "UserError",
    "atomic_directory",
    "atomic_file",
    "atomic_json",
    "atomic_write",
    "LRLoRAConfig",
    "LRLoRALinear",
    "TransferFunction",
    "adapter_parameter_count",
    "apply_lrlora",
    "find_targets",
    "layer_index",
    "load_adapter",
    "lrlora_modules",
    "mechanism",
    "merge_and_unload",
    "normalized_spectrum",
    "rank_report",
    "read_adapter_config",
    "save_adapter",
    "sigma",
    "sigma_argument",
    "sigma_naive",
    "stable_rank",
]
__version__ = "0.1.0"
