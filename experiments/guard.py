"""What a run checks before it spends time or touches disk: the config, the data, and whether its run folder
may be written (a fresh start, an exact resume, a finished run, or another configuration's folder).

    validate_config(cfg)                               # ConfigError: one line naming the setting and the fix
    check_splits(cfg.regime, data)                     # DataError: the split, example and missing field
    fp = run_fingerprint(cfg, data)                    # sha256 of every input that changes the result
    decision = decide(cfg, fp)                         # Decision("fresh" | "resume" | "done"), or RunConflict

The fingerprint covers the resolved config minus the keys that cannot change a result
(`experiments.identity.NON_RESULT`:
logger, paths, run name, tags, progress bar, threads, logging/checkpoint cadence, resume/force) plus the
content hash of the loaded train/val/test examples. The code version (git commit) is recorded in
run.json and every checkpoint, and a resume on another commit prints a warning (it does not refuse:
a fix elsewhere in the repository would otherwise strand every run in progress).

A run folder belongs to one configuration: {output_dir}/run.json names its fingerprint. A different
configuration is refused, whatever the flags (never overwritten); the same one resumes from its checkpoint,
reports "done" when finished (exit 0), or starts over with `trainer.force=true`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.identity import adapter_kwargs, result_config
from lrlora._atomic import atomic_json, exclusive_lock
from lrlora.errors import ConfigError, UserError

RUN_META = "run.json"
# What a run of ours writes into its folder: the only entries a forced restart removes.
OWN_ENTRIES = ("checkpoint", "metrics.jsonl", "transfer_functions.png", RUN_META)
# Everything a run, its protocols and its re-scoring write into its folder: what `make clean` removes there.
RUN_ENTRIES = (*OWN_ENTRIES, "adapter", "sigma_snapshots.json", "predictions", "lm_eval_tasks",
               "mt_bench_answers.jsonl", "mt_bench_judgments.jsonl", "wandb")


class DataError(UserError, ValueError):
    """A data file or split is empty, malformed, or lacks a field the task needs."""


class RunConflict(UserError, FileExistsError):
    """The run folder or results file belongs to another configuration (or to no run of ours)."""


# --- config -----------------------------------------------------------------------------------------------
def _int(cfg, path: str, minimum: int = 1, optional: bool = False, hint: str = "") -> None:
    v = OmegaConf.select(cfg, path)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{path}={v!r} must be {what}{' or null' if optional else ''}{hint}")


def _num(cfg, path: str, lo: float, hi: float, lo_open=False, hi_open=False, optional=False, hint="") -> None:
    v = OmegaConf.select(cfg, path)
    if v is None and optional:
        return
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{path}={v!r} must be a number in {rng}{' or null' if optional else ''}{hint}")


def _choice(cfg, path: str, choices) -> None:
    v = OmegaConf.select(cfg, path)
    if v not in choices:
        raise ConfigError(f"{path}={v!r} must be one of {', '.join(map(str, choices))}")


def validate_config(cfg: DictConfig) -> None:
    """Every setting checked before data or backbone load; ConfigError names the setting and the fix."""
    from baselines import methods
    from baselines.core import check_rank_value
    from experiments.backbones import check_pooling

    inf = float("inf")
    _int(cfg, "seed", minimum=0)
    name = cfg.adapter.get("name")
    if name not in methods():
        raise ConfigError(f"adapter={name!r} is unknown; choose one of {', '.join(sorted(methods()))}")
    try:
        check_rank_value(name, cfg.adapter.get("r"))
    except ConfigError:
        raise ConfigError(f"adapter.r={cfg.adapter.get('r')!r} must be a positive integer, e.g. adapter.r=8 "
                          f"({name})") from None
    _num(cfg, "adapter.lr", 0, inf, lo_open=True, optional=True)
    _num(cfg, "adapter.dropout", 0, 1, hi_open=True, optional=True)
    t = "trainer"
    _int(cfg, f"{t}.grad_accum", hint=" (micro-batches per optimizer step, e.g. trainer.grad_accum=1)")
    _int(cfg, f"{t}.max_steps", optional=True, hint=" (null trains regime.train.epochs)")
    for k in ("eval_every", "save_every", "eval_max_examples"):
        _int(cfg, f"{t}.{k}", optional=True)
    _int(cfg, f"{t}.log_every")
    _int(cfg, f"{t}.max_skipped_nonfinite", minimum=0)
    _choice(cfg, f"{t}.precision", ("auto", "no", "fp16", "bf16"))
    for k in ("resume", "force", "compute_ranks", "progress"):
        _choice(cfg, f"{t}.{k}", (True, False))
    threads = OmegaConf.select(cfg, f"{t}.num_threads")
    if threads not in ("auto", None):
        _int(cfg, f"{t}.num_threads", hint=" or auto (the free cores) or null (torch's default)")
    r = "regime.train"
    _int(cfg, f"{r}.batch_size")
    _int(cfg, f"{r}.epochs")
    _num(cfg, f"{r}.lr", 0, inf, lo_open=True, hint=" (an lr of 0 trains nothing)")
    _num(cfg, f"{r}.weight_decay", 0, inf)
    _num(cfg, f"{r}.warmup_ratio", 0, 1, hi_open=True, optional=True)
    _num(cfg, f"{r}.grad_clip", 0, inf, optional=True)
    _int(cfg, f"{r}.patience", optional=True)
    _int(cfg, f"{r}.eval_every", optional=True)
    _choice(cfg, f"{r}.schedule", ("linear", "cosine"))
    _choice(cfg, f"{r}.metric_mode", ("max", "min"))
    for k in ("n_train", "n_val", "n_test", "max_length"):
        _int(cfg, f"regime.{k}", optional=True)
    check_known_keys(cfg)
    check_pooling(cfg.backbone, cfg.regime.task)
    metrics = TASK_METRICS.get(cfg.regime.task)
    if metrics and cfg.regime.get("pairs"):  # (question, option) pairs: also the per-question accuracy
        metrics = (*metrics, "choice_accuracy")
    if metrics and cfg.regime.train.metric not in metrics:
        raise ConfigError(f"regime.train.metric={cfg.regime.train.metric!r} is not measured for the "
                          f"{cfg.regime.task} task; choose one of {', '.join(metrics)}")
    if cfg.trainer.grad_accum > cfg.regime.train.batch_size:
        raise ConfigError(f"trainer.grad_accum={cfg.trainer.grad_accum} exceeds regime.train.batch_size="
                          f"{cfg.regime.train.batch_size}: a micro-batch needs at least one example")

    try:  # the method's own checks of its settings (LR-LoRA: its whole config), before any backbone loads
        methods()[name].validate(adapter_kwargs(cfg))
    except ConfigError as e:
        raise ConfigError(f"adapter: {e}") from None


# --- settings nothing reads -----------------------------------------------------------------------------------
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_KNOWN: dict = {}


def _keys(node, prefix: str, out: set, depth: int) -> set:
    for k, v in (node or {}).items():
        if k in ("defaults", "hydra"):
            continue
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, dict) and v and depth > 1:
            _keys(v, key + ".", out, depth - 1)
    return out


def known_keys() -> set[str]:
    """Every setting the conf/ files define (the root config, the experiment and sweep files, each group's files
    under its group): a setting outside these is read by nothing. The adapter group is left to the method,
    which refuses a keyword it does not take; a protocol's settings to conf/protocol/<name>.yaml."""
    if not _KNOWN:
        import yaml

        known: set = {d.name for d in CONF_DIR.iterdir() if d.is_dir()}  # the groups themselves
        for f in [CONF_DIR / "train.yaml", *(CONF_DIR / "experiment").glob("*.yaml"),
                  *(CONF_DIR / "sweep").glob("*.yaml")]:
            _keys(yaml.safe_load(f.read_text()), "", known, 4)
        for group in ("backbone", "regime", "logger"):
            for f in (CONF_DIR / group).glob("*.yaml"):
                _keys(yaml.safe_load(f.read_text()), f"{group}.", known, 3)
        _KNOWN["keys"] = known
    return _KNOWN["keys"]


