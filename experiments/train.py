"""The harness entry point: prepare (checks, backbone, adapter, run folder) -> fit (the loop) -> score
(the protocols) -> record (the results file).

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
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from experiments import guard, hydra_cli
from experiments.backbones import build_backbone
from experiments.data import load_splits, make_collate
from experiments.evaluate import provenance
from experiments.identity import adapter_kwargs
from experiments.loop import train, truncate_metrics
from experiments.protocols import EvalContext, check_fits, protocol_config, protocol_names, run_protocol
from experiments.results import (
    RunResult,
    git_info,
    mechanism_stats,
    package_versions,
    peak_memory,
    rank_stats,
    recorded_path,
    write_results,
)
from experiments.tracking import SigmaSnapshots, Tracker, plot_transfer_functions
from lrlora.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
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
    per run folder (a second launch is refused); a run that fails before its first checkpoint leaves no folder.

    prepare (every check, then the backbone and adapter, then the run folder) -> fit (the loop) -> score (the
    best-by-validation adapter saved, its ranks, the regime's protocols) -> record (the results file)."""
    with guard.run_lock(cfg), guard.no_leftovers(Path(cfg.paths.output_dir)):
        prepared = prepare(cfg)
        if isinstance(prepared, dict):  # already done: its results file
            return prepared
        tracker = Tracker(cfg, prepared.out_dir, prepared.config, enabled=prepared.accelerator.is_main_process)
        loop = fit(prepared, tracker)
        scored = score(prepared, loop, tracker)
        return record(prepared, loop, scored, tracker).to_dict()


@dataclass
class Prepared:
    """What prepare() built and checked, for the stages after it."""

    cfg: DictConfig
    t_start: float                 # wall time covers the whole run (a resumed run adds its earlier time)
    out_dir: Path
    config: dict                   # the resolved config
    data: object                   # the splits (experiments.data)
    data_hash: str
    fingerprint: str
    decision: guard.Decision
    eval_cfgs: dict                # protocol name -> its settings
    accelerator: object
    handle: object                 # the adapted model (baselines.AdaptedModel)
    processor: object
    kwargs: dict                   # the adapter's keyword arguments (experiments.identity.adapter_kwargs)
    params: dict                   # trainable, total, trainable_percent, head
    git: dict
    collate: object


@dataclass
class Scored:
    """What score() measured on the best-by-validation weights."""

    metrics: dict
    protocols: dict
    ranks: dict
    mechanism: dict
    adapter_dir: Path
    adapter_extra: dict


def prepare(cfg: DictConfig) -> Prepared | dict:
    """Checks before anything slow or anything on disk (config, protocols, data, whether the run folder is ours),
    then the backbone and the adapter, then the run folder; the finished run's results dict when it is done."""
    t_start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
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
    return Prepared(cfg, t_start, out_dir, config, data, data_hash, fingerprint, decision, eval_cfgs, accelerator,
                    handle, processor, kwargs,
                    {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total,
                     "head": head}, git, collate)


def fit(p: Prepared, tracker: Tracker) -> dict:
    """The loop (experiments/loop.py), from the checkpoint when resuming; returns its summary. The best-by-
    validation weights are in the model afterwards."""
    cfg = p.cfg
    try:
        # σ at chosen steps for fig_sigma (App. I): a loop callback
        callbacks = [SigmaSnapshots(p.handle, p.out_dir, cfg.trainer.get("sigma_snapshots"),
                                    p.kwargs["target_modules"])]
        return train(p.handle, p.data, p.collate, cfg, p.accelerator, tracker, p.out_dir,
                     resume=p.decision.action == "resume", fingerprint=p.fingerprint, t_start=p.t_start,
                     meta={"git": p.git}, callbacks=callbacks)
    except BaseException:
        tracker.finish()
        raise


