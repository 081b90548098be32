"""PARA: post-hoc, data-free rank allocation for a trained LoRA (arXiv 2604.27796), and the same export for
any adapter whose ΔW we can form (LR-LoRA -> plain LoRA of adaptive per-layer rank).

    compress_peft_lora("runs/x/adapter", "runs/x/adapter_para90", keep_energy=0.9)
    compress_handle(load_adapted(base, "runs/y/adapter"), "lora90", keep_energy=0.9)   # any adapter, via its ΔW
    # the command line is experiments.para (one PARA command, with or without scoring):
    python -m experiments.para adapter_dir=runs/x/adapter out=runs/x/adapter_para90 para.keep_energy=0.9

For every adapted module, ΔW = U diag(S) Vᵀ: for a LoRA, cheaply from B = Q_B R_B, Aᵀ = Q_A R_A and the SVD
of the r×r core s·R_B R_Aᵀ; otherwise from the SVD of the dense ΔW. ONE threshold τ on the singular
values, global over all layers, is chosen either to keep a fraction of the total energy Σσ² or to cut
the parameter count by a fraction; each module keeps its σ ≥ τ, as B' = U√S, A' = √S Vᵀ (scaling 1).
The output is a standard PEFT LoRA adapter (`rank_pattern`/`alpha_pattern` per module, target_modules
listing the modules kept), loadable by `peft.PeftModel.from_pretrained`. Modules left at rank 0 are
dropped from target_modules, so no zero-size tensor is ever written (PEFT #1539).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from baselines.core import META_FILE, is_head_param
from lrlora._atomic import atomic_directory, check_writable, verify_checksums
from lrlora.errors import AdapterError, AdapterNotFound, ConfigError, UnsafeWrite

LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
PREFIX = "base_model.model."


@dataclass
class Spectrum:
    """ΔW = U diag(S) Vh of one module (float64), and the parameters its input adapter spent on it."""

    d_in: int
    d_out: int
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    params_before: int


@dataclass
class ParaResult:
    threshold: float
    ranks_before: dict[str, int]
    ranks_after: dict[str, int]
    params_before: int
    params_after: int
    energy_kept: float                      # Σ kept σ² / Σ σ², all modules together
    energy_kept_per_module: dict[str, float] = field(default_factory=dict)

    @property
    def reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def summary(self) -> dict:
        return {
            "threshold": self.threshold, "params_before": self.params_before, "params_after": self.params_after,
            "reduction": self.reduction, "energy_kept": self.energy_kept, "ranks_before": self.ranks_before,
            "ranks_after": self.ranks_after, "energy_kept_per_module": self.energy_kept_per_module,
        }


# --- spectra ---------------------------------------------------------------------------------------
def lora_spectrum(A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, ...]:
    """SVD of scaling·BA in O((d_in + d_out)·r²): QR of B and Aᵀ, then the SVD of the r×r core."""
    A, B = A.double(), B.double()
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(scaling * rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def dense_spectrum(dw: torch.Tensor, max_rank: int | None = None) -> tuple[torch.Tensor, ...]:
    u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
    k = len(s) if max_rank is None else min(max_rank, len(s))
    return u[:, :k], s[:k], vh[:k]


def _lora_scaling(cfg: dict, name: str, r: int) -> float:
    alpha = cfg.get("lora_alpha", 8)
    for key, a in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            alpha = a
            break
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def spectra_from_peft_lora(adapter_dir: str | Path) -> tuple[dict[str, Spectrum], dict, dict]:
    """Read a PEFT LoRA adapter from disk (no base model needed): spectra, its config, its other tensors."""
    adapter_dir = Path(adapter_dir)
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except FileNotFoundError as e:
        raise AdapterNotFound(f"{e.filename} not found: {adapter_dir} is not a complete PEFT adapter folder") from None
    except Exception as e:  # json or safetensors: a truncated or foreign file
        raise AdapterError(f"{adapter_dir} holds an unreadable adapter ({str(e)[:200]}); re-save it") from None
    if verify_checksums(adapter_dir):  # a payload corrupted under an intact header would otherwise be read
        raise AdapterError(f"{adapter_dir / 'adapter_model.safetensors'} is corrupt (its sha256 differs from the one "
                           f"recorded when it was saved); restore the adapter folder from a copy, or re-train the run")
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("lora_bias"):
        raise AdapterError(f"{adapter_dir}: PARA takes a plain LoRA adapter (got peft_type={cfg.get('peft_type')}, "
                         f"use_dora={cfg.get('use_dora')}); for others pass base_model=PATH to go through ΔW")
    factors, other = {}, {}
    for k, v in state.items():
        m = LORA_KEY.match(k)
        if m:
            factors.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            other[k] = v
    spectra = {}
    for name, ab in factors.items():
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        if r == 0:
            continue
        u, s, vh = lora_spectrum(A, B, _lora_scaling(cfg, name, r))
        spectra[name] = Spectrum(A.shape[1], B.shape[0], u, s, vh, r * (A.shape[1] + B.shape[0]))
    return spectra, cfg, other


def spectra_from_handle(handle, max_rank: int | None = None) -> dict[str, Spectrum]:
    """Spectra of any baselines handle through its dense ΔW (e.g. LR-LoRA's σ(BA), which is not low rank).

    params_before is the LoRA-factor count at the handle's own rank r, r·(d_in + d_out) per module."""
    r = int(handle.kwargs.get("r", 0))
    out = {}
    for name, dw in handle.delta_weights().items():
        u, s, vh = dense_spectrum(dw, max_rank)
        out[name] = Spectrum(dw.shape[1], dw.shape[0], u, s, vh, r * (dw.shape[0] + dw.shape[1]))
    return out


def check_threshold(keep_energy: float | None, reduction: float | None,
                    names: tuple[str, str] = ("--keep-energy", "--reduction")) -> None:
    """Exactly one threshold, in range; `names` are how the caller's command line spells the two."""
    ke, red = names
    if (keep_energy is None) == (reduction is None):
        raise ConfigError(f"give exactly one of {ke} or {red}")
    if keep_energy is not None and not (isinstance(keep_energy, (int, float)) and 0 < keep_energy <= 1):
        raise ConfigError(f"{ke} must be in (0, 1], got {keep_energy} (e.g. 0.9 keeps 90% of Σσ²)")
    if reduction is not None and not (isinstance(reduction, (int, float)) and 0 <= reduction < 1):
        raise ConfigError(f"{red} must be in [0, 1), got {reduction} (e.g. 0.8 removes 80% of the parameters)")


def is_para_output(directory: Path) -> bool:
    """An earlier PARA output (ours to replace); a trained adapter is not, so --out never replaces one."""
    return (Path(directory) / "para_report.json").is_file()


def check_out(adapter: str | Path, out: str | Path, names: tuple[str, str] = ("adapter", "out")) -> None:
    """Never write into the input, nor into a non-empty folder that is not an adapter of ours; `names` are how
    the caller's command line spells the two."""
    a, o = Path(adapter).resolve(), Path(out).resolve()
    if o == a or a in o.parents or o in a.parents:
        raise UnsafeWrite(f"{names[1]}={out} is, contains or lies inside the input {names[0]}={adapter}: PARA never "
                          f"writes into its own input; choose a new folder, e.g. {Path(adapter).name}_para")
    check_writable(o, is_para_output, "PARA adapter folder")


# --- the global threshold ----------------------------------------------------------------------------
def allocate(spectra: dict[str, Spectrum], keep_energy: float | None = None, reduction: float | None = None,
             ranks_before: dict[str, int] | None = None) -> ParaResult:
    """One threshold τ for all modules, from a kept-energy fraction or a parameter reduction; ranks = #σ ≥ τ."""
    check_threshold(keep_energy, reduction)
    comps = sorted(((float(sp.S[i]), name) for name, sp in spectra.items() for i in range(len(sp.S))), reverse=True)
    total_energy = sum(s * s for s, _ in comps)
    params_before = sum(sp.params_before for sp in spectra.values())
    kept = 0
    if keep_energy is not None:
        acc = 0.0
        while kept < len(comps) and acc < keep_energy * total_energy * (1 - 1e-12):
            acc += comps[kept][0] ** 2
            kept += 1
    else:
        budget, acc = (1 - reduction) * params_before, 0
        while kept < len(comps):
            cost = spectra[comps[kept][1]].d_in + spectra[comps[kept][1]].d_out
            if acc + cost > budget:
                break
            acc += cost
            kept += 1
    threshold = comps[kept - 1][0] if kept else math.inf
    if kept:  # the threshold, not the count, decides: ties at τ are all kept (one global threshold)
        ranks = {n: int((sp.S >= threshold).sum()) for n, sp in spectra.items()}
    else:
        ranks = {n: 0 for n in spectra}
    per_module = {n: float((sp.S[: ranks[n]] ** 2).sum() / (sp.S**2).sum()) if sp.S.abs().sum() > 0 else 1.0
                  for n, sp in spectra.items()}
    kept_energy = sum(float((sp.S[: ranks[n]] ** 2).sum()) for n, sp in spectra.items())
    return ParaResult(
        threshold=threshold,
        ranks_before=ranks_before or {n: len(sp.S) for n, sp in spectra.items()},
        ranks_after=ranks,
        params_before=params_before,
        params_after=sum(ranks[n] * (sp.d_in + sp.d_out) for n, sp in spectra.items()),
        energy_kept=kept_energy / total_energy if total_energy > 0 else 1.0,
        energy_kept_per_module=per_module,
    )


# --- export --------------------------------------------------------------------------------------------
def write_peft_lora(spectra: dict[str, Spectrum], result: ParaResult, out_dir: str | Path, base_cfg: dict,
                    extra_tensors: dict[str, torch.Tensor] | None = None, dtype=torch.float32) -> Path:
    """Write the truncated modules as a PEFT LoRA adapter (atomically: temp dir, then rename)."""
    out_dir = Path(out_dir)
    kept = {n: k for n, k in result.ranks_after.items() if k > 0}
    if not kept:
        raise ConfigError("the threshold keeps no singular value at all; raise --keep-energy or lower --reduction")
    state = {}
    for name, k in kept.items():
        sp = spectra[name]
        root = sp.S[:k].sqrt()
        state[f"{PREFIX}{name}.lora_B.weight"] = (sp.U[:, :k] * root).to(dtype).contiguous()
        state[f"{PREFIX}{name}.lora_A.weight"] = (root[:, None] * sp.Vh[:k]).to(dtype).contiguous()
    state.update(extra_tensors or {})
    r_max = max(kept.values())
    pattern = {re.escape(n): k for n, k in kept.items()}
    cfg = {k: v for k, v in base_cfg.items() if k in _CARRIED}
    cfg.update(
        peft_type="LORA", r=r_max, lora_alpha=r_max, use_rslora=False, use_dora=False, lora_bias=False,
        target_modules=sorted(kept), rank_pattern=pattern, alpha_pattern=dict(pattern),  # α = r: scaling 1
        lora_dropout=base_cfg.get("lora_dropout", 0.0), inference_mode=True, bias="none",
    )
    meta = {"name": "lora", "kwargs": {"r": r_max, "lora_alpha": r_max, "target_modules": cfg["target_modules"],
                                       "modules_to_save": cfg.get("modules_to_save"), "para": True}}
    with atomic_directory(out_dir, is_ours=is_para_output, what="PARA adapter folder") as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (tmp / "para_report.json").write_text(json.dumps(result.summary(), indent=2))
        # ... and readable by baselines.load_adapted as a "lora" handle, like any adapter the harness saved
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out_dir


_CARRIED = ("base_model_name_or_path", "task_type", "modules_to_save", "revision", "fan_in_fan_out", "auto_mapping")


def head_tensors(handle) -> dict[str, torch.Tensor]:
    """The handle's modules_to_save weights under the keys a PEFT adapter file uses."""
    out = {}
    for n, p in handle.model.named_parameters():
        if is_head_param(n, handle.modules_to_save) and ".original_module." not in n:
            n = n.removeprefix(PREFIX).replace(".modules_to_save.default", "")
            out[PREFIX + n] = p.detach().float().contiguous().clone()
    return out


def compress_peft_lora(adapter_dir, out_dir, keep_energy=None, reduction=None) -> ParaResult:
    """PARA on a PEFT LoRA adapter directory -> a PEFT LoRA adapter with per-layer ranks."""
    spectra, cfg, other = spectra_from_peft_lora(adapter_dir)
    before = {n: len(sp.S) for n, sp in spectra.items()}
    result = allocate(spectra, keep_energy, reduction, before)
    write_peft_lora(spectra, result, out_dir, cfg, other)
    return result


def compress_handle(handle, out_dir, keep_energy=None, reduction=None, max_rank=None, task_type=None) -> ParaResult:
    """PARA through the dense ΔW of any baselines handle (LR-LoRA -> plain LoRA of adaptive rank)."""
    spectra = spectra_from_handle(handle, max_rank)
    r = int(handle.kwargs.get("r", 0))
    result = allocate(spectra, keep_energy, reduction, {n: r for n in spectra})
    cfg = {"modules_to_save": handle.modules_to_save or None, "task_type": task_type}
    write_peft_lora(spectra, result, out_dir, cfg, head_tensors(handle))
    return result


# --- what the command line (experiments.para) uses ------------------------------------------------------
def load_base(path: str, num_labels: int | None):
    """The base model a non-LoRA adapter was trained on (a classifier with `num_labels`, else a causal LM)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        if num_labels:
            return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        return AutoModelForCausalLM.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"base_model={path} could not be loaded ({str(e).splitlines()[0][:200]}); pass the "
                          f"folder of the base model the adapter was trained on") from None


def format_ranks(result: ParaResult) -> str:
    width = max(len(n) for n in result.ranks_after)
    lines = [f"{'module':<{width}}  before  after  energy kept"]
    for n in result.ranks_after:
        lines.append(f"{n:<{width}}  {result.ranks_before[n]:>6}  {result.ranks_after[n]:>5}  "
                     f"{result.energy_kept_per_module[n]:>10.4f}")
    lines.append(f"threshold σ >= {result.threshold:.4g}; parameters {result.params_before:,} -> "
                 f"{result.params_after:,} ({100 * result.reduction:.1f}% fewer); energy kept "
                 f"{100 * result.energy_kept:.2f}%")
    return "\n".join(lines)
