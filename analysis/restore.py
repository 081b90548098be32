"""Putting back a grid run's folder on a fresh machine: run folders (adapters, checkpoints) are never committed, so
a PARA job can find its source's results file without the adapter it compresses. `restore_source` re-trains the
run and restores its folder only if the re-trained run agrees with the committed results file (`differences`).
The grid runner (analysis.reproduce) calls it before each PARA job."""

from __future__ import annotations

import json
from pathlib import Path

from lrlora.errors import UserError

RESTORE = "runs/_restore"  # under a grid's root, where a source run is re-trained (runs/ is never committed)
# What a re-trained run must reproduce to stand for the committed one: every score, the protocols' settings, the
# ranks and mechanism of its adapter, the data and the parameter count. Timing, memory, when a protocol ran and the
# commit differ from machine to machine. On another CPU the same seed trains the same adapter up to float rounding:
# - counts, strings and the validation score that picked the checkpoint (best_val) must be equal;
# - a real number may differ by rounding (REL, ABS): the ten re-trained sources' training losses came out equal or
#   one or two float32 steps apart (6e-8 in 0.6), an SVD of ΔW differs by about 1e-7 of its top singular value,
#   and a rank-4 ΔW's values beyond the fourth are rounding alone, moving by a few √n·ε ≈ 5e-6 for a 384 x 1536
#   matrix (6.0e-6 seen), hence ABS;
# - a test accuracy may differ by SCORE_ABS: scoring the same adapter on another CPU can flip a question whose
#   options tie to rounding (seen once in ten re-trained sources: 43.70 against 43.65, one question of 2,000, with
#   the training loss equal to the last digit). restore_source says so when it happens.
REPRODUCED = ("metrics", "protocols", "stable_ranks", "mechanism", "data_fingerprint", "params")
REL, ABS = 1e-5, 1e-5
SCORE_ABS = 1e-3  # at most 0.1 points: two questions of 2,000


class RestoreError(UserError, ValueError):
    """A run folder that cannot be put back: a re-trained run that does not reproduce its results file, or a
    folder in the way."""


def reproduced(results: dict) -> dict:
    """The part of a results file that a re-trained run must reproduce (REPRODUCED)."""
    view = {k: results.get(k) for k in REPRODUCED}
    view["protocols"] = {name: (p or {}).get("settings") for name, p in (results.get("protocols") or {}).items()}
    return view


def _unequal(a, b, path: str = ""):
    """(path, a's, b's) for every leaf where two results views are not exactly equal: one walk that `differences`
    and `score_changes` both read."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            yield from _unequal(a.get(k), b.get(k), f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _unequal(x, y, f"{path}[{i}]")
    elif a != b:
        yield path.lstrip("."), a, b


def _rounding(path: str, a, b) -> bool:
    """Whether an inequality is float rounding (REL, ABS; a test accuracy SCORE_ABS; see REPRODUCED)."""
    import math

    if not (isinstance(a, float) and isinstance(b, float)) or "best_val" in path:
        return False
    return math.isclose(a, b, rel_tol=REL, abs_tol=SCORE_ABS if "accuracy" in path else ABS)


def differences(a, b) -> list[str]:
    """The paths where two results views differ beyond float rounding; [] when they agree."""
    return [path for path, x, y in _unequal(a, b) if not _rounding(path, x, y)]


def score_changes(a: dict, b: dict) -> list[tuple[str, float, float]]:
    """(path, a's, b's) for every accuracy that is not exactly equal in two results views (within SCORE_ABS when
    they passed `differences`): what a restore reports."""
    return [(path, x, y) for path, x, y in _unequal(a, b)
            if "accuracy" in path and isinstance(x, float) and isinstance(y, float)]


def restore_source(cfg, overrides: list[str]) -> bool:
    """Put back the run folder of a PARA job's source whose results file is here but whose folder is not (a fresh
    machine): re-train the run into <root>/runs/_restore/ (resumable there), compare the fields in REPRODUCED with
    the committed results file (`differences`), and move the run folder into <root>/runs/ only if they agree, with
    the re-trained results file inside it as `restored.json`. False when there was nothing to restore; raises
    RestoreError (the fields that differ) when the re-trained run does not reproduce the committed one, so no
    PARA result is ever computed from an adapter other than the one that was scored."""
    from experiments.hydra_cli import compose_train
    from experiments.train import run

    results_dir = Path(cfg.paths.results_dir)
    root = results_dir.parent
    folder = root / "runs" / cfg.run_name
    if (folder / "adapter").is_dir():
        return False
    if folder.exists():  # a folder without its adapter: not ours to replace
        raise RestoreError(f"{folder} exists without an adapter, so {cfg.run_name}'s PARA jobs cannot run: move "
                           f"that folder away and the runner re-trains the run to restore it")
    fresh = compose_train([*overrides, f"paths.root={root / RESTORE}"])
    again_path = Path(fresh.paths.results_dir) / f"{cfg.run_name}.json"
    print(f"[reproduction] {cfg.run_name}: its results file is here, its run folder is not; re-training it into "
          f"{root / RESTORE} to put the folder back", flush=True)
    run(fresh)
    committed = reproduced(json.loads((results_dir / f"{cfg.run_name}.json").read_text()))
    again = reproduced(json.loads(again_path.read_text()))
    differ = differences(committed, again)
    if differ:
        raise RestoreError(f"{cfg.run_name} re-trained does not reproduce its committed results ({len(differ)} "
                           f"field(s) differ: {', '.join(differ[:3])}; the re-trained run is in {root / RESTORE}): "
                           f"its PARA jobs are not run, since their adapter would not be the one that was scored")
    Path(fresh.paths.output_dir).rename(folder)  # one filesystem: the folder appears whole or not at all
    again_path.rename(folder / "restored.json")
    flipped = [f"{k} {x} here, {y} in its results file" for k, x, y in score_changes(again, committed)]
    print(f"[reproduction] {cfg.run_name}: re-trained, {', '.join(REPRODUCED)} equal to the committed results "
          f"(real numbers to float rounding{'; scored to rounding: ' + ', '.join(flipped) if flipped else ''}); "
          f"its run folder is back", flush=True)
    return True
