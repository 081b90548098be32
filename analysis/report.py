"""Rebuild the generated tables of a report (REPRODUCTION.md) from the results files, in place.

    python -m analysis.report REPRODUCTION.md                 # rewrite every generated block
    python -m analysis.report REPRODUCTION.md --check         # exit 1 if a block differs from what analysis gives

A generated block is the text between `<!-- analysis: <target> -->` and `<!-- /analysis -->`: the markdown of
that analysis target (analysis/claims.py, or any table target) built from `--results`. Only those blocks are
written; the prose around them is the author's and is never touched.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from lrlora._atomic import atomic_write

BLOCK = re.compile(r"(<!-- analysis: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /analysis -->)", re.S)
RESULTS = "results/reproduction/results"


def blocks(text: str) -> list[str]:
    return [m.group("name") for m in BLOCK.finditer(text)]


def regenerate(text: str, results=(RESULTS,)) -> str:
    """The report with every generated block rebuilt from the results files."""
    from analysis.load import load_results
    from analysis.registry import TARGETS, _load_all, build

    _load_all()
    df = load_results(list(results))

    def body(m: re.Match) -> str:
        name = m.group("name")
        if name not in TARGETS or TARGETS[name].kind != "table":
            raise ValueError(f"report block {name!r} is not a table target; known: "
                             f"{', '.join(t for t in sorted(TARGETS) if TARGETS[t].kind == 'table')}")
        table = build(name, df=df, write=False)
        return m.group(1) + table.markdown() + m.group(4)

    return BLOCK.sub(body, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", nargs="?", default="REPRODUCTION.md")
    ap.add_argument("--results", nargs="+", default=[RESULTS])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    args = ap.parse_args(argv)
    path = Path(args.report)
    if not path.is_file():
        print(f"error: no report at {path}; pass the path of REPRODUCTION.md", file=sys.stderr)
        return 2
    text = path.read_text()
    if not blocks(text):
        print(f"error: {path} has no generated block (<!-- analysis: <target> --> ... <!-- /analysis -->)",
              file=sys.stderr)
        return 2
    try:
        new = regenerate(text, args.results)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stale = [n for n, a, b in zip(blocks(text), BLOCK.finditer(text), BLOCK.finditer(new)) if a.group(0) != b.group(0)]
    if args.check:
        if stale:
            print(f"{path}: out of date: {', '.join(stale)} (run python -m analysis.report {path})", file=sys.stderr)
            return 1
        print(f"{path}: {len(blocks(text))} generated blocks, all current")
        return 0
    if stale:
        atomic_write(path, new)
    print(f"{path}: {len(stale)} of {len(blocks(text))} blocks rebuilt" + (f" ({', '.join(stale)})" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
