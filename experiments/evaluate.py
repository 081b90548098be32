"""Re-score a finished run with any protocol, without retraining; the metrics join its results file.

    python -m experiments.evaluate run=outputs/runs/RUN protocol=lm_eval
    python -m experiments.evaluate run=RUN protocol=commonsense_gen protocol.limit=50
    python -m experiments.evaluate run=RUN protocol=mt_bench protocol.judge.model=gpt-4

It rebuilds the run's backbone from the config in its results file, loads the saved best adapter
(`adapter_dir`, baselines.load_adapted), reloads the regime's test split and calls the same protocol code as
experiments/train.py. metrics.<protocol> and protocols.<protocol> of that results file are replaced; nothing
else in it changes. Audit files (predictions/*.jsonl) go to the run folder. The scoring itself, `score_adapter`
(an adapter folder + a run config -> metrics), is also what experiments.para scores a compressed adapter with.

Checked before anything is read or written: every setting (batch size, device, threads, the protocol's own)
and that the protocol scores this kind of run; before the backbone loads: that the data is the data the run was
trained on (its fingerprint). Every path is taken under the root of the results file named (`run=COPY/runs/X`
or `paths.root=COPY`): re-scoring a copied outputs folder reads and writes the copy only.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from experiments import guard, hydra_cli
from experiments.backbones import build_backbone
from experiments.data import load_splits, make_collate
from experiments.protocols import EvalContext, check_fits, check_protocol_settings, run_protocol
from experiments.results import git_info, path_under_root, write_results
from lrlora._atomic import exclusive_lock
from lrlora.errors import ConfigError, UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class RunNotFound(UserError, FileNotFoundError):
    """No results file for the run the user named."""


class DataChanged(UserError, ValueError):
    """The data a run would be scored on is not the data it was trained with."""


def check_settings(batch_size=None, device="auto", num_threads=None) -> torch.device:
    """The command's own settings, before anything is read: a batch size or thread count that is a positive
    integer (or null), a device torch has. Returns the device."""
    for key, value in (("batch_size", batch_size), ("num_threads", num_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value!r} must be a positive integer, or null for the default")
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise ConfigError(f"device={text!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    if text.startswith("cuda") and (not torch.cuda.is_available() or
                                    int(text.partition(":")[2] or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device={text} but torch sees {torch.cuda.device_count()} GPU(s); use device=cpu or "
                          f"device=auto")
    if text == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device=mps but torch has no MPS backend here; use device=cpu or device=auto")
    return torch.device(text)


def check_run_arg(cfg) -> None:
    if OmegaConf.is_missing(cfg, "run"):
        raise ConfigError("run= is required: pass run=<run folder> (outputs/runs/NAME), run=<results file> or "
                          "run=<run name> (with paths.root=<its root>)")


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
    two evaluations finishing together both land, and a reader never sees half a file. The lock file lives in
    the temp folder and is removed after."""
    with exclusive_lock(path):
        results = _read_json(path)
        results.setdefault("metrics", {})[name] = metrics
        results.setdefault("protocols", {})[name] = record
        write_results(results, path.parent)
    return results


def checked_data(rcfg, run_name: str, fingerprint: str | None):
    """The run's train/val/test splits, loaded from its config, checked (every field its task needs, no empty
    answer) and, given the fingerprint it was trained with, confirmed to be that data: data that changed since
    is refused (DataChanged) before anything loads or is written."""
    regime = rcfg.regime
    data = load_splits(regime, rcfg.paths.data_dir)
    guard.check_splits(regime, data)
    if fingerprint is not None and guard.data_fingerprint(data) != fingerprint:
        raise DataChanged(f"the data of regime {regime.name} (under {rcfg.paths.data_dir}) is not the data run "
                          f"{run_name} was trained and tested on (its fingerprint differs): nothing was scored. "
                          f"Restore that data, or train a run on the new data")
    return data


def score_adapter(adapter_dir: str | Path, rcfg, protocols: dict, out_dir: str | Path, run_name: str,
                  batch_size: int, device: str = "auto", fingerprint: str | None = None, data=None):
    """Score a saved adapter with protocols {name: protocol config} on the test split of the run config `rcfg`
    (its backbone, regime, seed, paths): the one scoring path of experiments.evaluate and experiments.para.
    `fingerprint`: the data fingerprint the run was trained with (checked_data; `data`: splits it already
    checked). Returns ({name: metrics}, what was loaded: parameter counts (taken before any protocol may merge
    the adapter) and the device)."""
    from baselines import load_adapted

    dev = check_settings(batch_size, device)
    regime = rcfg.regime
    for name in protocols:
        check_fits(name, regime, run_name)
    if data is None:
        data = checked_data(rcfg, run_name, fingerprint)
    torch.manual_seed(rcfg.seed)
    model, processor = build_backbone(rcfg.backbone, regime.task, regime.get("num_labels"), rcfg.paths.cache_dir)
    handle = load_adapted(model, adapter_dir)
    handle.model.to(dev)
    trainable = handle.trainable_parameters()  # adapter parameters, the head excluded (as experiments.train)
    loaded = {"trainable": trainable, "total": handle.total_parameters(), "device": str(dev),
              "head": sum(p.numel() for p in handle.model.parameters() if p.requires_grad) - trainable}
    ctx = EvalContext(model=handle.model, processor=processor, regime=regime, test=data.test,
                      collate=make_collate(regime, processor, rcfg.backbone.get("image_size", 32)), device=dev,
                      batch_size=batch_size, out_dir=Path(out_dir), run_name=run_name, adapter=handle)
    return {name: run_protocol(name, ctx, pcfg) for name, pcfg in protocols.items()}, loaded


