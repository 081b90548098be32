"""Run exactly the runs a table needs that are missing or stale, then build the table from the results files.

    python -m analysis.reproduce table1 --scale smoke          # = make reproduce-table1 SCALE=smoke
    python -m analysis.reproduce table3 --scale mini           # = make reproduce TABLE=table3 SCALE=mini
    python -m analysis.reproduce table1 --scale paper --dry-run   # list what would run, run nothing
    python -m analysis.reproduce reproduction --root results/reproduction   # = make reproduction (the claims' grid)

The grid is analysis/scales.yaml: a scale's columns (backbone + data, each standing in for a paper column) x
the table's variants (Table 1: the nine methods; ablation tables: the product of their conf/sweep file) x
the seeds. Every cell is composed with Hydra exactly as `python -m experiments.train <overrides>` would, so
its run name, folder and results file are the ones a hand-run command gives. A results file is stale when it
was written from another config (its result-affecting settings differ) or by another git commit
(`--any-commit` accepts any commit). Runs go one after another in this process (`experiments.train.run`);
on a cluster, launch the printed commands with `hydra/launcher=slurm` instead and re-run this to build.

`reproduction` is not a table but the ordered list of (table, scale, columns, seeds) steps under `reproduction:`
in analysis/scales.yaml: the grid that tests the paper's claims (results/reproduction/README.md). Its cells run
in that order, a cell shared by two steps once; results from any commit count as done (a grid runs over many launches
and the results files are committed as they land), a failing cell is reported and the next one runs, and a cell
killed midway resumes from its checkpoint on the next call. No table is built: `python -m analysis <table>
--results <root>/results` builds each from the files.

A step with a `para:` list (`para: [keep_energy=0.9, reduction=0.75]`) trains nothing: for each of its cells
whose results file exists, `python -m experiments.para` compresses that run at each setting whose results file
(`<run>__para-keep0.90.json`, ...) is missing; a cell not trained yet is reported as waiting and picked up by a
later call. These PARA jobs run after the training cells; `--shard I/N` deals them out by source run (every N-th
source from the I-th, with all its settings), and a job whose run is still training in another shard when its turn
comes waits for the next call. A run folder is not committed (runs/ holds checkpoints), so on a fresh machine a
source's results file can be here while its adapter is not: the runner then re-trains the source into
`<root>/runs/_restore/` and puts its run folder back only if the re-trained results agree with the committed ones
(`analysis.restore`: scores exactly, real numbers to float rounding); otherwise its PARA jobs fail with the fields
that differ, and nothing is scored.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from analysis import paper
from lrlora import cli
from lrlora.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


class ReproduceError(UserError, ValueError):
    """A table or scale that analysis/scales.yaml does not define."""


@dataclass
class Cell:
    column: str        # the paper column it stands in for
    variant: str       # method or ablation setting
    seed: int
    overrides: list[str]


def sweep_spec(name: str) -> tuple[dict, list]:
    """(hydra.sweeper.params, tags) of conf/sweep/<name>.yaml, as Hydra composes them: a sweep that lists another
    in its `defaults` (repro_basis reads table13's grid) takes that one's params and tags, then its own on top."""
    spec = yaml.safe_load((CONF / "sweep" / f"{name}.yaml").read_text())
    params, tags = {}, None
    for entry in spec.get("defaults") or []:
        if entry != "_self_":
            inherited, inherited_tags = sweep_spec(entry)
            params.update(inherited)
            tags = inherited_tags
    params.update(((spec.get("hydra") or {}).get("sweeper") or {}).get("params") or {})
    return params, spec["tags"] if "tags" in spec else tags


def sweep_grid(name: str, replace: dict | None = None) -> list[list[str]]:
    """The product of conf/sweep/<name>.yaml's hydra.sweeper.params, as override lists (Hydra's basic sweeper
    runs the same product); `replace` swaps a parameter's values (a scale whose backbone cannot take some)."""
    params, spec_tags = sweep_spec(name)
    params = {**params, **(replace or {})}
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    tags = [f"tags=[{','.join(spec_tags)}]"] if spec_tags else []
    return [[f"{k}={v}" for k, v in zip(keys, combo)] + tags for combo in itertools.product(*values)]