def check_known_keys(cfg) -> None:
    """ConfigError for a setting nothing reads (`+trainer.max_step=3` beside trainer.max_steps): it would be
    accepted and silently ignored. Checked: the root, trainer, paths and eval settings, and the backbone,
    regime (and regime.train / regime.generation) and logger groups; eval.settings.<protocol> against its YAML."""
    import difflib

    from experiments.protocols import check_protocol_settings

    known = known_keys()
    tree = OmegaConf.to_container(cfg, resolve=False)
    found = set()
    for top, v in tree.items():
        if top in ("hydra", "adapter"):
            continue
        found.add(top)
        if isinstance(v, dict) and top in ("trainer", "paths", "eval", "backbone", "regime", "logger"):
            for k, w in v.items():
                found.add(f"{top}.{k}")
                if top == "regime" and k in ("train", "generation") and isinstance(w, dict):
                    found.update(f"regime.{k}.{x}" for x in w)
    for key in sorted(found - known):
        near = difflib.get_close_matches(key, sorted(known), n=1)
        raise ConfigError(f"{key} is not a setting of this harness{f' (did you mean {near[0]}?)' if near else ''}: "
                          f"nothing reads it, so it is refused rather than ignored; see conf/ for the settings")
    for name, settings in ((tree.get("eval") or {}).get("settings") or {}).items():
        check_protocol_settings(name, settings, where=f"eval.settings.{name}")