def source_adapter(results: dict, path: Path) -> Path:
    """The run's saved adapter: `runs/<run_name>/adapter` under the root of its results file `path` (the root
    the user chose; a path recorded elsewhere is refused, never followed)."""
    adapter_dir = path_under_root(path, results.get("adapter_dir") or "", f"runs/{results['run_name']}/adapter")
    if not adapter_dir.is_dir():
        raise RunNotFound(f"the run's adapter is not at {adapter_dir} (results file {path}): a results file is "
                          f"re-scored from the outputs folder it sits in, with its runs/ folder beside it")
    return adapter_dir


def run_folder(path: Path, results: dict) -> Path:
    """Where a run's audit files go: runs/<run_name> under the root of its results file."""
    return path.resolve().parent.parent / "runs" / results["run_name"]


def data_fingerprint_of(path: Path, results: dict) -> str:
    """The fingerprint of the data the run was trained on: its results file's, else its run folder's run.json."""
    if results.get("data_fingerprint"):
        return results["data_fingerprint"]
    meta = run_folder(path, results) / guard.RUN_META
    try:
        return json.loads(meta.read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataChanged(f"{path} records no data fingerprint, and {meta} is missing or unreadable: the data this "
                          f"run was trained on cannot be confirmed, so it is not scored; re-train the run") from None


def _read_json(path: Path) -> dict:
    try:
        results = json.loads(Path(path).read_text())
    except ValueError as e:
        raise RunNotFound(f"{path} is truncated or not JSON ({e}); restore it from a copy or re-run that run "
                          f"(nothing was changed)") from None
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict) or not results.get("run_name"):
        raise RunNotFound(f"{path} is not a results file of a run (no run_name or config); pass a run's results file")
    return results


def read_run(run: str, results_dir: str | Path) -> tuple[Path, dict]:
    """(results file, its contents) of a finished run, checked to be the run it names."""
    path = find_results(run, results_dir)
    results = _read_json(path)
    if path.stem != results["run_name"]:
        raise RunNotFound(f"{path} holds run {results['run_name']!r}, not {path.stem!r}")
    return path, results


def eval_batch_size(results: dict, batch_size: int | None) -> int:
    return batch_size if batch_size is not None else 2 * results.get("loop", {}).get("micro_batch_size", 4)


def evaluate_run(run: str, protocol_cfg, results_dir: str | Path = "outputs/results", batch_size: int | None = None,
                 device: str = "auto") -> dict:
    """Score a saved run with one protocol and merge metrics.<protocol> into its results file; returns them."""
    check_settings(batch_size, device)  # every setting first: nothing is read or written before
    name = protocol_cfg.name
    check_protocol_settings(name, protocol_cfg)
    path, results = read_run(run, results_dir)
    rcfg = OmegaConf.create(results["config"])
    check_fits(name, rcfg.regime, results["run_name"])
    adapter_dir = source_adapter(results, path)
    scored, _ = score_adapter(adapter_dir, rcfg, {name: protocol_cfg}, run_folder(path, results),
                              results["run_name"], eval_batch_size(results, batch_size), device,
                              fingerprint=data_fingerprint_of(path, results))
    metrics = scored[name]
    merge_into_results(path, name, metrics,
                       provenance("experiments.evaluate", OmegaConf.to_container(protocol_cfg, resolve=True)))
    print(f"[{results['run_name']}] {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                         if isinstance(v, float)) + f" -> {path}")
    return metrics


def main(cfg: DictConfig) -> None:
    """The Hydra task (experiments.hydra_cli.run_hydra reports its errors: one `error:` line and exit 2 for the user's)."""
    check_run_arg(cfg)
    check_settings(cfg.batch_size, cfg.device, cfg.num_threads)
    guard.check_keys_of(cfg, CONF_DIR / "evaluate.yaml", skip=("protocol",))
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    evaluate_run(str(cfg.run), cfg.protocol, cfg.paths.results_dir, cfg.batch_size, cfg.device)


if __name__ == "__main__":
    hydra_cli.run_hydra(main, CONF_DIR, "evaluate")