def plan(table: str, scale: str, seeds=None, variants=None, columns=None, extra=()) -> list[Cell]:
    """The table's cells at this scale; `columns` keeps the scale's columns with one of these regimes, `extra`
    overrides go last in every cell (a `reproduction` step's)."""
    spec = paper.scales()
    if scale not in spec["scales"]:
        raise ReproduceError(f"unknown scale {scale!r}; choose one of {', '.join(spec['scales'])}")
    tables = spec["tables"]
    if table not in tables:
        raise ReproduceError(f"no grid for {table!r} in analysis/scales.yaml; tables with one: {', '.join(tables)}")
    t = tables[table]
    key = t.get("same_as", table)
    t = tables[key]
    sc = spec["scales"][scale]
    # a scale may replace a table's variants and its base overrides (the tiny backbones cannot take r = 32)
    scale_variants = (sc.get("variants") or {})
    named = dict(scale_variants.get(key) or t.get(f"variants_{scale}") or t.get("variants") or {})
    base = list(scale_variants.get("base") or t["base"]) if t.get("base") else []
    if t.get("sweep"):
        for ov in sweep_grid(t["sweep"], (sc.get("sweep_values") or {}).get(t["sweep"])):
            named[" ".join(o for o in ov if not o.startswith("tags="))] = ov + base
    if variants:
        unknown = set(variants) - set(named)
        if unknown:
            raise ReproduceError(f"unknown variant(s) {sorted(unknown)} for {table}; choose from {sorted(named)}")
        named = {k: v for k, v in named.items() if k in variants}
    cols = sc["columns"]
    if columns:
        cols = [c for c in cols if any(f"regime={r}" in c["overrides"] for r in columns)]
        if len(cols) != len(set(columns)):
            raise ReproduceError(f"scale {scale!r} has no column for some of the regimes {list(columns)}")
    cells = []
    for col in cols:
        for name, ov in named.items():
            for seed in seeds or sc.get("seeds") or spec["seeds"]:  # a scale may run fewer seeds (mini)
                cells.append(Cell(col["paper"], name, seed,
                                  [*col["overrides"], *ov, *sc.get("overrides", []), *extra, f"seed={seed}"]))
    return cells


GRIDS = {"reproduction": None, "reproduction2": "analysis/rules/round2.yaml",  # grid -> its selection rules
         "explore2": None}  # exploratory runs beside round 2 (analysis/scales.yaml says why); they decide nothing
PLACEHOLDER = re.compile(r"@(\w+)")


class Waiting(Exception):
    """A step that needs a value its selection rule has not chosen yet."""


def fill(text: str, chosen: dict | None) -> str | None:
    """`text` with each `@key` replaced by the chosen value; None when a chosen value is null (the step's arm does
    not exist, e.g. no engaged LR-LoRA); Waiting when a key is not chosen yet. `chosen` None: the grid has no
    selection rules, so a placeholder in it can never be filled and is an error rather than a literal override."""
    keys = PLACEHOLDER.findall(text)
    if not keys:
        return text
    if chosen is None:
        raise ReproduceError(f"{text!r} refers to a chosen value (@{keys[0]}), but this grid has no selection rules "
                             f"to choose it (GRIDS in analysis/reproduce.py); write the value itself in "
                             f"analysis/scales.yaml, or use a variant without @")
    for key in keys:
        if key not in chosen:
            raise Waiting(key)
        if chosen[key] is None:
            return None
        text = text.replace(f"@{key}", str(chosen[key]))
    return text


