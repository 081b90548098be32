"""Selecting runs and cells from the results DataFrame (analysis.load): what the tables, the figures and the
claims of REPRODUCTION.md share.

    from analysis.select import cell_runs, get_column, matching, method_rows, ordered_columns
    for label, method, r in method_rows(df):
        for column in ordered_columns(df):
            runs = cell_runs(df, column, method, r)      # one cell: that method (at that r) in that column
    df[matching(df, {"adapter": "lrlora", "config.adapter.center": True, "r": 4})]   # a filter written as data

Runs are selected by fields (column, method, r, variant), never by lists of names.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd

from analysis import paper
from analysis.load import method_labels

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "attention.output.dense",
             "attn", "self_attn")


def method_order() -> list[str]:
    """The order of a table's method rows: Table 1's, as the paper prints them, then every other method."""
    labels = set(method_labels().values())
    first = list(dict.fromkeys(row for row, _ in paper.values("table1") if row in labels))
    return first + sorted(labels - set(first))


def get_column(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)


def matching(df: pd.DataFrame, filters: dict) -> pd.Series:
    """The rows whose every column named in `filters` holds its value: numbers compare as numbers (4 == 4.0,
    within 1e-9), booleans only with booleans, strings as strings, None matches a missing value, and a list any
    of its values. A column no results file has matches nothing (None excepted)."""
    mask = pd.Series(True, index=df.index)
    for column, want in filters.items():
        mask &= get_column(df, column).map(lambda x, want=want: _holds(x, want)).astype(bool)
    return mask


def _holds(x, want) -> bool:
    if isinstance(want, (list, tuple)):
        return any(_holds(x, w) for w in want)
    missing = x is None or (isinstance(x, float) and math.isnan(x))
    if want is None or missing:
        return want is None and missing
    if isinstance(want, (bool, np.bool_)) or isinstance(x, (bool, np.bool_)):  # True is not 1 here
        return isinstance(want, (bool, np.bool_)) and isinstance(x, (bool, np.bool_)) and bool(x) == bool(want)
    if isinstance(want, numbers.Number):
        return isinstance(x, numbers.Number) and math.isclose(float(x), float(want), rel_tol=1e-9, abs_tol=1e-12)
    return isinstance(x, str) and x == want


def ordered_columns(d: pd.DataFrame) -> list[str]:
    """Our columns, those standing in for a paper column first, in the paper's column order."""
    order = {c: i for i, c in enumerate(p for p, _ in paper.standins().values()) if c is not None}  # paper: null
    return sorted(d["column"].unique(), key=lambda c: (order.get(paper.paper_column(c), 99), c))


def method_rows(d: pd.DataFrame, paper_rows=()) -> list[tuple[str, str, object]]:
    """(label, adapter method, r) per row: one row per method, or per (method, r) where one method ran at
    several ranks; paper methods with no run at all keep a row (shown missing)."""
    rows = []
    found = d.groupby("method")["r"].unique().to_dict() if len(d) else {}
    order = method_order()
    names = [m for m in order if m in found or m in paper_rows] + sorted(set(found) - set(order))
    for m in names:
        rs = sorted(found.get(m, [None]), key=lambda x: (x is None, x))
        for r in rs:
            rows.append((m if len(rs) == 1 else f"{m}-{r}", m, r))
    return rows


def cell_runs(d: pd.DataFrame, column: str, method: str, r) -> pd.DataFrame:
    sel = (d["column"] == column) & (d["method"] == method)
    if r is not None:
        sel &= d["r"] == r
    return d[sel]


def layer_groups(per_layer: dict) -> dict[str, list[float]]:
    out = {"attention": [], "MLP": []}
    for row in (per_layer or {}).values():
        t = str(row.get("type", ""))
        out["attention" if any(t == a or t.endswith(a) for a in ATTENTION) else "MLP"].append(row["stable_rank"])
    return out
