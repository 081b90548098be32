"""PARA through the harness: compress a finished LoRA run's adapter and score it as a run of its own.

    python -m experiments.para run=outputs/runs/RUN para.keep_energy=0.9      # keep 90% of Σσ² (all modules)
    python -m experiments.para run=RUN para.reduction=0.75 paths.root=results/reproduction   # 75% fewer params

The run's saved adapter (`adapter_dir` of its results file) goes through baselines.para (one global threshold on
the singular values of every ΔW = BA, per-module ranks); the compressed PEFT LoRA adapter is written to a new run
folder next to the source, `runs/{run}__para-keep0.90/adapter` (`__para-red0.75` for a reduction), reloaded on a
fresh backbone and scored with the source run's own protocols through the code experiments.evaluate uses
(`score_adapter`). Its results file, `results/{run}__para-keep0.90.json`, carries the source's identity,
tags + `para`, config + `para`, the compressed adapter's parameter count and `metrics.para` (docs/RESULTS.md,
"PARA runs"). The source run's files are only read. Calling it again with the same setting says the results file
exists and does nothing; a results file of that name from another source (config or adapter) is refused, never
overwritten. Bad input is one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from baselines.core import read_meta
from baselines.para import check_out, check_threshold, compress_peft_lora
from experiments.evaluate import eval_batch_size, provenance, read_run, score_adapter, source_adapter
from experiments.protocols import protocol_config, protocol_names
from experiments.results import git_info, package_versions, peak_memory, write_results
from lrlora._atomic import file_sha256
from lrlora.errors import AdapterError, UnsafeWrite, UserError

NAMES = ("para.keep_energy", "para.reduction")  # how the thresholds are spelt on this command line


def setting_label(keep_energy: float | None = None, reduction: float | None = None) -> str:
    """`para-keep0.90` / `para-red0.75`: two decimals, more only where they are needed to tell settings apart."""
    kind, v = ("keep", keep_energy) if keep_energy is not None else ("red", reduction)
    return f"para-{kind}{v:.2f}" if abs(v - round(v, 2)) < 1e-9 else f"para-{kind}{v:g}"


def para_run_name(source: str, keep_energy: float | None = None, reduction: float | None = None) -> str:
    return f"{source}__{setting_label(keep_energy, reduction)}"


def source_protocols(results: dict) -> dict:
    """The protocols the source run was scored with, with the settings they ran at (its `protocols` record;
    for a results file without one, the protocols its config names)."""
    recorded = results.get("protocols") or {}
    if recorded:
        return {name: protocol_config(name, rec.get("settings")) for name, rec in recorded.items()}
    cfg = OmegaConf.create(results["config"])
    settings = (cfg.get("eval") or {}).get("settings") or {}
    return {name: protocol_config(name, settings.get(name)) for name in protocol_names(cfg)}


def check_lora(adapter: Path, run_name: str) -> None:
    meta = read_meta(adapter)
    peft_cfg = adapter / "adapter_config.json"
    try:
        cfg = json.loads(peft_cfg.read_text()) if peft_cfg.is_file() else {}
    except ValueError as e:
        raise AdapterError(f"{peft_cfg} is corrupt ({e}); the run's adapter cannot be read") from None
    if meta["name"] != "lora" or cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("lora_bias"):
        raise AdapterError(f"run {run_name!r} trained a {meta['name']!r} adapter: PARA through the harness takes a "
                           f"plain LoRA run; for others use python -m baselines.para --adapter {adapter} "
                           f"--base-model PATH (through the dense ΔW)")


def run_para(run: str, keep_energy: float | None = None, reduction: float | None = None,
             results_dir: str | Path = "outputs/results", batch_size: int | None = None,
             device: str = "auto") -> dict:
    """Compress, reload, score and write one PARA run (module docstring); returns its results dict."""
    t0 = time.perf_counter()
    check_threshold(keep_energy, reduction, NAMES)  # every check before anything is read or written
    path, src = read_run(run, results_dir)
    adapter = source_adapter(src, path)
    check_lora(adapter, src["run_name"])
    name = para_run_name(src["run_name"], keep_energy, reduction)
    out_path = path.parent / f"{name}.json"
    run_dir = adapter.parent.parent / name  # next to the source run folder (runs/{run}/adapter)
    para_adapter = run_dir / "adapter"
    # The source config, pointed at the new run (so that experiments.evaluate on it writes into its own folder),
    # plus what PARA did: the results file's config is enough to recompute it.
    config = json.loads(json.dumps(src["config"]))
    config["run_name"] = name
    config.setdefault("paths", {})["output_dir"] = str(run_dir)
    config["para"] = {"keep_energy": keep_energy, "reduction": reduction, "source_run": src["run_name"]}
    source = {"run_name": src["run_name"], "results_file": str(path), "adapter_dir": str(adapter),
              "adapter_sha256": file_sha256(adapter / "adapter_model.safetensors"),
              "params_trainable": (src.get("params") or {}).get("trainable"), "git": src.get("git")}
    if out_path.exists():
        try:
            old = json.loads(out_path.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("config") == config and (old.get("source") or {}).get("adapter_sha256") == source["adapter_sha256"]:
            print(f"[{name}] already done: {out_path} exists (PARA of {src['run_name']} at this setting); "
                  f"nothing to do")
            return old
        raise UnsafeWrite(f"{out_path} exists but was not written from this source run's config and adapter "
                          f"({src['run_name']}, {setting_label(keep_energy, reduction)}): PARA never overwrites a "
                          f"results file; move it away to recompute")
    check_out(adapter, para_adapter)

    t = time.perf_counter()
    result = compress_peft_lora(adapter, para_adapter, keep_energy, reduction)
    para_s = time.perf_counter() - t
    t = time.perf_counter()
    protocols = source_protocols(src)
    metrics, loaded = score_adapter(para_adapter, OmegaConf.create(src["config"]), protocols, run_dir, name,
                                    eval_batch_size(src, batch_size), device)
    eval_s = time.perf_counter() - t
    if loaded["trainable"] != result.params_after:  # the reloaded model must hold what PARA wrote, no more
        raise RuntimeError(f"{para_adapter} reloads with {loaded['trainable']:,} LoRA parameters, PARA wrote "
                           f"{result.params_after:,}")
    metrics["para"] = {"params_before": result.params_before, "params_after": result.params_after,
                       "reduction": result.reduction, "energy_kept": result.energy_kept,
                       "threshold": result.threshold, "ranks": result.ranks_after}
    total = loaded["total"]
    results = {
        "run_name": name, **{k: src.get(k) for k in ("backbone", "adapter", "regime", "r", "seed")},
        "tags": [*(t for t in src.get("tags") or [] if t != "para"), "para"],
        "metrics": metrics,
        "protocols": {n: provenance("experiments.para", OmegaConf.to_container(c, resolve=True))
                      for n, c in protocols.items()},
        # as experiments.train counts them: adapter parameters (here the compressed LoRA's), the head apart
        "params": {"trainable": loaded["trainable"], "total": total,
                   "trainable_percent": 100 * loaded["trainable"] / total, "head": loaded["head"]},
        "adapter_dir": str(para_adapter),
        "source": source,
        "timing": {"wall_s": time.perf_counter() - t0, "para_s": para_s, "eval_s": eval_s},
        "memory": peak_memory(), "device": loaded["device"], "torch_threads": torch.get_num_threads(),
        "git": git_info(), "versions": package_versions(), "config": config,
    }
    write_results(results, path.parent)
    scores = "; ".join(f"{p} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))
                       for p, m in metrics.items() if p != "para")
    print(f"[{name}] LoRA parameters {result.params_before:,} -> {result.params_after:,} "
          f"({100 * result.reduction:.1f}% fewer), ΔW energy kept {100 * result.energy_kept:.2f}%, "
          f"threshold σ >= {result.threshold:.4g}; {scores} -> {out_path}")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="para")
def main(cfg: DictConfig) -> None:
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    try:
        run_para(str(cfg.run), cfg.para.keep_energy, cfg.para.reduction, cfg.paths.results_dir, cfg.batch_size,
                 cfg.device)
    except UserError as e:  # the user's to fix: one line, no stack trace
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
