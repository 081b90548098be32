"""One target per paper artefact (registered with analysis.targets.target): every one loaded, and one built.

    from analysis.registry import TARGETS, build
    build("table1", results=["outputs/results"], out="outputs/analysis")
"""

from __future__ import annotations

from pathlib import Path

from analysis.targets import TARGETS, Context


def load_all() -> None:
    import analysis.claims  # noqa: F401
    import analysis.cost  # noqa: F401
    import analysis.figures  # noqa: F401
    import analysis.mechanism  # noqa: F401
    import analysis.selection  # noqa: F401
    import analysis.tables  # noqa: F401
    import analysis.verdict_tables  # noqa: F401
    import analysis.verdicts  # noqa: F401


def build(name: str, results=("outputs/results",), out="outputs/analysis", run=None, df=None, write: bool = True,
          **options):
    """Build one target; tables are written as .md/.csv/.tex (unless `write` is false), figures as .png/.pdf.
    Returns the Table (its text is `.markdown()`) or the figure's paths."""
    from analysis.load import load_results, para_derived

    load_all()
    if name not in TARGETS:
        raise KeyError(f"unknown target {name!r}; known: {', '.join(sorted(TARGETS))}")
    t = TARGETS[name]
    ctx = Context(out=Path(out), run=Path(run) if run else None, options=options)
    if t.needs_run and ctx.run is None:
        raise ValueError(f"{name} is built from one run folder: pass --run outputs/runs/<run_name>")
    if t.own_results:  # its results folder is its own (a rules file names it), whatever `results` says
        frame = None
    else:
        frame = df if df is not None or t.needs_run else load_results(results)
    if frame is not None and not t.reads_para and len(frame):
        # a PARA results file keeps its source's identity (backbone, adapter, r, seed): counted as a run, it
        # would be a second seed of its source in every table of methods
        frame = frame[~para_derived(frame)]
    result = t.fn(frame, ctx)
    if t.kind == "table" and write:
        result.write(ctx.out)
    return result
