"""`python -m analysis <target> [--results DIR ...] [--out DIR] [--run RUN_FOLDER] [--tag TAG]`; `tables`, `figures`,
`list`. Tables and figures go to --out, never over a file analysis did not write there, and never into a folder of
results files."""

from __future__ import annotations

from pathlib import Path

from analysis.load import ResultsError
from analysis.registry import TARGETS, build, load_all
from lrlora import cli


def check_out(out: str, results: list[str]) -> None:
    """--out must not be (or lie inside) a results folder: a table among the results files would be read back as one
    and would hide among them."""
    from analysis.load import read_results

    o = Path(out).resolve()
    folders = [r.parent if r.is_file() else r for r in (Path(x).resolve() for x in results)]
    holds_results = o.is_dir() and any(_is_results(f, read_results) for f in o.glob("*.json"))
    if holds_results or any(o == f or f in o.parents for f in folders):
        raise ResultsError(f"--out {out} is a folder of results files (or inside one): tables and figures would land "
                           f"among them; choose another folder, e.g. --out outputs/analysis")


def _is_results(path: Path, read) -> bool:
    try:
        read(path)
    except ResultsError:
        return False
    return True


def main(argv=None) -> int:
    load_all()
    ap = cli.ArgumentParser(prog="python -m analysis", description=__doc__)
    ap.add_argument("target", help=f"one of: {', '.join(sorted(TARGETS))}; or tables, figures, list")
    ap.add_argument("--results", nargs="+", default=["outputs/results"], help="folders (or files) of results JSON")
    ap.add_argument("--out", default="outputs/analysis", help="where tables and figures are written")
    ap.add_argument("--run", default=None, help="a run folder, for targets built from one run (fig_landscape)")
    ap.add_argument("--tag", default=None, help="only runs with this tag (e.g. table13, set by its sweep)")
    args = ap.parse_args(argv)
    if args.target == "list":
        for t in sorted(TARGETS.values(), key=lambda t: t.name):
            print(f"{t.name:14s} {t.kind:7s} {t.paper}{'  (needs --run)' if t.needs_run else ''}")
        return 0
    names = ([t for t in sorted(TARGETS) if TARGETS[t].kind == args.target[:-1] and not TARGETS[t].needs_run]
             if args.target in ("tables", "figures") else [args.target])
    if args.target not in ("tables", "figures") and args.target not in TARGETS:
        raise cli.UsageError(f"unknown target {args.target!r}; choose one of {', '.join(sorted(TARGETS))} "
                             f"(or tables, figures, list)")
    if TARGETS.get(args.target) and TARGETS[args.target].needs_run and not args.run:
        raise cli.UsageError(f"{args.target} is built from one run folder: pass --run outputs/runs/<run_name>")
    check_out(args.out, args.results)
    df = None
    if args.tag:
        from analysis.load import has_tag, load_results

        df = load_results(args.results)
        df = df[has_tag(df, args.tag)] if len(df) else df
    for name in names:
        result = build(name, results=args.results, out=args.out, run=args.run, df=df)
        if TARGETS[name].kind == "table":
            print(result.markdown())
            print(f"-> {args.out}/{name}.md, .csv, .tex\n")
        else:
            print(f"{name} -> {', '.join(map(str, result))}" if result else f"{name}: no data, nothing written")
    return 0


if __name__ == "__main__":
    cli.run(main)
