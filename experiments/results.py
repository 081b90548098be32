"""The results file: one JSON per run, written atomically; tables and figures are built from these only.

    result = RunResult(run_name=..., backbone=..., metrics=..., ...)   # the fields of docs/RESULTS.md
    path = write_results(result, results_dir)   # -> {results_dir}/{run_name}.json
    result = RunResult.from_dict(json.loads(path.read_text()))         # what analysis reads
    ranks = rank_stats(handle.delta_weights(), target_modules)
    mech = mechanism_stats(handle.delta_weights(), r, handle.sigma_arguments())

`RunResult` is the schema: training (experiments/train.py) and PARA (experiments/para.py) write one,
analysis/load.py reads one, and tests/test_harness.py checks its fields against docs/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrlora._atomic import atomic_json
from lrlora.errors import UserError

PACKAGES = ("torch", "transformers", "peft", "accelerate", "hydra-core", "omegaconf", "wandb", "datasets",
            "numpy", "lrlora")


ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "ABSENT"})()  # a field this writer does not write


def _absent():
    return field(default=ABSENT)


@dataclass
class RunResult:
    """One results file (docs/RESULTS.md, field for field and in the file's order). A field a writer has no value
    for (PARA trains nothing: no `loop` or `stable_ranks`; a training run has no `source`) stays ABSENT and is
    not written; files written before a field existed read with it ABSENT too. Only `run_name` and `metrics`
    are required to read a file."""

    run_name: str
    backbone: str = _absent()
    adapter: str = _absent()
    regime: str = _absent()
    r: int | None = _absent()
    seed: int = _absent()
    tags: list = _absent()
    metrics: dict = _absent()
    protocols: dict = _absent()
    params: dict = _absent()
    stable_ranks: dict = _absent()
    mechanism: dict = _absent()
    adapter_dir: str = _absent()
    data_fingerprint: str = _absent()
    source: dict = _absent()
    adapter_extra: dict = _absent()
    timing: dict = _absent()
    memory: dict = _absent()
    loop: dict = _absent()
    device: str = _absent()
    precision: str = _absent()
    world_size: int = _absent()
    torch_threads: int = _absent()
    git: dict = _absent()
    versions: dict = _absent()
    config: dict = _absent()

    # keys of older files that no field carries any more: read and left out
    RETIRED = ("samples",)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not ABSENT}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        """ValueError naming what is wrong: not a dict, no run_name or metrics, or a key that is not a field."""
        if not isinstance(d, dict) or "run_name" not in d or "metrics" not in d:
            raise ValueError("no run_name/metrics, so not a results file (docs/RESULTS.md)")
        known = set(cls.field_names())
        unknown = sorted(k for k in d if k not in known and k not in cls.RETIRED)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a field of the results file (docs/RESULTS.md)")
        return cls(**{k: v for k, v in d.items() if k in known})


SPECTRUM_TOP = 64  # singular values kept per ΔW in the results file


def module_type(name: str, target_modules) -> str:
    """The longest target key the module name ends with ('attention.output.dense' beats 'output.dense')."""
    keys = [t for t in (target_modules or []) if name == t or name.endswith("." + t)]
    return max(keys, key=len) if keys else name.rsplit(".", 1)[-1]


def rank_stats(delta_weights: dict, target_modules) -> dict:
    """Per-layer stable rank (and leading normalised singular values) of every ΔW, plus mean ± std over all
    modules and by module type."""
    from lrlora import layer_index, normalized_spectrum, stable_rank

    per_layer = {}
    for name, dw in delta_weights.items():
        per_layer[name] = {"stable_rank": stable_rank(dw), "type": module_type(name, target_modules),
                           "layer": layer_index(name), "shape": list(dw.shape),
                           # σ_i / σ_1, the first SPECTRUM_TOP: analysis' fig_spectra (App. G.2)
                           "spectrum": normalized_spectrum(dw, top=SPECTRUM_TOP)}
    def summary(values):
        v = np.array(values, dtype=float)
        return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
                "n": len(v)} if len(v) else {"n": 0}
    by_type = {}
    for row in per_layer.values():
        by_type.setdefault(row["type"], []).append(row["stable_rank"])
    return {"per_layer": per_layer, "all": summary([r["stable_rank"] for r in per_layer.values()]),
            "by_type": {t: summary(v) for t, v in by_type.items()}}


def mechanism_stats(delta_weights: dict, r: int | None, sigma_arguments: dict | None = None) -> dict:
    """Per adapted matrix, `lrlora.mechanism`: ΔW's energy beyond the nominal rank r, and for LR-LoRA the range
    of σ's argument and ΔW's distance from an affine function of it; with the mean, median, min and max of each over
    the matrices (docs/RESULTS.md). Empty without a nominal rank."""
    from lrlora import mechanism

    if not r:
        return {}
    per_layer = {name: mechanism(dw, int(r), (sigma_arguments or {}).get(name)) for name, dw in delta_weights.items()}
    fields = sorted({k for row in per_layer.values() for k in row})
    summary = {}
    for f in fields:
        v = np.array([row[f] for row in per_layer.values() if f in row], dtype=float)
        summary[f] = {"mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": len(v)}
    return {"r": int(r), "per_layer": per_layer, "summary": summary}


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_info() -> dict:
    """Commit and dirty flag of the checkout (read-only git calls); None outside a repository."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": dirty if sha else None}


