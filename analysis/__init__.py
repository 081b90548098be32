"""Results files -> one DataFrame -> the paper's tables and figures (the only place they are made).

    python -m analysis table1 [--results DIR ...] [--out DIR]     # one target: .md/.csv/.tex or .png/.pdf
    python -m analysis tables | figures | list
    python -m analysis fig_landscape --run outputs/runs/<run_name>
    python -m analysis.reproduce table1 --scale smoke              # run what is missing or stale, then build

    from analysis import load_results, build
    df = load_results(["outputs/results"]); table = build("table1", df=df, out="outputs/analysis")
"""

from analysis.load import load_results
from analysis.registry import TARGETS, build

__all__ = ["load_results", "build", "TARGETS"]
