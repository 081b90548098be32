"""Write analysis/paper/*.csv, the paper's numbers that analysis/ prints beside ours, from the paper's text.

    python -m scripts.extract_paper_values PAPER.txt      # the paper's text (pdftotext -layout)

Each row keeps its source (table, row, column as the paper prints them). Numbers are parsed from the text,
never typed in; values the text lost (Table 3's K values, Table 4's stable ranks) are left out.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from lrlora import cli
from lrlora.errors import ConfigError

OUT = Path(__file__).resolve().parent.parent / "analysis" / "paper"
NUM = r"([0-9]+\.[0-9]+)"
MEAN_STD = NUM + r"(?: ±)? " + NUM  # "52.34 0.14" (the ± was lost) or "61.1 ± 0.2"


def rows_of(text: str, header: str, n_rows: int) -> list[str]:
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header))
    return lines[i + 1:i + 1 + n_rows]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def main(argv=None) -> None:
    ap = cli.ArgumentParser(prog="python -m scripts.extract_paper_values", description=__doc__.split("\n\n")[0])
    ap.add_argument("paper", help="the paper as text (pdftotext -layout)")
    paper = ap.parse_args(argv).paper
    if not Path(paper).is_file():
        raise ConfigError(f"no paper text at {paper}; pass the path of the paper converted to text")
    text = Path(paper).read_text()
    out: dict[str, list[dict]] = {}

    def add(table, row, column, mean, std, source):
        out.setdefault(table, []).append({"table": table, "row": row, "column": column, "mean": mean,
                                          "std": std, "source": source})

    # Table 1: commonsense average, backbone x regime
    cols = ["Qwen2-0.5B/15k", "Qwen2-0.5B/170k", "Phi-3-8B/15k", "Phi-3-8B/170k", "LLaMA3-8B/15k",
            "LLaMA3-8B/170k"]
    for line in rows_of(text, "| Method | 15k | 170k |", 9):
        c = cells(line)
        method = c[0].replace(" (Ours)", "")
        for col, v in zip(cols, c[1:]):
            m, s = re.fullmatch(MEAN_STD, v).groups()
            add("table1", method, col, m, s, f"Table 1, {c[0]}, {col}")

    # Table 2: GLUE, two backbones
    tasks = ["SST-2", "MRPC", "CoLA", "QNLI", "RTE", "STS-B", "Average"]
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("| Method | Params | SST-2"))
    backbone = "RoBERTa-base"
    for line in lines[start + 1:start + 12]:
        c = cells(line)
        if c[0].startswith("RoBERTa-"):
            backbone = c[0]
            continue
        method = c[0].rsplit("-", 1)[0]
        for task, v in zip(tasks, c[2:]):
            m, s = re.fullmatch(MEAN_STD, v).groups()
            add("table2", method, f"{backbone}/{task}", m, s, f"Table 2, {backbone}, {c[0]}, {task}")

    # Table 12: base rank, Qwen2-0.5B 170k
    for line in rows_of(text, "| Base Rank | LoRA | LR-LoRA |", 5):
        c = cells(line)
        for method, v in (("LoRA", c[1]), ("LR-LoRA", c[2])):
            m, s = re.fullmatch(MEAN_STD, v).groups()
            add("table12", f"r={c[0]}", method, m, s, f"Table 12, base rank {c[0]}, {method}")

    # Table 13: basis
    for line in rows_of(text, "| Basis Type | Function Form |", 5):
        c = cells(line)
        m, s = re.fullmatch(MEAN_STD, c[1]).groups()
        add("table13", c[0], "accuracy", m, s, f"Table 13, {c[0]}")

    # Table 3: core ablations (the K values themselves are lost in the text: only the default row is kept)
    t3 = rows_of(text, "| Configuration | Accuracy | vs. LoRA | Best |", 13)
    for line in t3:
        c = cells(line)
        label = {"LR-LoRA (full)": "LR-LoRA (full)", "Zero (default)": "amplitude init: zero",
                 "Random": "amplitude init: random", "Learn (default)": "bandwidth: learned",
                 "Fixed": "bandwidth: fixed", "LoRA baseline": "LoRA"}.get(c[0])
        if label and re.fullmatch(MEAN_STD, c[1]):
            m, s = re.fullmatch(MEAN_STD, c[1]).groups()
            add("table3", label, "accuracy", m, s, f"Table 3, {c[0]}")

    # Table 20: sharing (inline text row)
    t20 = re.search(r"No Sharing (\S+) ± (\S+) .*?Share (\S+) ± (\S+) -15% Grid Points.*?Share (\S+) ± (\S+) "
                    r"-25% Bandwidth.*?Share (\S+) ± (\S+) -60% Amplitudes.*?Share All (\S+) ± (\S+)", text)
    for i, row in enumerate(["none", "grid", "bandwidth", "amplitude", "all"]):
        add("table20", row, "accuracy", t20.group(2 * i + 1), t20.group(2 * i + 2),
            f"Table 20, {['No Sharing', 'Share grid points', 'Share bandwidth', 'Share amplitudes', 'Share All'][i]}")

    # Table 23: placement
    for label, key in [("All layers", "all"), ("Odd layers only", "odd"), ("Even layers only", "even"),
                       ("First/last 8 layers", "first/last 8"), ("Attention only", "attention only"),
                       ("MLP only", "mlp only")]:
        m = re.search(re.escape(label) + r" " + MEAN_STD, text)
        add("table23", key, "accuracy", m.group(1), m.group(2), f"Table 23, {label}")

    # Table 6 (per task, Qwen2 rows)
    tasks6 = ["BoolQ", "PIQA", "SIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "Average"]
    for regime in ("15k", "170k"):
        block = re.search(rf"Qwen2 - {regime} (.*?)(?= Qwen2 - | Phi3 - )", text).group(1)
        for m in re.finditer(r"([A-Za-z-]+?)-?(\d+)? ([0-9.]+) " + " ".join([NUM] * 9), block):
            name = m.group(1) + (f"-{m.group(2)}" if m.group(2) else "")
            for task, v in zip(tasks6, m.groups()[3:]):
                add("table6", name, f"Qwen2-0.5B/{regime}/{task}", v, "", f"Table 6, Qwen2 - {regime}, {name}, {task}")

    # Table 24: efficiency, Qwen2-0.5B and Phi-3-8B (memory GB, throughput tok/s)
    t24 = re.search(r"Relative Frozen \(inference\)(.*?)Memory breakdown", text, re.S).group(1)
    for m in re.finditer(r"([A-Za-z][A-Za-z -]*?(?: \(\))?) ([0-9.]+) (\d+) ([0-9.]+)× ([0-9.]+) (\d+) ([0-9.]+)×",
                         "Frozen (inference)" + t24):
        name = m.group(1).strip()
        if name.endswith("()"):  # the rank was lost in the text; the first such row is the smaller rank
            seen = sum(1 for r in out.get("table24", []) if r["row"].startswith(name[:-3]) and r["column"].endswith("memory_gb") and r["column"].startswith("Qwen2"))
            name = f"{name[:-3]} (rank lost in the text, row {seen + 1})"
        for backbone, g in (("Qwen2-0.5B", 2), ("Phi-3-8B", 5)):
            add("table24", name, f"{backbone}/memory_gb", m.group(g), "", f"Table 24, {name}, {backbone}, memory")
            add("table24", name, f"{backbone}/tokens_per_s", m.group(g + 1), "",
                f"Table 24, {name}, {backbone}, throughput")

    # Tables 8 (CLIP ViT-B/32) and 9 (DINOv2 ViT-B/14): top-1 per dataset (inline rows, no std)
    for table, first in (("table8", "Flowers102"), ("table9", "Oxford-IIIT Pets")):
        for m in re.finditer(r"Dataset LoRA VeRA RandLoRA LR-LoRA (.*?) Average " + " ".join([NUM] * 4), text):
            if first not in m.group(1):
                continue
            body = m.group(1) + " Average " + " ".join(m.groups()[1:])
            for row in re.finditer(r"([A-Za-z][A-Za-z0-9 -]*?) " + " ".join([NUM] * 4), body):
                for method, v in zip(("LoRA", "VeRA", "RandLoRA", "LR-LoRA"), row.groups()[1:]):
                    add(table, row.group(1).strip(), method, v, "", f"Table {table[5:]}, {row.group(1).strip()}, {method}")

    # Table 5: MT-Bench overall score (the per-category numbers are not in the text)
    t5 = re.search(r"Backbone LoRA SineLoRA RandLoRA LR-LoRA \(Ours\) (.*?) over LoRA", text).group(1)
    for row in re.finditer(r"(Qwen2-0.5B|LLaMA3-8B) " + " ".join([NUM] * 4), t5):
        for method, v in zip(("LoRA", "SineLoRA", "RandLoRA", "LR-LoRA"), row.groups()[1:]):
            add("table5", method, row.group(1), v, "", f"Table 5, {row.group(1)}, {method}")

    OUT.mkdir(parents=True, exist_ok=True)
    for table, rows in out.items():
        with (OUT / f"{table}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["table", "row", "column", "mean", "std", "source"])
            w.writeheader()
            w.writerows(rows)
        print(f"{table}: {len(rows)} values -> {OUT / (table + '.csv')}")


if __name__ == "__main__":
    cli.run(main)