def check_keys_of(cfg, yaml_file: Path, skip=()) -> None:
    """ConfigError for a setting of a command's config (experiments.evaluate, experiments.para) that its YAML does
    not define (added with +key=...): nothing would read it."""
    import yaml

    reference = yaml.safe_load(Path(yaml_file).read_text()) or {}
    known = _keys(reference, "", set(), 2)
    tree = OmegaConf.to_container(cfg, resolve=False)
    found = {k for k in tree if k not in ("hydra", *skip)}
    found |= {f"{k}.{x}" for k, v in tree.items() if k not in ("hydra", *skip) and isinstance(v, dict) for x in v}
    for key in sorted(found - known):
        raise ConfigError(f"{key} is not a setting of this command: nothing reads it, so it is refused rather than "
                          f"ignored; the settings are in {Path(yaml_file).relative_to(CONF_DIR.parent)}")


# The validation metrics experiments.protocols.forward.evaluate gives per task (f1: binary classification only;
# choice_accuracy as well for the pair regimes, regime.pairs=true).
TASK_METRICS = {"classification": ("accuracy", "matthews", "f1", "loss"), "regression": ("pearson", "spearman", "loss"),
                "causal_lm": ("loss",), "image_classification": ("accuracy", "matthews", "loss")}


# --- data --------------------------------------------------------------------------------------------------
SCORED_AGAINST = ("answer", "target")  # an empty one is an error, not an example quietly skipped
REQUIRED = {"classification": ("text", "label"), "regression": ("text", "label"),
            "causal_lm": ("prompt", "target"), "image_classification": ("image", "label")}


def check_splits(regime, data) -> None:
    """Train and validation non-empty; every example with the fields its task (and the test metric) needs."""
    for split in ("train", "val"):
        if len(getattr(data, split)) == 0:
            cap = "n_train" if split == "train" else "n_val"
            raise DataError(f"regime {regime.name} has no {split} examples; check its data (or regime.{cap})")
    needs = {s: REQUIRED.get(regime.task, ()) for s in ("train", "val", "test")}
    if regime.task == "causal_lm" and regime.get("generation") and len(data.test):
        needs["test"] = ("prompt", "answer")  # the generation metric scores against `answer`
    for split, fields in needs.items():
        rows = getattr(data, split)
        seq = rows if isinstance(rows, list) else [rows[0]] if len(rows) else []  # lazy sets: the first row
        for i, ex in enumerate(seq):
            for f in fields:
                if not isinstance(ex, dict) or ex.get(f) is None:
                    raise DataError(f"{split} example {i} of regime {regime.name} lacks field {f!r}, which the "
                                    f"{regime.task} task needs; fix the data (or its regime's loader settings)")
                if f in SCORED_AGAINST and not str(ex[f]).strip():  # never left out of the score in silence
                    raise DataError(f"{split} example {i} of regime {regime.name} has an empty {f!r}, which the "
                                    f"{regime.task} task scores against; fix the data (give it one, or remove "
                                    f"the example)")


def _hash_value(h, v) -> None:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        h.update(str(v.dtype).encode() + str(v.shape).encode() + np.ascontiguousarray(v).tobytes())
    elif hasattr(v, "tobytes"):  # PIL images
        h.update(v.tobytes())
    else:
        h.update(json.dumps(v, sort_keys=True, default=str).encode())


def data_fingerprint(data) -> str:
    """sha256 over every example of every split, in order (a lazily decoded hub dataset: its own
    fingerprint and the index, which `datasets` derives from the files' content)."""
    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        rows = getattr(data, split)
        h.update(f"[{split}:{len(rows)}]".encode())
        ds = getattr(rows, "ds", None)
        if ds is not None and hasattr(ds, "_fingerprint"):
            h.update(str(ds._fingerprint).encode() + str(rows.index).encode())
            continue
        for ex in rows:
            for k in sorted(ex):
                h.update(k.encode())
                _hash_value(h, ex[k])
    return h.hexdigest()


