"""Drawing what the figures and the claims share: pyplot without a display, a figure written as PNG and PDF, and
per-layer values grouped by depth (attention and MLP apart).

    from analysis.plots import GROUPS, by_layer, pyplot, save
    fig, axes = pyplot().subplots(1, 2)
    layers = by_layer(runs["stable_ranks.per_layer"], "attention")   # {layer: [values over modules and runs]}
    paths = save(fig, out, "fig2")                                    # out/fig2.png, out/fig2.pdf
"""

from __future__ import annotations

from pathlib import Path

from analysis.select import layer_groups
from lrlora._atomic import check_owned, write_owned

GROUPS = ("attention", "MLP")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out: Path, name: str) -> list[Path]:
    """fig as out/name.png and .pdf, each replacing only a file analysis wrote there (lrlora._atomic.write_owned)."""
    import io

    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:  # both refused before either is written
        check_owned(p)
    fig.tight_layout()
    for p in paths:
        buf = io.BytesIO()
        # no creation date in a PDF: the same figure gives the same bytes, so `make report` leaves git clean
        fig.savefig(buf, format=p.suffix[1:], dpi=130, metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
        write_owned(p, buf.getvalue())
    pyplot().close(fig)
    return paths


def by_layer(per_layers, group: str, field: str = "stable_rank") -> dict[int, list]:
    """{layer: [value of every module of the group at that layer, over all runs given]}."""
    out: dict[int, list] = {}
    for pl in per_layers:
        for name, row in (pl or {}).items():
            if row.get("layer") is None or field not in row:
                continue
            if layer_groups({name: row})[group]:
                out.setdefault(int(row["layer"]), []).append(row[field])
    return out
