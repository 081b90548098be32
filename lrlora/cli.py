"""One command-line convention for every entry point of the repository.

    if __name__ == "__main__":
        cli.run(main)                            # main(argv) -> int | None, its parser a cli.ArgumentParser
        cli.run_hydra(main, CONF_DIR, "train")   # main(cfg): a Hydra task, composed from CONF_DIR/train.yaml

Exit status: 0 done; 2 a user error, printed as exactly one line `error: <problem and fix>` on stderr (the
`lrlora.errors.UserError` family, a bad command line -- argparse's or Hydra's: an unknown option, a misspelled
key, a value that does not parse, a missing `???` value -- and a disk that is full, read-only or not ours to
write); 1 an internal failure, with its traceback; 130 interrupted (Ctrl-C). A few commands give 1 a second,
documented meaning without a traceback (`analysis.report --check`: a block is out of date).

Pure Python: Hydra and OmegaConf are imported only by `run_hydra` and when one of their errors is reported, so
`lrlora` stays importable with torch alone.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import functools
import os
import re
import sys
from collections.abc import Callable

from lrlora.errors import UserError

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130

# A disk that refuses the write is the user's to fix (free space, choose another folder), not a bug.
_DISK_ERRNOS = {errno.ENOSPC: "free some space there or write elsewhere",
                errno.EDQUOT: "free some space there or write elsewhere",
                errno.EROFS: "that file system is read-only: write elsewhere",
                errno.EACCES: "you may not write (or read) it: choose a folder of your own",
                errno.EPERM: "you may not write (or read) it: choose a folder of your own"}
# Overrides whose values are paths or run names: quoted for Hydra when its grammar would reject them (a run name
# holding `=`), so that a name or path is usable on the command line exactly as the harness prints it.
_PLAIN_VALUE_KEYS = re.compile(r"^(run|run_name|adapter_dir|out|base_model|paths\.[\w.]+)=(.*)$", re.S)


class _Reported(BaseException):
    """A user error raised inside a Hydra task, carried past Hydra's own handler (which catches Exception and
    prints a line of its own before re-raising)."""


class UsageError(UserError, ValueError):
    """A command line that does not parse: an unknown option, a missing or malformed argument."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad command line is a UsageError (one `error:` line, exit 2) instead of
    argparse's usage block, and that an option is spelt in full (`--seed` is not taken for `--seeds`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def user_message(exc: BaseException) -> str | None:
    """The one-line message of a user error; None for an internal failure (which keeps its traceback)."""
    if isinstance(exc, UserError):
        return one_line(str(exc))
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        where = exc.filename or "a file"
        return f"cannot write {where}: {exc.strerror or os.strerror(exc.errno)}; {_DISK_ERRNOS[exc.errno]}"
    if type(exc).__module__.split(".")[0] in ("hydra", "omegaconf"):
        return _hydra_message(exc)
    return None


def report(message: str) -> None:
    message = one_line(message)
    print(message if message.startswith("error: ") else f"error: {message}", file=sys.stderr, flush=True)


def call(fn: Callable, *args, **kwargs) -> int:
    """Run fn and return the exit status; a user error is reported as one line (EXIT_USER); an internal
    failure propagates with its traceback. For tests and for `run`."""
    try:
        status = fn(*args, **kwargs)
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message"): a refusal worded by the code, never a crash
            report(e.code)
            return EXIT_USER
        return e.code if isinstance(e.code, int) else EXIT_OK
    except _Reported as e:
        report(str(e))
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        report(message)
        return EXIT_USER
    return status if isinstance(status, int) and not isinstance(status, bool) else EXIT_OK


def run(fn: Callable, *args, **kwargs):
    """The `if __name__ == "__main__":` of an argparse entry point: exit with `call`'s status."""
    sys.exit(call(fn, *args, **kwargs))


# --- Hydra entry points ------------------------------------------------------------------------------------------
def run_hydra(task: Callable, config_dir, config_name: str, argv: list[str] | None = None):
    """The `if __name__ == "__main__":` of a Hydra entry point: `task(cfg)` under `hydra.main`, with Hydra's own
    errors (and the task's) reported by the convention above."""
    sys.exit(call_hydra(task, config_dir, config_name, argv))


def call_hydra(task: Callable, config_dir, config_name: str, argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = hydra_argv(argv)
    except UserError as e:
        report(str(e))
        return EXIT_USER
    import hydra

    @functools.wraps(task)
    def reporting(cfg):
        try:
            return task(cfg)
        except Exception as e:
            message = user_message(e)
            if message is None:
                raise
            raise _Reported(message) from e

    main = hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(reporting)
    saved, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [saved[0] if saved else config_name, *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report: ours decides
    _Suggest.context = (str(config_dir), config_name, [a for a in argv if not a.startswith("-")])
    try:
        return call(main)
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
        raise UsageError(f"{message}; settings are key=value (e.g. adapter.r=8), options are Hydra's (--help)")

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
    return f"{one_line(msg)}{where}; check that setting on the command line"
