"""The paper's numbers, stored once as data (analysis/paper/<table>.csv, written from the paper's text by
scripts/extract_paper_values.py with each value's table/row/column source), and the stand-in map from our
columns (backbone, data) to the paper's columns (analysis/scales.yaml).
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


@cache
def values(table: str) -> dict[tuple[str, str], tuple[str, str]]:
    """{(row, column): (mean, std)} as printed in the paper ('' where the paper gives no std)."""
    path = HERE / "paper" / f"{table}.csv"
    if not path.exists():
        return {}
    with path.open() as f:
        return {(r["row"], r["column"]): (r["mean"], r["std"]) for r in csv.DictReader(f)}


def value(table: str, row: str, column: str) -> tuple[str, str] | None:
    return values(table).get((row, column))


@cache
def scales() -> dict:
    return yaml.safe_load((HERE / "scales.yaml").read_text())


def _column_label(overrides: list[str]) -> str:
    kv = dict(o.split("=", 1) for o in overrides if "=" in o)
    data = kv.get("regime", "?")
    if kv.get("regime.n_train") not in (None, "null"):
        data += f"[n={kv['regime.n_train']}]"
    from analysis.load import column_label

    return column_label(kv.get("backbone", "?"), data)


@cache
def standins() -> dict[str, tuple[str, str]]:
    """{our column label: (paper column, scale)} for every column of every scale in analysis/scales.yaml."""
    out = {}
    for scale, spec in scales()["scales"].items():
        for col in spec["columns"]:
            out[_column_label(col["overrides"])] = (col["paper"], scale)
    return out


def paper_column(column: str) -> str | None:
    hit = standins().get(column)
    return hit[0] if hit else None