def reproduction_plan(claims=None, grid: str = "reproduction", chosen: dict | None = None,
                      waiting: list | None = None) -> list[tuple[dict, Cell]]:
    """(step, cell) for every step of the grid `grid:` in analysis/scales.yaml, in order; `claims` keeps the steps
    of these claims only (e.g. ["7"], or ["1b", "8"]). A step's `grid: {key: [values]}` runs it once per value;
    with `chosen` (the selection file's values), `@key` in a step's columns or a cell's overrides is filled in, a
    step whose key is not chosen yet is left out and named in `waiting`, and one whose value is null is dropped."""
    steps = paper.scales().get(grid) or []
    if claims:
        unknown = set(claims) - {str(s["claim"]) for s in steps}
        if unknown:
            raise ReproduceError(f"no step of the grid is for claim(s) {sorted(unknown)}; the claims: "
                                 f"{', '.join(sorted({str(s['claim']) for s in steps}))}")
        steps = [s for s in steps if str(s["claim"]) in claims]
    out = []
    for step in steps:
        try:
            if step.get("when"):
                if step["when"] not in (chosen or {}):
                    raise Waiting(step["when"])
                if not chosen[step["when"]]:
                    continue
            columns = [fill(c, chosen) for c in step.get("columns") or []] or None
            if columns is not None and None in columns:
                continue
            values = step.get("grid") or {}
            for combo in itertools.product(*values.values()):
                extra = [*(step.get("overrides") or ()), *(f"{k}={v}" for k, v in zip(values, combo))]
                for cell in plan(step["table"], step["scale"], step.get("seeds"), step.get("variants"), columns,
                                 extra):
                    try:  # one cell's variant may wait while the step's others can run
                        overrides = [fill(o, chosen) for o in cell.overrides]
                    except Waiting as e:
                        if waiting is not None:
                            waiting.append(f"claim {step['claim']}: waits for {e.args[0]}")
                        continue
                    if None not in overrides:
                        cell.overrides = overrides
                        out.append((step, cell))
        except Waiting as e:
            if waiting is not None:
                waiting.append(f"claim {step['claim']}: waits for {e.args[0]}")
    return out


PARA_KINDS = ("keep_energy", "reduction")


def para_settings(step: dict) -> list[tuple[float | None, float | None]]:
    """A step's `para:` list (`keep_energy=0.9`, `reduction=0.75`) as (keep_energy, reduction) pairs."""
    from baselines.para import check_threshold
    from lrlora.errors import ConfigError

    out = []
    for item in step.get("para") or []:
        kind, _, value = str(item).partition("=")
        try:
            v = float(value)
        except ValueError:
            v = None
        if kind not in PARA_KINDS or v is None:
            raise ReproduceError(f"step of claim {step.get('claim')}: para entry {item!r} is not keep_energy=F or "
                                 f"reduction=F")
        pair = (v, None) if kind == "keep_energy" else (None, v)
        try:
            check_threshold(*pair, PARA_KINDS)
        except ConfigError as e:
            raise ReproduceError(f"step of claim {step.get('claim')}: {e}") from None
        out.append(pair)
    return out


def run_para_jobs(jobs: list, dry_run: bool, root: str | None) -> list[str]:
    """Run (or, dry, print) the PARA jobs [(step, cfg, keep_energy, reduction, name, overrides)] whose source run
    exists and whose results file does not, restoring a source's run folder first where it is gone (restore_source);
    returns the names that failed."""
    from analysis.restore import RESTORE, restore_source
    from experiments.para import run_para
    from lrlora._atomic import Busy
    from lrlora.errors import UserError

    failed, gone = [], set()
    for step, cfg, ke, red, name, overrides in jobs:
        results_dir = Path(cfg.paths.results_dir)
        if (results_dir / f"{name}.json").exists():
            continue
        if not (results_dir / f"{cfg.run_name}.json").exists():
            print(f"  claim {step['claim']}: {name}: waiting for {cfg.run_name}")
            continue
        setting = f"para.keep_energy={ke}" if ke is not None else f"para.reduction={red}"
        if dry_run:
            if not (results_dir.parent / "runs" / cfg.run_name / "adapter").is_dir() and cfg.run_name not in gone:
                gone.add(cfg.run_name)
                print(f"# {cfg.run_name}'s run folder is gone: it is re-trained into {results_dir.parent / RESTORE} "
                      f"and put back if it reproduces its results file")
            print(f"python -m experiments.para run={cfg.run_name} {setting}" + (f" paths.root={root}" if root else ""))
            continue
        t = time.perf_counter()
        try:
            restore_source(cfg, overrides)
            run_para(cfg.run_name, ke, red, results_dir)
        except Busy:  # another shard is restoring the same source: the next call takes it
            print(f"  claim {step['claim']}: {name}: waiting for another process that holds {cfg.run_name}")
            continue
        except UserError as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        except Exception:
            traceback.print_exc()
            print(f"error: {name} crashed (traceback above)", file=sys.stderr)
            failed.append(name)
            continue
        print(f"[reproduction] claim {step['claim']}: {name} ({time.perf_counter() - t:.1f} s)", flush=True)
    return failed


