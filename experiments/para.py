"""PARA, the one command: compress a finished LoRA run's adapter and score it as a run of its own, or compress
any adapter folder into a plain PEFT LoRA.

    python -m experiments.para run=outputs/runs/RUN para.keep_energy=0.9      # keep 90% of Σσ² (all modules)
    python -m experiments.para run=RUN para.reduction=0.75 paths.root=results/reproduction   # 75% fewer params
    python -m experiments.para adapter_dir=outputs/runs/RUN/adapter out=para90 para.keep_energy=0.9   # a folder only
    python -m experiments.para adapter_dir=DIR out=lora95 para.keep_energy=0.95 base_model=PATH num_labels=5
                                                           # a non-LoRA adapter (LR-LoRA, ...): ΔW formed on its base

With `adapter_dir=DIR out=DIR` (baselines.para does the work) nothing is scored: the compressed PEFT LoRA adapter is
written to `out` and its per-module ranks printed; an adapter other than a plain LoRA needs `base_model=` (and
`num_labels=` for a classifier). `out` is never the input, inside it or around it, nor a folder this code did not
write.

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
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from baselines.core import read_meta
from baselines.para import (
    ParaResult,
    check_out,
    check_threshold,
    compress_handle,
    compress_peft_lora,
    format_ranks,
    load_base,
)
from experiments import hydra_cli
from experiments.evaluate import (
    check_settings,
    checked_data,
    data_fingerprint_of,
    eval_batch_size,
    provenance,
    read_run,
    score_adapter,
    source_adapter,
)
from experiments.guard import check_keys_of
from experiments.identity import result_config
from experiments.protocols import check_fits, protocol_config, protocol_names
from experiments.results import (
    RunResult,
    git_info,
    package_versions,
    peak_memory,
    recorded_path,
    write_results,
)
from lrlora._atomic import file_sha256
from lrlora.errors import AdapterError, AdapterNotFound, ConfigError, UnsafeWrite

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
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
                           f"plain LoRA run; for others use python -m experiments.para adapter_dir={adapter} "
                           f"out=DIR base_model=PATH (through the dense ΔW)")


def run_para(run: str, keep_energy: float | None = None, reduction: float | None = None,
             results_dir: str | Path = "outputs/results", batch_size: int | None = None,
             device: str = "auto") -> dict:
    """Compress, reload, score and write one PARA run (module docstring); returns its results dict."""
    t0 = time.perf_counter()
    check_threshold(keep_energy, reduction, NAMES)  # every check before anything is read or written
    check_settings(batch_size, device)
    path, src = read_run(run, results_dir)
    root = path.resolve().parent.parent  # the root the user chose: everything below is read and written there
    adapter = source_adapter(src, path)
    check_lora(adapter, src["run_name"])
    protocols = source_protocols(src)
    for p in protocols:
        check_fits(p, OmegaConf.create(src["config"]).regime, src["run_name"])
    fingerprint = data_fingerprint_of(path, src)
    data = checked_data(OmegaConf.create(src["config"]), src["run_name"], fingerprint)  # before anything is written
    name = para_run_name(src["run_name"], keep_energy, reduction)
    out_path = path.parent / f"{name}.json"
    run_dir = root / "runs" / name  # next to the source run folder (runs/{run}/adapter)
    para_adapter = run_dir / "adapter"
    # The source config, pointed at the new run (so that experiments.evaluate on it writes into its own folder),
    # plus what PARA did: the results file's config is enough to recompute it.
    config = json.loads(json.dumps(src["config"]))
    config["run_name"] = name
    config.setdefault("paths", {})["output_dir"] = str(run_dir)
    config["para"] = {"keep_energy": keep_energy, "reduction": reduction, "source_run": src["run_name"]}
    source = {"run_name": src["run_name"], "results_file": recorded_path(path, root),
              "adapter_dir": recorded_path(adapter, root),
              "adapter_sha256": file_sha256(adapter / "adapter_model.safetensors"),
              "params_trainable": (src.get("params") or {}).get("trainable"), "git": src.get("git")}
    if out_path.exists():
        try:
            old = json.loads(out_path.read_text())
        except (OSError, ValueError):
            old = {}
        same = result_config(old.get("config") or {}) == result_config(config)  # the paths aside: a copy is the same
        if same and (old.get("source") or {}).get("adapter_sha256") == source["adapter_sha256"]:
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
    metrics, loaded = score_adapter(para_adapter, OmegaConf.create(src["config"]), protocols, run_dir, name,
                                    eval_batch_size(src, batch_size), device, data=data)
    eval_s = time.perf_counter() - t
    if loaded["trainable"] != result.params_after:  # the reloaded model must hold what PARA wrote, no more
        raise RuntimeError(f"{para_adapter} reloads with {loaded['trainable']:,} LoRA parameters, PARA wrote "
                           f"{result.params_after:,}")
    metrics["para"] = {"params_before": result.params_before, "params_after": result.params_after,
                       "reduction": result.reduction, "energy_kept": result.energy_kept,
                       "threshold": result.threshold, "ranks": result.ranks_after}
    total = loaded["total"]
    run_result = RunResult(
        run_name=name, **{k: src.get(k) for k in ("backbone", "adapter", "regime", "r", "seed")},
        tags=[*(t for t in src.get("tags") or [] if t != "para"), "para"],
        metrics=metrics,
        protocols={n: provenance("experiments.para", OmegaConf.to_container(c, resolve=True))
                   for n, c in protocols.items()},
        # as experiments.train counts them: adapter parameters (here the compressed LoRA's), the head apart
        params={"trainable": loaded["trainable"], "total": total,
                "trainable_percent": 100 * loaded["trainable"] / total, "head": loaded["head"]},
        adapter_dir=recorded_path(para_adapter, root),
        data_fingerprint=fingerprint,
        source=source,
        timing={"wall_s": time.perf_counter() - t0, "para_s": para_s, "eval_s": eval_s},
        memory=peak_memory(), device=loaded["device"], torch_threads=torch.get_num_threads(),
        git=git_info(), versions=package_versions(), config=config,
    )
    write_results(run_result, path.parent)
    results = run_result.to_dict()
    scores = "; ".join(f"{p} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))
                       for p, m in metrics.items() if p != "para")
    print(f"[{name}] LoRA parameters {result.params_before:,} -> {result.params_after:,} "
          f"({100 * result.reduction:.1f}% fewer), ΔW energy kept {100 * result.energy_kept:.2f}%, "
          f"threshold σ >= {result.threshold:.4g}; {scores} -> {out_path}")
    return results


def para_folder(adapter: str | Path, out: str | Path, keep_energy: float | None = None,
                reduction: float | None = None, base_model: str | None = None, num_labels: int | None = None,
                max_rank: int | None = None) -> ParaResult:
    """PARA on an adapter folder -> a plain PEFT LoRA adapter in `out` (nothing scored). Every check (threshold,
    input, output) comes before any loading or computing."""
    adapter = Path(adapter)
    check_threshold(keep_energy, reduction, NAMES)
    if not adapter.is_dir():
        raise AdapterNotFound(f"adapter_dir={adapter} does not exist: pass an adapter folder (outputs/runs/RUN/adapter)")
    check_out(adapter, out, names=("adapter_dir", "out"))
    cfg_file = adapter / "adapter_config.json"
    try:
        peft_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except ValueError as e:
        raise AdapterError(f"{cfg_file} is corrupt ({e}); re-save the adapter") from None
    if peft_cfg.get("peft_type") == "LORA" and not peft_cfg.get("use_dora"):
        result = compress_peft_lora(adapter, out, keep_energy, reduction)
    else:
        meta = read_meta(adapter)
        if not base_model:
            raise ConfigError(f"{adapter} holds a {meta['name']!r} adapter, not a plain LoRA: pass base_model=PATH "
                              f"(and num_labels=N for a classifier) so its ΔW can be formed")
        from baselines import load_adapted

        handle = load_adapted(load_base(base_model, num_labels), adapter)
        result = compress_handle(handle, out, keep_energy, reduction, max_rank)
    print(format_ranks(result))
    print(f"wrote {out}")
    return result


def main(cfg: DictConfig) -> None:
    """The Hydra task (experiments.hydra_cli.run_hydra reports its errors: one `error:` line and exit 2 for the user's)."""
    check_keys_of(cfg, CONF_DIR / "para.yaml")
    check_threshold(cfg.para.keep_energy, cfg.para.reduction, NAMES)
    check_settings(cfg.batch_size, cfg.device, cfg.num_threads)
    for key in ("num_labels", "max_rank"):
        if cfg[key] is not None and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1):
            raise ConfigError(f"{key}={cfg[key]!r} must be a positive integer or null")
    if (cfg.run is None) == (cfg.adapter_dir is None):
        raise ConfigError("pass run=RUN (a finished LoRA run, compressed and scored as a run of its own) or "
                          "adapter_dir=DIR out=DIR (an adapter folder, compressed only): exactly one of the two")
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    if cfg.adapter_dir is not None:
        if cfg.out is None:
            raise ConfigError("adapter_dir=DIR needs out=DIR: the folder the compressed PEFT LoRA adapter is written "
                              "to")
        para_folder(str(cfg.adapter_dir), str(cfg.out), cfg.para.keep_energy, cfg.para.reduction, cfg.base_model,
                    cfg.num_labels, cfg.max_rank)
        return
    for key in ("out", "base_model", "num_labels", "max_rank"):
        if cfg[key] is not None:
            raise ConfigError(f"{key}= goes with adapter_dir=DIR; with run=RUN the compressed run goes to "
                              f"runs/RUN__para-.../ under the run's root")
    run_para(str(cfg.run), cfg.para.keep_energy, cfg.para.reduction, cfg.paths.results_dir, cfg.batch_size,
             cfg.device)


if __name__ == "__main__":
    hydra_cli.run_hydra(main, CONF_DIR, "para")
