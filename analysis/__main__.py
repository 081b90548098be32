"""`python -m analysis <target> [--results DIR ...] [--out DIR] [--run RUN_FOLDER] [--tag TAG]`; `tables`, `figures`,
`list`."""

from __future__ import annotations

import argparse
import sys

from analysis.load import ResultsError
from analysis.registry import TARGETS, _load_all, build


def main(argv=None) -> int:
    _load_all()
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
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
        print(f"error: unknown target {args.target!r}; choose one of {', '.join(sorted(TARGETS))} "
              f"(or tables, figures, list)", file=sys.stderr)
        return 2
    try:
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
    except (ResultsError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