def run_reproduction(root: str | None, dry_run: bool, shard: tuple[int, int] = (0, 1), claims=None,
                     grid: str = "reproduction", wait_s: float = 0) -> int:
    """Run the missing cells of a reproduction grid one after another (module docstring). `shard` (i, n): this
    process takes every n-th missing cell from the i-th, so n processes started together share the grid without
    running a cell twice (one core each; a cell another process holds is skipped); `claims` runs only the steps
    of these claims. A grid with selection rules (GRIDS) re-applies them after every cell, so a step unlocks as
    soon as its value is chosen; with `wait_s`, a process that has nothing left to run but steps still waiting
    (for another shard's pilot cells, say) checks again every minute for that long."""
    from omegaconf import open_dict

    from experiments.train import run
    from lrlora._atomic import Busy
    from lrlora.errors import UserError

    if GRIDS.get(grid) and root is None:  # the rules say where their runs live
        from analysis.rulesfile import read, resolve

        root = str(resolve(read(GRIDS[grid])["results"]).parent)
    failed, skipped, waited, first, took = [], set(), 0.0, True, []
    while True:
        chosen, waiting = None, []
        if GRIDS.get(grid):
            from analysis.selection import update

            chosen, _ = update(ROOT / GRIDS[grid], root, write=not dry_run)
        n, todo, para_jobs, para_todo = grid_todo(grid, claims, root, chosen, waiting)
        if first or dry_run:
            report_todo(n, todo, para_jobs, para_todo, waiting, shard)
        first = False
        i_shard, n_shard = shard
        mine = [t for t in (todo[i_shard::n_shard] or todo) if t[2].run_name not in skipped]
        if dry_run:
            for _, cell, _, _ in todo[i_shard::n_shard]:
                print("python -m experiments.train " + " ".join(cell.overrides)
                      + (f" paths.root={root}" if root else ""))
            run_para_jobs(deal_para(para_todo, shard), True, root)
            return 0
        if not mine:
            failed += run_para_jobs(deal_para(para_todo, shard), False, root)  # sources trained above are used now
            if waiting and waited < wait_s:
                time.sleep(60)
                waited += 60
                continue
            break
        step, _, cfg, why = mine[0]
        t = time.perf_counter()
        if why != "missing":  # a changed config: retrain explicitly; another configuration's folder is still refused
            with open_dict(cfg):
                cfg.trainer.force = True
        try:
            run(cfg)
        except Busy:  # another shard holds it
            skipped.add(cfg.run_name)
            continue
        except UserError as e:  # reported, and the grid goes on: one bad cell must not stall hours of others
            print(f"error: {cfg.run_name}: {e}", file=sys.stderr)
            failed.append(cfg.run_name)
            skipped.add(cfg.run_name)
            continue
        except Exception:  # a crash too (its traceback in the log); the next call retries it
            traceback.print_exc()
            print(f"error: {cfg.run_name} crashed (traceback above)", file=sys.stderr)
            failed.append(cfg.run_name)
            skipped.add(cfg.run_name)
            continue
        waited = 0.0
        skipped.add(cfg.run_name)  # ran here: never again in this process (a run that ends without its results
        # file would otherwise come back as missing on every pass)
        took.append(time.perf_counter() - t)
        # a rough end time: the cells left, shared by the shards, at this process's median cell so far (cells differ:
        # a SmolLM2 cell has cost about 1.5 MiniLM ones so far, a PARA job a fraction)
        left = statistics.median(took) * (len(todo) - 1) / n_shard / 3600
        print(f"[reproduction] {len(todo) - 1} to go: claim {step['claim']}: {cfg.run_name} ({took[-1]:.1f} s; "
              f"about {left:.1f} h left at this process's median cell over {n_shard} shard(s))", flush=True)
    if failed:
        print(f"error: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def grid_todo(grid, claims, root, chosen, waiting):
    """The grid's training cells and PARA jobs: (number of runs, cells to run, PARA jobs, PARA jobs to run)."""
    from experiments.para import para_run_name

    todo, seen, n, para_jobs = [], set(), 0, {}
    for step, cell in reproduction_plan(claims, grid, chosen, waiting):
        cfg = compose(cell.overrides, root)
        if step.get("para"):  # trains nothing: PARA of this cell's run at each setting
            for ke, red in para_settings(step):
                name = para_run_name(cfg.run_name, ke, red)
                para_jobs.setdefault(name, (step, cfg, ke, red, name, cell.overrides))
            continue
        if cfg.run_name in seen:  # a cell shared by two claims (LoRA r=4 seed 42 is in 1b, 2 and 3)
            continue
        seen.add(cfg.run_name)
        n += 1
        why = staleness(cfg, any_commit=True)
        if why:
            todo.append((step, cell, cfg, why))
    para_todo = [job for job in para_jobs.values()
                 if not (Path(job[1].paths.results_dir) / f"{job[4]}.json").exists()]
    return n, todo, para_jobs, para_todo


def deal_para(para_todo: list, shard: tuple[int, int]) -> list:
    """Shard (i, n)'s PARA jobs: every n-th source run from the i-th, with all its settings, so that one process
    restores a source's run folder (restore_source) and the others do not wait on it."""
    sources = list(dict.fromkeys(job[1].run_name for job in para_todo))
    mine = set(sources[shard[0]::shard[1]])
    return [job for job in para_todo if job[1].run_name in mine]


def report_todo(n, todo, para_jobs, para_todo, waiting, shard):
    print(f"[reproduction] {n} runs in the grid, {len(todo)} to run ({n - len(todo)} done)")
    for line in dict.fromkeys(waiting):
        print(f"[reproduction] {line} (chosen by analysis.selection once its runs are in)")
    waiting_para = sum(not (Path(cfg.paths.results_dir) / f"{cfg.run_name}.json").exists()
                       for _, cfg, *_ in para_todo)
    if para_jobs:
        print(f"[reproduction] {len(para_jobs)} PARA runs in the grid, {len(para_todo)} to run "
              f"({waiting_para} of them waiting for their run; {len(para_jobs) - len(para_todo)} done)")
    i_shard, n_shard = shard
    if n_shard > 1:
        print(f"[reproduction] shard {i_shard + 1}/{n_shard}: {len(todo[i_shard::n_shard])} of them here"
              + (f", and {len(deal_para(para_todo, shard))} PARA runs" if para_jobs else ""))
    for step, _, cfg, why in todo[i_shard::n_shard]:
        print(f"  claim {step['claim']}: {cfg.run_name}: {why}")


def parse_shard(text: str) -> tuple[int, int]:
    """'2/3' -> (1, 3): the 0-based index of this shard and the number of shards."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ReproduceError(f"--shard {text!r}: expected I/N with integers, e.g. 1/2") from None
    if not 1 <= i <= n:
        raise ReproduceError(f"--shard {text!r}: I must be between 1 and N, e.g. 1/2 and 2/2")
    return i - 1, n


def compose(overrides: list[str], root: str | None):
    """A grid cell's config, its results under `root` (the grid's folder) when given."""
    from experiments.hydra_cli import compose_train

    return compose_train([*overrides, *([f"paths.root={root}"] if root else [])])


def staleness(cfg, any_commit: bool = False, commit: str | None = None) -> str | None:
    """None if the run's results file is current; else why it must run ('missing', 'stale: ...')."""
    from omegaconf import OmegaConf

    from experiments.identity import result_settings

    path = Path(cfg.paths.results_dir) / f"{cfg.run_name}.json"
    if not path.exists():
        return "missing"
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "stale: unreadable results file"
    old = result_settings(OmegaConf.create(stored.get("config") or {}))
    new = result_settings(cfg)
    if old != new or stored.get("seed") != cfg.seed:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"stale: written from another config ({', '.join(diff[:4]) or 'seed'})"
    if not any_commit and commit and (stored.get("git") or {}).get("commit") != commit:
        return f"stale: written by commit {str((stored.get('git') or {}).get('commit'))[:8]}, now {commit[:8]}"
    return None


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m analysis.reproduce", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table")
    ap.add_argument("--scale", default="smoke")
    ap.add_argument("--root", default=None, help="paths.root for the runs (default: conf/train.yaml's, outputs)")
    ap.add_argument("--out", default=None, help="where the table is written (default: <root>/analysis/<scale>)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="a subset of the grid's seeds")
    ap.add_argument("--variants", nargs="+", default=None, help="a subset of the table's methods / settings")
    ap.add_argument("--any-commit", action="store_true", help="results from another git commit are not stale")
    ap.add_argument("--dry-run", action="store_true", help="print what would run; run nothing")
    ap.add_argument("--claims", nargs="+", default=None, help="reproduction only: run the steps of these claims "
                    "only (e.g. --claims 7 runs the PARA jobs whose LoRA runs exist)")
    ap.add_argument("--wait", type=float, default=0, help="reproduction grids: minutes to keep checking for "
                    "steps that wait on another process's runs before exiting")
    ap.add_argument("--shard", default="1/1", help="I/N runs every N-th missing cell from the I-th, so N processes "
                    "started together share the grid (e.g. 1/2 and 2/2 on two cores)")
    args = ap.parse_args(argv)

    import experiments  # noqa: F401  (registers the run-name resolver)
    from experiments.results import git_info

    if args.table in GRIDS:
        return run_reproduction(args.root, args.dry_run, parse_shard(args.shard), args.claims, args.table,
                                60 * args.wait)

    t0 = time.perf_counter()
    cells = plan(args.table, args.scale, args.seeds, args.variants)
    i_shard, n_shard = parse_shard(args.shard)
    note = paper.scales()["scales"][args.scale].get("note")
    if note:  # what the scale caps, and what it costs: said before anything runs
        print(f"[reproduce] scale {args.scale}: {' '.join(note.split())}")
    commit = git_info()["commit"]
    todo, names, results_dir = [], [], None
    for cell in cells:
        cfg = compose(cell.overrides, args.root)
        names.append(cfg.run_name)
        results_dir = Path(cfg.paths.results_dir)
        why = staleness(cfg, args.any_commit, commit)
        if why:
            todo.append((cell, cfg, why))
    print(f"[reproduce] {args.table} at scale {args.scale}: {len(cells)} runs in the grid, {len(todo)} to run "
          f"({len(cells) - len(todo)} current)")
    if n_shard > 1:
        todo = todo[i_shard::n_shard]
        print(f"[reproduce] shard {i_shard + 1}/{n_shard}: {len(todo)} of them here")
    for _, cfg, why in todo:
        print(f"  {cfg.run_name}: {why}")
    if args.dry_run:
        for cell, _, _ in todo:
            print("python -m experiments.train " + " ".join(cell.overrides)
                  + (f" paths.root={args.root}" if args.root else ""))
        return 0

    from omegaconf import open_dict

    from experiments.train import run
    from lrlora.errors import UserError

    for i, (_, cfg, why) in enumerate(todo, 1):
        t = time.perf_counter()
        if why != "missing":  # a stale results file: retrain explicitly (the run guard would call it done). A run
            with open_dict(cfg):  # folder holding another configuration is still refused, never overwritten.
                cfg.trainer.force = True
        try:
            run(cfg)
        except UserError as e:  # the user's to fix: named with the cell it stopped at
            raise ReproduceError(f"{cfg.run_name}: {e}") from None
        print(f"[reproduce] {i}/{len(todo)} {cfg.run_name} ({time.perf_counter() - t:.1f} s)")

    from analysis.load import load_results
    from analysis.registry import build

    df = load_results([results_dir])
    df = df[df["run_name"].isin(names)]
    out = Path(args.out) if args.out else results_dir.parent / "analysis" / args.scale
    table = build(args.table, df=df, out=out)
    print(table.markdown())
    print(f"-> {out}/{args.table}.md, .csv, .tex  ({time.perf_counter() - t0:.0f} s, {len(todo)} runs trained)")
    return 0


if __name__ == "__main__":
    cli.run(main)
