"""Re-score a finished run with any protocol, without retraining; the metrics join its results file.

    python -m experiments.evaluate run=outputs/runs/RUN protocol=lm_eval
    python -m experiments.evaluate run=RUN protocol=commonsense_gen protocol.limit=50
    python -m experiments.evaluate run=RUN protocol=mt_bench protocol.judge.model=gpt-4

It rebuilds the run's backbone from the config in its results file, loads the saved best adapter
(`adapter_dir`, baselines.load_adapted), reloads the regime's test split and calls the same protocol code as
experiments/train.py. metrics.<protocol> and protocols.<protocol> of that results file are replaced; nothing
else in it changes. Audit files (predictions/*.jsonl) go to the run folder. The scoring itself, `score_adapter`
(an adapter folder + a run config -> metrics), is also what experiments.para scores a compressed adapter with.
"""

from __future__ import annotations

import fcntl
import json
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.backbones import build_backbone
from experiments.data import load_splits, make_collate
from experiments.protocols import EvalContext, run_protocol
from experiments.results import git_info, write_results
from lrlora.errors import UserError


class RunNotFound(UserError, FileNotFoundError):
    """No results file for the run the user named."""


def find_results(run: str, results_dir: str | Path) -> Path:
    """A run folder (its results file sits in ../../results/ under the same root), a results file, or a name."""
    p = Path(run)
    tried = []
    if p.suffix == ".json" and p.is_file():
        return p
    if p.is_dir():
        tried.append(p.resolve().parent.parent / "results" / f"{p.name}.json")
    tried.append(Path(results_dir) / f"{p.name}.json")
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise RunNotFound(f"no results file for run {run!r}: looked for {', '.join(map(str, tried))}. Pass "
                      f"run=<run folder>, run=<results file>, or a run name with paths.root=<the runs' root>")


def provenance(by: str, settings: dict) -> dict:
    return {"settings": settings, "by": by, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git": git_info()}


def merge_into_results(path: Path, name: str, metrics: dict, record: dict) -> dict:
    """Read-modify-write of one results file under an exclusive lock, written atomically (write_results):
    two evaluations finishing together both land, and a reader never sees half a file."""
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        results = json.loads(path.read_text())
        results.setdefault("metrics", {})[name] = metrics
        results.setdefault("protocols", {})[name] = record
        write_results(results, path.parent)
    return results


def score_adapter(adapter_dir: str | Path, rcfg, protocols: dict, out_dir: str | Path, run_name: str,
                  batch_size: int, device: str = "auto"):
    """Score a saved adapter with protocols {name: protocol config} on the test split of the run config `rcfg`
    (its backbone, regime, seed, paths): the one scoring path of experiments.evaluate and experiments.para.
    Returns ({name: metrics}, what was loaded: parameter counts (taken before any protocol may merge the
    adapter) and the device)."""
    from baselines import load_adapted

    regime = rcfg.regime
    data = load_splits(regime, rcfg.paths.data_dir)
    torch.manual_seed(rcfg.seed)
    model, processor = build_backbone(rcfg.backbone, regime.task, regime.get("num_labels"), rcfg.paths.cache_dir)
    handle = load_adapted(model, adapter_dir)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    handle.model.to(dev)
    trainable = handle.trainable_parameters()  # adapter parameters, the head excluded (as experiments.train)
    loaded = {"trainable": trainable, "total": handle.total_parameters(), "device": str(dev),
              "head": sum(p.numel() for p in handle.model.parameters() if p.requires_grad) - trainable}
    ctx = EvalContext(model=handle.model, processor=processor, regime=regime, test=data.test,
                      collate=make_collate(regime, processor, rcfg.backbone.get("image_size", 32)), device=dev,
                      batch_size=batch_size, out_dir=Path(out_dir), run_name=run_name, adapter=handle)
    return {name: run_protocol(name, ctx, pcfg) for name, pcfg in protocols.items()}, loaded


def source_adapter(results: dict, path: Path) -> Path:
    """The run's saved adapter (`adapter_dir`, relative to the checkout the run was started from)."""
    adapter_dir = Path(results["adapter_dir"])
    if not adapter_dir.is_dir():
        raise RunNotFound(f"the run's adapter is not at {adapter_dir} (results file {path}); run from the checkout "
                          f"that trained it")
    return adapter_dir


def read_run(run: str, results_dir: str | Path) -> tuple[Path, dict]:
    """(results file, its contents) of a finished run, checked to be the run it names."""
    path = find_results(run, results_dir)
    results = json.loads(path.read_text())
    if results.get("run_name") and path.stem != results["run_name"]:
        raise RunNotFound(f"{path} holds run {results['run_name']!r}, not {path.stem!r}")
    return path, results


def eval_batch_size(results: dict, batch_size: int | None) -> int:
    return batch_size or 2 * results.get("loop", {}).get("micro_batch_size", 4)


def evaluate_run(run: str, protocol_cfg, results_dir: str | Path = "outputs/results", batch_size: int | None = None,
                 device: str = "auto") -> dict:
    """Score a saved run with one protocol and merge metrics.<protocol> into its results file; returns them."""
    path, results = read_run(run, results_dir)
    rcfg = OmegaConf.create(results["config"])
    name = protocol_cfg.name
    adapter_dir = source_adapter(results, path)
    out_dir = Path(run) if Path(run).is_dir() else Path(rcfg.paths.output_dir)
    scored, _ = score_adapter(adapter_dir, rcfg, {name: protocol_cfg}, out_dir, results["run_name"],
                              eval_batch_size(results, batch_size), device)
    metrics = scored[name]
    merge_into_results(path, name, metrics,
                       provenance("experiments.evaluate", OmegaConf.to_container(protocol_cfg, resolve=True)))
    print(f"[{results['run_name']}] {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                         if isinstance(v, float)) + f" -> {path}")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    try:
        evaluate_run(str(cfg.run), cfg.protocol, cfg.paths.results_dir, cfg.batch_size, cfg.device)
    except UserError as e:  # the user's to fix: one line, no stack trace
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
