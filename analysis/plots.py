"""Drawing what the figures and the claims share: pyplot without a display, a figure written as PNG and PDF, and
per-layer values grouped by depth (attention and MLP apart).

    from analysis.plots import GROUPS, by_layer, pyplot, save
    fig, axes = pyplot().subplots(1, 2)
    layers = by_layer(runs["stable_ranks.per_layer"], "attention")   # {layer: [values over modules and runs]}
    paths = save(fig, out, "fig2")                                    # out/fig2.png, out/fig2.pdf
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from analysis.select import layer_groups
from lrlora._atomic import check_owned, write_owned

GROUPS = ("attention", "MLP")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


DIGEST = "lrlora-data:"  # a figure's metadata: the digest of what it draws, so a stale committed figure can be told


def digest(data) -> str:
    """A short digest of the values a figure draws (JSON; anything else as its str)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def digest_of(png: Path) -> str | None:
    """The digest a PNG written by `save(..., data=...)` carries; None if it carries none."""
    from PIL import Image

    with Image.open(png) as image:
        text = image.text.get("Description", "")
    return text[len(DIGEST):] if text.startswith(DIGEST) else None


def save(fig, out: Path, name: str, data=None) -> list[Path]:
    """fig as out/name.png and .pdf, each replacing only a file analysis wrote there (lrlora._atomic.write_owned).
    `data`, the values drawn: its digest goes into both files' metadata (PNG Description, PDF Subject), which does
    not depend on the matplotlib that renders them (tests compare a committed figure's digest with a rebuild's)."""
    import io

    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:  # both refused before either is written
        check_owned(p)
    fig.tight_layout()
    mark = {} if data is None else {"png": {"Description": DIGEST + digest(data)},
                                    "pdf": {"Subject": DIGEST + digest(data)}}
    for p in paths:
        buf = io.BytesIO()
        kind = p.suffix[1:]
        # no creation date in a PDF: the same figure gives the same bytes, so `make report` leaves git clean
        meta = {**({"CreationDate": None} if kind == "pdf" else {}), **mark.get(kind, {})}
        fig.savefig(buf, format=kind, dpi=130, metadata=meta or None)
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
