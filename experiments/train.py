"""The harness entry point: backbone -> adapter -> data -> loop -> evaluation -> results file.

    python -m experiments.train                                   # conf/train.yaml defaults
    python -m experiments.train experiment=demo_bbc_lrlora        # a table row / a named experiment
    python -m experiments.train backbone=smollm2_135m regime=bbc_news_gen adapter=lora adapter.r=8
    python -m experiments.train -m adapter=lora,lrlora seed=42,123        # Hydra multirun
    python -m experiments.train -m hydra/launcher=slurm experiment=...    # the same on SLURM (submitit)
    accelerate launch -m experiments.train ...                    # multi-GPU

Outputs: ${paths.root}/runs/{run_name}/ (run.json, adapter/, checkpoint/, metrics.jsonl, W&B files) and the
results file ${paths.root}/results/{run_name}.json. Re-running the same command resumes from the checkpoint, or
says the run is done (`trainer.force=true` retrains it); a run folder of another configuration is refused
(experiments/guard.py). Every user error is one `error: ...` line.
In Python: `run(cfg)` with a config from Hydra's compose API (see experiments/demo.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from experiments import guard
from experiments.backbones import build_backbone
from experiments.data import load_splits, make_collate
from experiments.evaluate import provenance
from experiments.loop import train, truncate_metrics
from experiments.protocols import EvalContext, check_fits, protocol_config, protocol_names, run_protocol
from experiments.results import (
    git_info,
    mechanism_stats,
    package_versions,
    peak_memory,
    rank_stats,
    recorded_path,
    write_results,
)
from experiments.tracking import SigmaSnapshots, Tracker, plot_transfer_functions
from lrlora import cli
from lrlora.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
HARNESS_KEYS = ("name", "lr")  # adapter-YAML fields the harness reads; everything else goes to apply_adapter


def adapter_kwargs(cfg: DictConfig) -> dict:
    """Join the groups: the adapter's kwargs with target modules from the backbone, dropout from the regime,
    and the new task head (classifier/score) as modules_to_save when the regime classifies."""
    kw = {k: v for k, v in OmegaConf.to_container(cfg.adapter, resolve=True).items() if k not in HARNESS_KEYS}
    if kw.get("target_modules") is None:
        kw["target_modules"] = list(cfg.backbone.target_modules)
    if kw.get("dropout") is None:
        kw["dropout"] = float(cfg.regime.get("adapter_dropout", 0.0))
    if kw.get("modules_to_save") is None:
        kw["modules_to_save"] = list(cfg.backbone.head_modules) if cfg.regime.task != "causal_lm" else []
    return kw


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Fail early, naming the linear layers that exist, when an entry of the backbone's target modules matches
    nothing (each must: a backbone's names are exact, where a method takes PEFT's any-match rule)."""
    from lrlora.targets import find_targets

    find_targets(model, targets, each=True, non_linear="skip",
                 setting="backbone.target_modules (or adapter.target_modules)")


def _accelerator(cfg: DictConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # The console shows progress and results: accelerate's INFO lines (four or more per checkpoint save) are not.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    precision = cfg.trainer.precision
    if precision == "auto":  # the paper's precision on a GPU; CPU autocast in fp16 is not supported
        precision = cfg.regime.train.precision if torch.cuda.is_available() else "no"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)  # several runs in one process (demo, tests)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def num_threads(setting) -> int:
    """'auto': the cores the load average leaves free (at least 1). On a shared CPU, more threads than free
    cores make every op wait for the slowest thread: measured here, MiniLM steps ran 2-4x slower."""
    if setting not in (None, "auto"):
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.cuda.is_available() or setting is None:
        return torch.get_num_threads()
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def run(cfg: DictConfig) -> dict:
    """One run, start to finish (or resumed); returns the results dict that was written. One process at a time
    per run folder (a second launch is refused); a run that fails before its first checkpoint leaves no folder."""
    with guard.run_lock(cfg), guard.no_leftovers(Path(cfg.paths.output_dir)):
        return _run(cfg)


