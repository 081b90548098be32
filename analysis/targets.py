"""The target registry: `@target("table1", "table", "Table 1")` registers `fn(df, ctx) -> Table | Path`. The
modules that define targets (tables, figures, claims) import this one; analysis.registry loads them all and
builds one.

    from analysis.targets import target

    @target("table1", "table", "Table 1")
    def table1(df, ctx): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TARGETS: dict[str, Target] = {}


@dataclass
class Target:
    name: str
    kind: str            # table | figure
    paper: str           # the paper artefact it rebuilds
    fn: Callable
    needs_run: bool = False  # built over one run folder (--run), not over the results table
    reads_para: bool = False  # sees PARA's compressed copies of runs (every other target: the runs only)
    own_results: bool = False  # reads the results folder its own options name (a rules file), never --results:
                               # build passes it no DataFrame (analysis.verdicts)


@dataclass
class Context:
    """What a target may read besides the DataFrame."""
    out: Path
    run: Path | None = None            # a run folder (targets with needs_run)
    options: dict = field(default_factory=dict)


def target(name: str, kind: str, paper: str, needs_run: bool = False, reads_para: bool = False,
           own_results: bool = False):
    def deco(fn):
        TARGETS[name] = Target(name, kind, paper, fn, needs_run, reads_para, own_results)
        return fn
    return deco
