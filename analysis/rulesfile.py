"""A round's rules file (analysis/rules/round2.yaml): where it is, how it is read, and how the paths it names are
found. One reader for both of its users: analysis.selection applies its `select:` rules, analysis.verdicts its
`arms:` and `claims:` (and validates them first, `verdicts.read_rules`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from lrlora.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
RULES = "analysis/rules/round2.yaml"  # the committed rules of the second round


class RulesError(UserError, ValueError):
    """A rules file that cannot be applied: missing, not YAML, a missing or unknown key, kind or arm, a value of the
    wrong type, or results that make a test ambiguous (two runs of one seed in one arm)."""


def resolve(path) -> Path:
    """A path a rules file names (or the rules file's own): absolute, or relative to the repository root."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def read(path=RULES) -> dict:
    """The rules file as written, with `path` (where it was read from) added; RulesError when it is missing or is not
    a YAML mapping."""
    path = resolve(path)
    if not path.is_file():
        raise RulesError(f"no rules file at {path}; the committed one is {RULES}")
    try:
        rules = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RulesError(f"{path}: not YAML ({e})") from None
    if not isinstance(rules, dict):
        raise RulesError(f"{path}: the rules must be a mapping (results, seeds, arms, claims, ...), not "
                         f"{type(rules).__name__}")
    if "path" in rules:  # the reader's own key: a value written in the file would be silently replaced
        raise RulesError(f"{path}: `path` is not a rule (the reader records where the file is under it); remove it")
    return {**rules, "path": path}