def score(p: Prepared, loop: dict, tracker: Tracker) -> Scored:
    """The best-by-validation adapter saved, the stable ranks and mechanism of every ΔW, and the regime's
    protocols on the test split."""
    cfg, accelerator, handle, regime = p.cfg, p.accelerator, p.handle, p.cfg.regime
    model = handle.model

    # The best-by-validation adapter, loadable with baselines.load_adapted and the input of
    # `python -m experiments.para adapter_dir={output_dir}/adapter` (atomic, like every save here).
    adapter_dir = p.out_dir / "adapter"
    if accelerator.is_main_process:
        handle.save(adapter_dir)
    ranks, mechanism = {}, {}
    if cfg.trainer.compute_ranks:
        deltas = handle.delta_weights()
        ranks = rank_stats(deltas, p.kwargs["target_modules"])
        mechanism = mechanism_stats(deltas, cfg.adapter.get("r"), handle.sigma_arguments())
    adapter_extra = handle.extra_results()
    if accelerator.is_main_process and cfg.logger.get("log_transfer_plot", True):
        fig = plot_transfer_functions(model, p.out_dir / "transfer_functions.png", p.kwargs["target_modules"])
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
        ctx = EvalContext(model=accelerator.unwrap_model(model), processor=p.processor, regime=regime,
                          test=p.data.test, collate=p.collate, device=accelerator.device,
                          autocast=accelerator.autocast, batch_size=loop["micro_batch_size"] * 2, out_dir=p.out_dir,
                          run_name=cfg.run_name, adapter=handle)
        for name, pcfg in p.eval_cfgs.items():
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
    return Scored(metrics, protocols, ranks, mechanism, adapter_dir, adapter_extra)


def record(p: Prepared, loop: dict, scored: Scored, tracker: Tracker) -> RunResult:
    """The results file (docs/RESULTS.md), the W&B summary, and the run folder marked done."""
    cfg, accelerator = p.cfg, p.accelerator
    wall = time.perf_counter() - p.t_start
    results = RunResult(
        run_name=cfg.run_name, backbone=cfg.backbone.name, adapter=cfg.adapter.name,
        regime=cfg.regime.name, r=cfg.adapter.get("r"), seed=cfg.seed, tags=list(cfg.get("tags") or []),
        metrics=scored.metrics,
        protocols=scored.protocols,
        params=p.params,
        stable_ranks=scored.ranks,
        mechanism=scored.mechanism,
        adapter_dir=recorded_path(scored.adapter_dir, cfg.paths.root),  # relative to the root: a copy stands alone
        data_fingerprint=p.data_hash,  # experiments.evaluate scores only the data the run was trained on
        adapter_extra=scored.adapter_extra,
        timing={"wall_s": wall, "train_s": loop["train_time"],
                "tokens_per_s": loop["tokens"] / loop["train_time"] if loop["train_time"] else None,
                "samples_per_s": loop["samples"] / loop["train_time"] if loop["train_time"] else None},
        memory=peak_memory(),
        loop={k: loop[k] for k in ("total_steps", "steps_per_epoch", "eval_every", "lr", "warmup_steps",
                                   "micro_batch_size", "epoch")},
        device=str(accelerator.device), precision=accelerator.mixed_precision,
        world_size=accelerator.num_processes, torch_threads=torch.get_num_threads(),
        git=git_info(), versions=package_versions(), config=p.config,
    )
    if accelerator.is_main_process:
        path = write_results(results, cfg.paths.results_dir)
        tracker.summary({f"{proto}/{k}": v for proto, m in scored.metrics.items() for k, v in m.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if scored.ranks:
            tracker.log_table("stable_ranks", ["module", "type", "layer", "stable_rank"],
                              [[n, r["type"], r["layer"], r["stable_rank"]]
                               for n, r in scored.ranks["per_layer"].items()])
        accelerator.print(f"[{cfg.run_name}] results -> {path} ({wall:.1f} s)")
    tracker.finish()
    if accelerator.is_main_process:
        guard.mark_done(p.out_dir)
    return results


def main(cfg: DictConfig) -> float | None:
    """The Hydra task (experiments.hydra_cli.run_hydra reports its errors: one `error:` line and exit 2 for the user's)."""
    return run(cfg)["metrics"]["train"]["best_val"]  # for Hydra sweepers


if __name__ == "__main__":
    hydra_cli.run_hydra(main, CONF_DIR, "train")
