"""Remove what the harness wrote under an outputs root, by its own marks, and nothing else.

    python -m experiments.clean                    # = make clean: outputs/ (or $LRLORA_OUTPUTS)
    python -m experiments.clean --root DIR --dry-run   # list what would go

The marks: a run folder is ours when it holds the run.json a run writes (`runs/NAME/run.json`) or has a results file
of ours (a PARA run's `results/NAME.json`), and in it only the
entries a run or a re-scoring writes go (experiments.guard.RUN_ENTRIES; a folder written through lrlora._atomic,
such as adapter/ or checkpoint/, only the files its manifest lists); a results file is ours when it is a
`results/NAME.json` whose run_name is NAME and that carries the git and versions a run records; a file analysis
wrote is listed, with its sha256, in its folder's `.lrlora-files` ledger (lrlora._atomic.write_owned) and goes only
if unchanged since; Hydra's `multirun.yaml` goes from a multirun folder. A user's notes anywhere (in a run folder
too), a changed table, a folder this code never writes (a top-level runs/) stay; a folder is removed only once
emptied of what was ours.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from experiments.guard import RUN_ENTRIES, RUN_META
from lrlora import cli
from lrlora._atomic import LEDGER, MANIFEST, read_manifest, remove_owned
from lrlora.errors import ConfigError


def _remove_written_folder(folder: Path, removed: list[Path], dry: bool) -> None:
    """A folder lrlora._atomic wrote: the entries its manifest lists, the manifest, then the folder if empty."""
    names = read_manifest(folder)
    if names is None:  # a folder of ours from before manifests (a checkpoint has its checkpoint.json): all of it
        if not (folder / "checkpoint.json").is_file():
            return
        names = [p.name for p in folder.iterdir()]
    for name in [*names, MANIFEST]:
        p = folder / name
        if p.exists():
            removed.append(p)
            if not dry:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    _rmdir(folder, dry)


def _rmdir(folder: Path, dry: bool) -> None:
    if not dry:
        try:
            folder.rmdir()
        except OSError:
            pass


def _is_results_file(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("run_name") == path.stem and "git" in d and "versions" in d


def clean(root: str | os.PathLike, dry: bool = False) -> list[Path]:
    """Remove (or, dry, list) what the harness wrote under `root`; returns the paths."""
    root = Path(root)
    removed: list[Path] = []
    if not root.exists():
        return removed
    folders = sorted((p for p in [root, *root.rglob("*")] if p.is_dir() and not p.is_symlink()),
                     key=lambda p: len(p.parts), reverse=True)  # the deepest first
    for d in folders:
        if not d.exists():
            continue
        results_file = d.parent.parent / "results" / f"{d.name}.json"
        if d.parent.name == "runs" and ((d / RUN_META).is_file() or _is_results_file(results_file)):  # a run of ours
            for name in RUN_ENTRIES:
                p = d / name
                if p.is_dir() and (read_manifest(p) is not None or (p / "checkpoint.json").is_file()):
                    _remove_written_folder(p, removed, dry)
                elif p.is_dir() and name == "predictions":  # the protocols' <protocol>.jsonl files
                    for f in sorted(p.glob("*.jsonl")):
                        removed.append(f)
                        if not dry:
                            f.unlink()
                    _rmdir(p, dry)
                elif p.is_dir() and name in ("lm_eval_tasks", "wandb"):  # generated whole (task files; W&B's own)
                    removed.append(p)
                    if not dry:
                        shutil.rmtree(p)
                elif p.is_file():
                    removed.append(p)
                    if not dry:
                        p.unlink()
            for left in [*d.glob(".*.new.*"), *d.glob(".*.old.*")]:  # an interrupted save's folder
                if left.is_dir() and read_manifest(left) is not None:
                    removed.append(left)
                    if not dry:
                        shutil.rmtree(left)
            _rmdir(d, dry)
        if d.name == "results":
            for f in sorted(d.glob("*.json")):
                if _is_results_file(f):
                    removed.append(f)
                    if not dry:
                        f.unlink()
        if (d / LEDGER).is_file():
            if dry:
                from lrlora._atomic import owned_files

                removed += owned_files(d)
            else:
                removed += remove_owned(d)
        if "multirun" in d.relative_to(root).parts and (d / "multirun.yaml").is_file():
            removed.append(d / "multirun.yaml")
            if not dry:
                (d / "multirun.yaml").unlink()
    emptied = {a for p in removed for a in p.parents if a == root or root in a.parents}
    for d in folders:  # the deepest first: a folder emptied of what was ours goes too, and Hydra's job folders
        if d in emptied or ("multirun" in d.relative_to(root).parts and d.exists() and not any(d.iterdir())):
            _rmdir(d, dry)
    return removed


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m experiments.clean", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.environ.get("LRLORA_OUTPUTS", "outputs"), help="the outputs root")
    ap.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--root {root} is a file, not an outputs folder")
    removed = clean(root, args.dry_run)
    for p in removed:
        print(("would remove " if args.dry_run else "removed ") + str(p))
    kept = sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() and not args.dry_run else []
    print(f"{len(removed)} entries {'to remove' if args.dry_run else 'removed'} under {root}"
          + (f"; {len(kept)} files kept (not written by this code)" if kept else ""))
    return 0


if __name__ == "__main__":
    cli.run(main)
