"""Rebuild the generated tables of a report (REPRODUCTION.md) from the results files, in place.

    python -m analysis.report REPRODUCTION.md                 # rewrite every generated block
    python -m analysis.report REPRODUCTION.md --check         # exit 1 if a block differs from what analysis gives

A generated block is the text between a line `<!-- analysis: <target> -->` and the next line `<!-- /analysis -->`:
the markdown of that analysis target (analysis/claims.py, or any table target) built from `--results`, or, for a
target with its own results folder (analysis/verdicts.py: the one its rules file names), from that. Only those
blocks are written; the prose around them is the author's and is never touched. Markers are read strictly: a
block is rebuilt only when its opening and closing lines are both found, in that order, with no marker between;
a line that looks like a damaged marker (`<!-- /analysis ->`, `<!-- analysis:claim1-->`, ...) or markers out of
order are an error naming the line, and nothing is written.

Prose that quotes a block's numbers says so: a line `<!-- cites: <target> [<target> ...] -->` (invisible once
rendered; `FILE#<target>` for another report's block, FILE relative to this one) before a paragraph makes every
decimal number in that paragraph (44.7, 0.12, 47.8%) a quotation of those blocks, and the rebuild and `--check`
both fail, naming the line and the number, when none of the blocks holds it (as printed, or rounded to the
prose's digits). A difference or ratio is not a quotation: say it in words, or give it a column. Integers and
numbers like 1e-3 (rates, seeds, settings) are not checked.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from lrlora import cli
from lrlora._atomic import atomic_write
from lrlora.errors import UserError

OPEN = re.compile(r"<!-- analysis: (?P<name>[\w-]+) -->")
CLOSE = "<!-- /analysis -->"
CITES = re.compile(r"<!-- cites: (?P<names>\S+(?: \S+)*) -->")  # a block of this file, or FILE#block of another
QUOTED = re.compile(r"(?<![\w.])\d+\.\d+(?!\d|\.\d|e[-+]?\d|[A-Za-z_])")  # a decimal in prose: not 1.5e-3, not 1.2.3
HELD = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")           # a number printed in a block
LOOKS_LIKE = re.compile(r"^<!?-*\s*/?\s*analysis\b|analysis\s*:?\s*[\w-]*\s*-*>\s*$", re.I)  # a marker, damaged
RESULTS = "results/reproduction/results"


class ReportError(UserError, ValueError):
    """A report whose block markers are damaged or out of order, or a block naming no table target."""


@dataclass
class Block:
    name: str
    start: int  # offset of the first character after the opening line
    end: int    # offset of the closing line


def parse(text: str, path: str = "the report") -> list[Block]:
    """The generated blocks of `text`, in order; ReportError for a damaged marker or markers out of order."""
    blocks, open_at, offset = [], None, 0
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        s = line.strip()
        m = OPEN.fullmatch(s)
        if m:
            if open_at is not None:
                raise ReportError(f"{path}:{number}: block {m.group('name')!r} opens before block "
                                  f"{open_at[0]!r} (line {open_at[1]}) is closed with {CLOSE}; nothing was written")
            open_at = (m.group("name"), number, offset + len(line))
        elif s == CLOSE:
            if open_at is None:
                raise ReportError(f"{path}:{number}: {CLOSE} closes no block; nothing was written")
            blocks.append(Block(open_at[0], open_at[2], offset))
            open_at = None
        elif "`" not in s and LOOKS_LIKE.search(s):
            raise ReportError(f"{path}:{number}: {s!r} looks like a damaged block marker: fix it to "
                              f"'<!-- analysis: NAME -->' or {CLOSE!r}; nothing was written")
        offset += len(line)
    if open_at is not None:
        raise ReportError(f"{path}:{open_at[1]}: block {open_at[0]!r} is never closed with {CLOSE}; nothing was "
                          f"written")
    return blocks


def blocks(text: str) -> list[str]:
    return [b.name for b in parse(text)]


def regenerate(text: str, results=(RESULTS,), path: str = "the report") -> str:
    """The report with every generated block rebuilt from the results files; the text outside blocks unchanged."""
    from analysis.load import load_results
    from analysis.registry import TARGETS, build, load_all

    found = parse(text, path)
    load_all()
    for b in found:
        if b.name not in TARGETS or TARGETS[b.name].kind != "table":
            raise ReportError(f"report block {b.name!r} is not a table target; known: "
                              f"{', '.join(t for t in sorted(TARGETS) if TARGETS[t].kind == 'table')}")
    df = None  # read once, and only when a block reads --results (a target with its own results folder does not)
    out, at = [], 0
    for b in found:
        if df is None and not TARGETS[b.name].own_results:
            df = load_results(list(results))
        out += [text[at:b.start], build(b.name, df=df, write=False).markdown()]
        at = b.end
    new = "".join(out) + text[at:]
    if _outside(text, found) != _outside(new, parse(new, path)):  # never changes the author's prose
        raise RuntimeError("the rebuilt report differs outside its blocks")
    return new


def _outside(text: str, found: list[Block]) -> list[str]:
    edges = [0, *[x for b in found for x in (b.start, b.end)], len(text)]
    return [text[edges[i]:edges[i + 1]] for i in range(0, len(edges), 2)]


def misquoted(text: str, path: str = "the report") -> list[str]:
    """The numbers that paragraphs marked `<!-- cites: ... -->` quote and none of the named blocks holds (module
    docstring), each as 'path:line: ...'; ReportError for a citation of a block the report does not have."""
    found = {b.name: text[b.start:b.end] for b in parse(text, path)}
    lines = text.splitlines()
    problems = []
    for i, line in enumerate(lines):
        m = CITES.fullmatch(line.strip())
        if not m:
            continue
        names = m.group("names").split()
        held = [float(x) for n in names for x in HELD.findall(_cited(n, found, path, i + 1))]
        j = i + 1
        while j < len(lines) and lines[j].strip():  # the paragraph: up to the next blank line
            for q in QUOTED.findall(lines[j]):
                digits = len(q.split(".")[1])
                if not any(f"{x:.{digits}f}" == q for x in held):
                    problems.append(f"{path}:{j + 1}: {q} is quoted from {', '.join(names)} but none of them "
                                    f"holds it (a number there, rounded to {digits} decimal{'s' if digits > 1 else ''})")
            j += 1
    return problems


def _cited(name: str, found: dict, path: str, line: int) -> str:
    """The text of a cited block: NAME in this report, or FILE#NAME in another (FILE relative to this report)."""
    where, _, block = name.rpartition("#")
    if where:
        other = Path(path).parent / where
        if not other.is_file():
            raise ReportError(f"{path}:{line}: cites {name}, but there is no file {other}")
        text = other.read_text()
        found = {b.name: text[b.start:b.end] for b in parse(text, str(other))}
    if block not in found:
        raise ReportError(f"{path}:{line}: cites {name}, which {where or 'this report'} has no block of; its "
                          f"blocks: {', '.join(found) or 'none'}")
    return found[block]


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m analysis.report", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", nargs="?", default="REPRODUCTION.md")
    ap.add_argument("--results", nargs="+", default=[RESULTS])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    args = ap.parse_args(argv)
    path = Path(args.report)
    if not path.is_file():
        raise ReportError(f"no report at {path}; pass the path of REPRODUCTION.md")
    text = path.read_text()
    old = parse(text, str(path))
    if not old:
        raise ReportError(f"{path} has no generated block (<!-- analysis: <target> --> ... {CLOSE})")
    new = regenerate(text, args.results, str(path))
    fresh = parse(new, str(path))
    stale = [a.name for a, b in zip(old, fresh) if text[a.start:a.end] != new[b.start:b.end]]
    problems = misquoted(new, str(path))  # the prose against the blocks as rebuilt
    if args.check:
        if stale:
            print(f"{path}: out of date: {', '.join(stale)} (run python -m analysis.report {path})")
        for p in problems:
            print(p)
        if stale or problems:
            return 1
        print(f"{path}: {len(old)} generated blocks, all current; the prose quotes them as they are")
        return 0
    if stale:
        atomic_write(path, new)
    print(f"{path}: {len(stale)} of {len(old)} blocks rebuilt" + (f" ({', '.join(stale)})" if stale else ""))
    for p in problems:  # the blocks are written either way: they are the data; the prose is the author's to fix
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    cli.run(main)