# --- fingerprint and run folder ---------------------------------------------------------------------------
def run_fingerprint(config: dict, data_hash: str) -> str:
    blob = json.dumps({"config": result_config(config), "data": data_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _differences(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix or 'data'}: {a!r} -> {b!r}"]


@dataclass
class Decision:
    action: str                   # "fresh", "resume" or "done"
    checkpoint: dict | None = None
    results: dict | None = None


def decide(cfg: DictConfig, config: dict, data_hash: str, fingerprint: str) -> Decision:
    """Read the run folder and results file (writing nothing) and say what this run may do."""
    from experiments.loop import read_checkpoint_meta, verify_checkpoint

    out_dir, results_path = Path(cfg.paths.output_dir), Path(cfg.paths.results_dir) / f"{cfg.run_name}.json"
    mine = result_config(config)
    fix = ("nothing was changed. Give this configuration its own name (run_name=...) or output root "
           "(paths.root=...), or move that folder away yourself")
    meta = None
    if (out_dir / RUN_META).is_file():
        try:
            meta = json.loads((out_dir / RUN_META).read_text())
            meta["fingerprint"]
        except (ValueError, KeyError, TypeError):
            raise RunConflict(f"{out_dir / RUN_META} is unreadable: the folder's owner is unknown; {fix}") from None
        if meta["fingerprint"] != fingerprint:
            diff = _differences(meta.get("config"), mine)
            if meta.get("data") != data_hash:
                diff.append("the training/evaluation data's content")
            raise RunConflict(f"{out_dir} holds a run of another configuration (differs in "
                              f"{'; '.join(diff[:4]) or 'its fingerprint'}); {fix}")
    elif out_dir.exists() and any(p.name not in (".hydra", "train.log") for p in out_dir.iterdir()):
        raise RunConflict(f"{out_dir} already holds files that no run of this version wrote (no {RUN_META}); {fix}")
    if results_path.exists():
        try:
            old = json.loads(results_path.read_text())
            same = result_config(old.get("config") or {}) == mine
        except (ValueError, AttributeError):
            same = False
        if not same:
            raise RunConflict(f"{results_path} holds the results of another configuration; {fix}")
        if meta is None or meta.get("status") == "done":
            if cfg.trainer.force:
                return Decision("fresh")
            return Decision("done", results=old)
    if meta is not None and cfg.trainer.resume and not cfg.trainer.force:
        ckpt = read_checkpoint_meta(out_dir / "checkpoint")
        if ckpt is not None:
            if ckpt["fingerprint"] != fingerprint:
                raise RunConflict(f"{out_dir / 'checkpoint'} was written by another configuration; {fix}")
            verify_checkpoint(out_dir / "checkpoint")
            return Decision("resume", checkpoint=ckpt)
    return Decision("fresh")


def clear_own_outputs(out_dir: Path) -> None:
    """A fresh start of the SAME configuration: remove what a run of ours wrote there, nothing else."""
    if not (Path(out_dir) / RUN_META).is_file():
        return
    for name in OWN_ENTRIES[:-1]:
        p = Path(out_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        for left in list(Path(out_dir).glob(f".{name}.new.*")) + list(Path(out_dir).glob(f".{name}.old.*")):
            shutil.rmtree(left, ignore_errors=True)  # an interrupted save's folder (lrlora._atomic's names)


@contextlib.contextmanager
def run_lock(cfg: DictConfig):
    """One process at a time per run folder: a second launch of the same run is refused (the lock lives in the
    temp folder, so a refused launch writes nothing; the other processes of a multi-GPU run take none)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with exclusive_lock(Path(cfg.paths.output_dir), wait=False,
                        busy=f"run {cfg.run_name} is already running in another process ({{pid}}); wait for it to "
                             f"finish (then this command resumes it or reports it done), or give this one its own "
                             f"run_name="):
        yield


RUN_LEFTOVERS = (RUN_META, "metrics.jsonl", "transfer_functions.png", "sigma_snapshots.json")


@contextlib.contextmanager
def no_leftovers(out_dir: Path):
    """A run that fails (a refused setting, a NaN, a crash) before its first checkpoint leaves no run folder: what
    it wrote there is removed, and the folders it created, once empty. A folder that existed before is never
    touched, nor one holding a checkpoint (the next run resumes from it)."""
    out_dir = Path(out_dir)
    created = [p for p in [out_dir, *out_dir.parents] if not p.exists()]
    try:
        yield
    except BaseException:
        if created and out_dir.is_dir() and not (out_dir / "checkpoint").exists():
            for name in RUN_LEFTOVERS:
                (out_dir / name).unlink(missing_ok=True)
        for folder in created:  # the deepest first; rmdir removes only an empty folder
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def write_run_meta(out_dir: Path, config: dict, data_hash: str, fingerprint: str, git: dict,
                   status: str = "running") -> None:
    atomic_json(Path(out_dir) / RUN_META, {"fingerprint": fingerprint, "status": status, "data": data_hash,
                                           "git": git, "config": result_config(config)})


def mark_done(out_dir: Path) -> None:
    path = Path(out_dir) / RUN_META
    meta = json.loads(path.read_text())
    meta["status"] = "done"
    atomic_json(path, meta)
