"""The Hydra entry points' side of the repository's one command-line convention (lrlora/cli.py, docs/guarantees.md).

    if __name__ == "__main__":
        hydra_cli.run_hydra(main, CONF_DIR, "train")   # main(cfg): a Hydra task, composed from CONF_DIR/train.yaml

`run_hydra` runs the task under `hydra.main` and reports through `lrlora.cli.call`. Importing this module (which
`experiments/__init__.py` does) registers with lrlora.cli the phrasing of Hydra's and OmegaConf's errors (an
unknown option, a misspelled key with the keys spelt like it, a value that does not parse, a missing `???` value)
as one line naming the problem and the fix, for every entry point that composes a config (demo, reproduce, ...).
It lives here, not in lrlora/, so that the method library never needs Hydra.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from lrlora import cli
from lrlora.errors import UserError

# Overrides whose values are paths or run names: quoted for Hydra when its grammar would reject them (a run name
# holding `=`), so that a name or path is usable on the command line exactly as the harness prints it.
_PLAIN_VALUE_KEYS = re.compile(r"^(run|run_name|adapter_dir|out|base_model|paths\.[\w.]+)=(.*)$", re.S)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # the harness's Hydra configs (train.yaml and its groups)


def compose_train(overrides=()):
    """conf/train.yaml composed with `overrides` from code: the grid runner, the demo, the benchmarks and a run
    name's reference config all compose it here. Inside a Hydra entry point (`@hydra.main`, or a caller's compose
    context) Hydra is already initialised, where a second initialisation is an error, so its search path is used."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("train", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))



def run_hydra(task: Callable, config_dir, config_name: str, argv: list[str] | None = None):
    """The `if __name__ == "__main__":` of a Hydra entry point: `task(cfg)` under `hydra.main`, with Hydra's own
    errors (and the task's) reported by the convention of lrlora.cli."""
    sys.exit(call_hydra(task, config_dir, config_name, argv))


def call_hydra(task: Callable, config_dir, config_name: str, argv: list[str] | None = None) -> int:
    """`run_hydra` without the exit: the exit status (for tests, and for one entry point calling another)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = hydra_argv(argv)
    except UserError as e:
        cli.report(str(e))
        return cli.EXIT_USER
    import hydra

    @functools.wraps(task)
    def reporting(cfg):
        try:
            return task(cfg)
        except Exception as e:
            line = cli.user_message(e)
            if line is None:
                raise
            raise cli.Reported(line) from e

    main = hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(reporting)
    saved, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [saved[0] if saved else config_name, *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report: ours decides
    _Suggest.context = (str(config_dir), config_name, [a for a in argv if not a.startswith("-")])
    try:
        return cli.call(main)
    finally:
        sys.argv = saved
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


def hydra_argv(argv: list[str]) -> list[str]:
    """Check the command line against Hydra's own options (an unknown one is a UsageError, not argparse's usage
    block) and quote run names and paths that Hydra's override grammar would reject."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message):
        raise cli.UsageError(f"{message}; settings are key=value (e.g. adapter.r=8), options are Hydra's (--help)")

    parser.error = error
    parser.parse_args(argv)
    return [_quoted(a) for a in argv]


def _quoted(arg: str) -> str:
    m = _PLAIN_VALUE_KEYS.match(arg)
    if not m or not m.group(2) or m.group(2)[0] in "'\"":
        return arg
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([arg])
        return arg
    except Exception:
        value = m.group(2).replace("\\", "\\\\").replace("'", "\\'")
        return f"{m.group(1)}='{value}'"


class _Suggest:
    context: tuple | None = None  # (config dir, config name, overrides) of the command being run

    @classmethod
    def keys_near(cls, key: str) -> list[str]:
        """Settings spelt like `key` in the config this command composes (without the override that failed)."""
        if cls.context is None:
            return []
        config_dir, name, overrides = cls.context
        try:
            from hydra import compose, initialize_config_dir
            from hydra.core.global_hydra import GlobalHydra
            from omegaconf import OmegaConf

            GlobalHydra.instance().clear()
            keep = [o for o in overrides if not re.match(rf"^[+~]*{re.escape(key)}=", o)]
            with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
                cfg = compose(name, overrides=keep)
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            names = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
        except Exception:
            return []
        return [f"{parent}.{k}" if parent else k for k in difflib.get_close_matches(leaf, names, n=2) if k != leaf]


def _hydra_message(exc: BaseException) -> str:
    """One line for an error of Hydra or OmegaConf, naming the problem and the fix."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("See https://")]
    name = type(exc).__name__
    cause = exc.__cause__
    full_key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None)
    if name == "OverrideParseException":
        detail = "; ".join(ln for ln in lines if not ln.startswith("Error parsing override"))
        which = re.search(r"Error parsing override '(.*)'", text)
        arg = f" {which.group(1)!r}" if which else ""
        return (f"cannot parse the override{arg} ({detail}): write key=value, and quote a value that holds "
                f"= [ ] , or spaces as key='...'")
    if name == "MissingConfigException":
        m = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
        options = getattr(exc, "options", None) or []
        if m:
            return (f"{m.group(1)}={m.group(2)} is not an option of {m.group(1)}; choose one of "
                    f"{', '.join(options)}")
        return lines[0] if lines else text
    m = re.search(r"Could not override '([^']+)'", text)
    if m or "not in struct" in str(cause or "") or name in ("ConfigAttributeError", "ConfigKeyError"):
        key = m.group(1) if m else full_key or "that key"
        near = _Suggest.keys_near(key)
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        return (f"{key} is not a setting of this command; {hint}unknown settings are refused, not added "
                f"(--cfg job prints the settings there are)")
    if name == "MissingMandatoryValue":
        return f"{full_key} is required: pass {full_key}=..."
    if name == "ConfigCompositionException" and "Multiple values for" in text:
        g = re.search(r"Multiple values for (\S+?)\.", text)
        group = g.group(1) if g else "a group"
        return f"{group} is given twice; choose it once, as {group}=NAME (without +)"
    msg = getattr(exc, "msg", None) or (lines[0] if lines else name)
    where = f" (at {full_key})" if full_key else ""
    return f"{cli.one_line(msg)}{where}; check that setting on the command line"


cli.phrase_errors_of(("hydra", "omegaconf"), _hydra_message)
