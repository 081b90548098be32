"""The repository's own text: every relative link in the guides resolves to a file (and a heading, when it names
one), the project's files speak of the project only (no tracker numbers, no word of borrowed machines), and a
package docstring that lists its files lists files that exist. Each checker is also run on a planted fault, so
these tests can fail."""

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The guides whose relative links must resolve (README.md, CONTRIBUTING.md, REPRODUCTION.md, docs/*.md and the
# two READMEs inside the tree).
GUIDES = ["README.md", "CONTRIBUTING.md", "REPRODUCTION.md", "results/reproduction/README.md",
          "results/reproduction/REPORT.md", "analysis/README.md"]

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def guides() -> list[Path]:
    return [ROOT / g for g in GUIDES if (ROOT / g).exists()] + sorted((ROOT / "docs").glob("*.md"))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in HEADING.findall(FENCE.sub("", path.read_text())):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """Every relative link of one markdown file that names a missing file or a heading its target lacks."""
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text()))
    bad = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):          # http:, https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
    return bad


@pytest.mark.parametrize("path", guides(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert not broken_links(path), f"{path.relative_to(ROOT)}: " + "; ".join(broken_links(path))


def test_the_link_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## The σ op: fast\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md) [ok](other.md#the-σ-op-fast) [ok](#page) [web](https://x.org/a)\n"
                    "`[not a link](nowhere.md)`\n\n```\n[not a link](nowhere.md)\n```\n"
                    "[gone](missing.md) [no anchor](other.md#no-such-heading) [self](#nope)\n")
    assert broken_links(page) == ["missing.md (no such file)", "other.md#no-such-heading (no heading "
                                  f"#no-such-heading in {tmp_path / 'other.md'})", "#nope (no heading #nope in "
                                  f"{page})"]


# Project text: what the repository says is about the repository. A tracker's issue number means nothing to a
# reader of a copy; upstream trackers are cited by project and number ("PEFT #432"), which these do not match.
FORBIDDEN = {
    "an issue number": re.compile(r"(?<![a-z])issues?[ _-]?#?\d", re.I),   # also inside a_test_name
    "a borrowed machine": re.compile(r"\blent\b", re.I),
}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".sh", ".ini"}
TEXT_NAMES = {"Makefile", "run"}                 # .ci/run
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "outputs", "multirun", "wandb", "runs",
             "cache", "data", ".gl", ".whl", "node_modules",
             "fixtures",                         # third-party formats and text (MT-Bench's published files)
             "paper"}                            # analysis/paper: the paper's own numbers and text


def project_text_files() -> list[Path]:
    """The project's own text files, found by walking the tree (a copy without .git has no index to ask)."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES or name in TEXT_NAMES:
                out.append(path)
    return sorted(out)


def forbidden_mentions(path: Path) -> list[str]:
    hits = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{n}: {what}: "
                            f"{line.strip()[:100]}")
    return hits


def test_project_files_name_no_issue_numbers_and_no_lent_machines():
    files = project_text_files()
    assert len(files) > 100 and ROOT / "Makefile" in files and ROOT / "README.md" in files
    hits = [h for f in files for h in forbidden_mentions(f)]
    assert not hits, "\n".join(hits)


def test_the_mention_checker_finds_each_form(tmp_path):
    issue, word = "is" "sue", "le" "nt"      # spelled apart, so that this file passes its own scan
    f = tmp_path / "notes.md"
    f.write_text(f"the grid of {issue} 12\n{issue.title()} #9's targets\n{issue}-9 table\ntest_is_the_{issue}12_claims\n"
                 f"no GPU was {word}\nPEFT #432 and the {word}il soup are fine\nsi{word}, equiva{word}\n")
    assert [h.split(": ")[1] for h in forbidden_mentions(f)] == ["an issue number"] * 4 + ["a borrowed machine"]


def listed_files(package: str) -> list[str]:
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
    return re.findall(r"(?<![\w./])([\w/]+\.py|\w+/)(?=[\s,;:.)]|$)", doc)


@pytest.mark.parametrize("package", ["lrlora", "baselines", "experiments", "analysis"])
def test_package_docstring_lists_files_that_exist(package):
    missing = [name for name in listed_files(package)
               if not (ROOT / package / name).exists() and not (ROOT / name).exists()]
    assert not missing, f"{package}/__init__.py names files that do not exist: {missing}"


def test_experiments_docstring_lists_its_modules():
    names = listed_files("experiments")
    assert {"train.py", "data.py", "protocols/"} <= set(names), names   # the check above has something to check