def peak_memory() -> dict:
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # process-wide
    if torch.cuda.is_available():
        out["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


class PathOutsideRoot(UserError, ValueError):
    """A path a results file records that does not lie under the root the user chose."""


def recorded_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """How a results file records a path: relative to its root (`runs/NAME/adapter`), so that a copied outputs
    folder is whole by itself and never points back into the original."""
    return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()


def path_under_root(results_file: str | os.PathLike, recorded: str, expected: str | None = None) -> Path:
    """A path recorded in `results_file`, placed under that file's root (`<root>/results/NAME.json` -> `<root>`):
    the root the user chose, never the one the file was written under. Older files record the path as it was
    spelt then (`outputs/runs/NAME/adapter`, absolute or not): its tail from `runs/` or `results/` is kept.
    `expected` (e.g. `runs/NAME/adapter`) must then be what it names. PathOutsideRoot otherwise."""
    root = Path(results_file).resolve().parent.parent
    parts = Path(str(recorded)).parts
    anchor = max((i for i, part in enumerate(parts[:-1]) if part in ("runs", "results")), default=None)
    tail = Path(*parts[anchor:]) if anchor is not None else None
    if tail is None or ".." in tail.parts or (expected is not None and tail.as_posix() != expected):
        raise PathOutsideRoot(f"{results_file} records {recorded!r}, which is not "
                              f"{expected or 'a path under its root (runs/... or results/...)'}; nothing was read "
                              f"or written: restore the results file, or re-run that run")
    return root / tail


def write_results(result: RunResult | dict, results_dir: str | os.PathLike) -> Path:
    """{results_dir}/{run_name}.json through lrlora's atomic writer: readers never see half a file. A dict (a
    results file read, changed and written back: experiments.evaluate) must hold RunResult's fields only, and is
    written with its keys in the order it has.

    Strict JSON: a NaN or infinite value anywhere raises NonFiniteError naming its key, and nothing is written
    (a NaN is not a result; docs/RESULTS.md)."""
    if isinstance(result, dict):
        RunResult.from_dict(result)  # a key outside the schema is an error, before anything is written
        record = result
    else:
        record = result.to_dict()
    path = Path(results_dir) / f"{record['run_name']}.json"
    plain = json.loads(json.dumps(record, default=_jsonable))  # numpy/tensors -> Python, NaN kept to be caught
    return atomic_json(path, plain)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)
