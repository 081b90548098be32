"""A built table and its writers: Markdown, CSV and LaTeX, one file each, from the same cells.

    table = Table(name="table1", title="...", columns=[...], rows=[[...], ...], notes=["..."])
    table.markdown(); table.write(out_dir)   # -> out_dir/table1.{md,csv,tex}
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from lrlora._atomic import check_owned, write_owned

MISSING = "missing"


def fmt_cell(mean, std, n, digits: int = 2, expected: int | None = None, mark: str = "") -> str:
    """`55.12 ± 0.30 (n=3)`, `55.12 (n=1)`, `missing`; `(n=2/3)` when fewer runs than the grid has."""
    if n == 0 or mean is None:
        return MISSING
    count = f"n={n}" if expected is None or n >= expected else f"n={n}/{expected}"
    spread = f" ± {std:.{digits}f}" if std is not None else ""
    return f"{mean:.{digits}f}{mark}{spread} ({count})"


def fmt_paper(mean, std) -> str:
    if mean in (None, ""):
        return "—"
    return f"{mean} ± {std}" if std not in (None, "") else f"{mean}"


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        def esc(c):
            return str(c).replace("|", "\\|")
        lines = [f"**{self.title}**", "", "| " + " | ".join(map(esc, self.columns)) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(map(esc, row)) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"{n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        w.writerows(self.rows)
        return buf.getvalue()

    def latex(self) -> str:
        def esc(s):
            s = str(s)
            for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                         ("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("σ", r"$\sigma$"), ("|", r"$|$")):
                s = s.replace(a, b)
            return s
        lines = [r"\begin{table}[t]", r"\centering", r"\small",
                 r"\begin{tabular}{l" + "c" * (len(self.columns) - 1) + "}", r"\toprule",
                 " & ".join(esc(c) for c in self.columns) + r" \\", r"\midrule"]
        lines += [" & ".join(esc(c) for c in row) + r" \\" for row in self.rows]
        lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + esc(self.title) + "}", r"\end{table}"]
        return "\n".join(lines) + "\n"

    def write(self, out_dir) -> list[Path]:
        """out_dir/name.md, .csv, .tex; each replaces only a file analysis wrote there, unchanged since
        (lrlora._atomic.write_owned): a user's file of that name is refused before any of the three is written."""
        out = Path(out_dir)
        texts = {out / f"{self.name}.{ext}": text for ext, text in
                 (("md", self.markdown()), ("csv", self.csv()), ("tex", self.latex()))}
        for path in texts:
            check_owned(path)
        return [write_owned(path, text) for path, text in texts.items()]