def _run(cfg: DictConfig) -> dict:
    t_start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)

    # Checks before anything slow or anything on disk: config, data, then whether this run folder is ours.
    guard.validate_config(cfg)
    torch.set_num_threads(num_threads(cfg.trainer.num_threads))
    settings = (cfg.get("eval") or {}).get("settings") or {}  # an unknown protocol fails now, not after training
    eval_cfgs = {name: protocol_config(name, settings.get(name)) for name in protocol_names(cfg)}
    for name in eval_cfgs:  # a protocol that cannot score this kind of run: now, not after training
        check_fits(name, cfg.regime, cfg.run_name)
    regime = cfg.regime
    data = load_splits(regime, cfg.paths.data_dir)  # a missing dataset fails before minutes of backbone loading
    guard.check_splits(regime, data)
    config = OmegaConf.to_container(cfg, resolve=True)
    data_hash = guard.data_fingerprint(data)
    fingerprint = guard.run_fingerprint(config, data_hash)
    decision = guard.decide(cfg, config, data_hash, fingerprint)
    if decision.action == "done":
        print(f"[{cfg.run_name}] already done: {Path(cfg.paths.results_dir) / (cfg.run_name + '.json')} "
              f"(trainer.force=true retrains it)")
        return decision.results
    accelerator = _accelerator(cfg)
    accelerator.print(f"[{cfg.run_name}] {regime.name}: train {len(data.train)}, val {len(data.val)}, "
                      f"test {len(data.test)}")

    # backbone -> adapter (seeded: a new head's and the adapter's init; data order and dropout: the loop)
    torch.manual_seed(cfg.seed)
    model, processor = build_backbone(cfg.backbone, regime.task, regime.get("num_labels"), cfg.paths.cache_dir)
    kwargs = adapter_kwargs(cfg)
    check_target_modules(model, kwargs["target_modules"])
    from baselines import apply_adapter

    torch.manual_seed(cfg.seed)  # again: the tiny test backbones reseed to get the same weights every time
    handle = apply_adapter(model, name=cfg.adapter.name, **kwargs)  # validates (rank vs layer) before changing
    trainable, total = handle.trainable_parameters(), handle.total_parameters()
    head = sum(p.numel() for p in handle.model.parameters() if p.requires_grad) - trainable
    if trainable == 0:  # a run that trains nothing is not a result
        raise guard.ConfigError(f"adapter {cfg.adapter.name} with these settings has no trainable parameter; "
                                f"check adapter.target_modules and the adapter's settings")
    accelerator.print(f"[{cfg.run_name}] trainable {trainable:,} / backbone {total:,} "
                      f"({100 * trainable / total:.3f}%), head {head:,}")

    # The run folder is written from here on: only now that every check has passed.
    git = git_info()
    if decision.action == "resume":
        t_start -= decision.checkpoint.get("wall_time", 0.0)  # wall time covers the whole run
        if decision.checkpoint.get("git", {}).get("commit") != git["commit"]:
            accelerator.print(f"[{cfg.run_name}] warning: resuming a checkpoint of commit "
                              f"{decision.checkpoint.get('git', {}).get('commit')} on {git['commit']}")
        truncate_metrics(out_dir / "metrics.jsonl", decision.checkpoint["step"])
    elif accelerator.is_main_process:
        guard.clear_own_outputs(out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        guard.write_run_meta(out_dir, config, data_hash, fingerprint, git)
    collate = make_collate(regime, processor, cfg.backbone.get("image_size", 32))
    # σ at chosen steps for fig_sigma (App. I): wraps handle.on_step, so the loop needs no change
    SigmaSnapshots(handle, out_dir, cfg.trainer.get("sigma_snapshots"), kwargs["target_modules"])

    # loop
    tracker = Tracker(cfg, out_dir, config, enabled=accelerator.is_main_process)
    try:
        loop = train(handle, data, collate, cfg, accelerator, tracker, out_dir, resume=decision.action == "resume",
                     fingerprint=fingerprint, t_start=t_start, meta={"git": git})
    except BaseException:
        tracker.finish()
        raise
    model = handle.model

    # The best-by-validation adapter, loadable with baselines.load_adapted and the input of
    # `python -m experiments.para adapter_dir={output_dir}/adapter` (atomic, like every save here).
    adapter_dir = out_dir / "adapter"
    if accelerator.is_main_process:
        handle.save(adapter_dir)
    ranks, mechanism = {}, {}
    if cfg.trainer.compute_ranks:
        deltas = handle.delta_weights()
        ranks = rank_stats(deltas, kwargs["target_modules"])
        mechanism = mechanism_stats(deltas, cfg.adapter.get("r"), handle.sigma_arguments())
    adapter_extra = handle.extra_results()
    if accelerator.is_main_process and cfg.logger.get("log_transfer_plot", True):
        fig = plot_transfer_functions(model, out_dir / "transfer_functions.png", kwargs["target_modules"])
        if fig:
            tracker.log_figure("transfer_functions", fig)

    # Evaluation of the best-by-validation weights: the regime's protocols (conf/protocol/, or eval.protocols),
    # each adding metrics.<protocol>; `python -m experiments.evaluate` runs the same code on a saved run.
    # Last, because a protocol may merge the adapter into the weights.
    metrics = {"train": {"best_val": loop["best"], "best_val_metric": regime.train.metric,
                         "best_step": loop["best_step"], "final_train_loss": loop["last_loss"],
                         "steps": loop["step"], "stopped_early": loop["stopped_early"]}}
    protocols = {}
    if accelerator.is_main_process:
        ctx = EvalContext(model=accelerator.unwrap_model(model), processor=processor, regime=regime, test=data.test,
                          collate=collate, device=accelerator.device, autocast=accelerator.autocast,
                          batch_size=loop["micro_batch_size"] * 2, out_dir=out_dir, run_name=cfg.run_name,
                          adapter=handle)
        for name, pcfg in eval_cfgs.items():
            try:
                metrics[name] = run_protocol(name, ctx, pcfg)
            except UserError as e:  # a protocol that cannot run here costs neither the run nor the others' numbers
                print(f"error: protocol {name}: {e}", file=sys.stderr)
                protocols[name] = {"failed": str(e), "rerun": f"python -m experiments.evaluate run={cfg.run_name} "
                                                              f"protocol={name}"}
                continue
            protocols[name] = provenance("experiments.train", OmegaConf.to_container(pcfg, resolve=True))
            accelerator.print(f"[{cfg.run_name}] {name}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in metrics[name].items() if isinstance(v, float)))

    wall = time.perf_counter() - t_start
    results = {
        "run_name": cfg.run_name, "backbone": cfg.backbone.name, "adapter": cfg.adapter.name,
        "regime": regime.name, "r": cfg.adapter.get("r"), "seed": cfg.seed, "tags": list(cfg.get("tags") or []),
        "metrics": metrics,
        "protocols": protocols,
        "params": {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total,
                   "head": head},
        "stable_ranks": ranks,
        "mechanism": mechanism,
        "adapter_dir": recorded_path(adapter_dir, cfg.paths.root),  # relative to the root: a copy stands alone
        "data_fingerprint": data_hash,  # experiments.evaluate scores only the data the run was trained on
        "adapter_extra": adapter_extra,
        "timing": {"wall_s": wall, "train_s": loop["train_time"],
                   "tokens_per_s": loop["tokens"] / loop["train_time"] if loop["train_time"] else None,
                   "samples_per_s": loop["samples"] / loop["train_time"] if loop["train_time"] else None},
        "memory": peak_memory(),
        "loop": {k: loop[k] for k in ("total_steps", "steps_per_epoch", "eval_every", "lr", "warmup_steps",
                                       "micro_batch_size", "epoch")},
        "device": str(accelerator.device), "precision": accelerator.mixed_precision,
        "world_size": accelerator.num_processes, "torch_threads": torch.get_num_threads(),
        "git": git_info(), "versions": package_versions(), "config": config,
    }
    if accelerator.is_main_process:
        path = write_results(results, cfg.paths.results_dir)
        tracker.summary({f"{p}/{k}": v for p, m in metrics.items() for k, v in m.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if ranks:
            tracker.log_table("stable_ranks", ["module", "type", "layer", "stable_rank"],
                              [[n, r["type"], r["layer"], r["stable_rank"]] for n, r in ranks["per_layer"].items()])
        accelerator.print(f"[{cfg.run_name}] results -> {path} ({wall:.1f} s)")
    tracker.finish()
    if accelerator.is_main_process:
        guard.mark_done(out_dir)
    return results


def main(cfg: DictConfig) -> float | None:
    """The Hydra task (lrlora.cli.run_hydra reports its errors: one `error:` line and exit 2 for the user's)."""
    return run(cfg)["metrics"]["train"]["best_val"]  # for Hydra sweepers


if __name__ == "__main__":
    cli.run_hydra(main, CONF_DIR, "train")
