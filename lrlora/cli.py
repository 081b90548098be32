"""One command-line convention for every entry point of the repository.

    if __name__ == "__main__":
        cli.run(main)        # main(argv) -> int | None, its parser a cli.ArgumentParser

Exit status: 0 done; 2 a user error, printed as exactly one line `error: <problem and fix>` on stderr (the
`lrlora.errors.UserError` family, a bad command line -- argparse's or Hydra's: an unknown option, a misspelled
key, a value that does not parse, a missing `???` value -- and a disk that is full, read-only or not ours to
write); 1 an internal failure, with its traceback; 130 interrupted (Ctrl-C). A few commands give 1 a second,
documented meaning without a traceback (`analysis.report --check`: a block is out of date).

Pure Python, so `lrlora` stays importable with torch alone. The harness's Hydra entry points keep this convention
through experiments/hydra_cli.py, which runs a Hydra task and registers the phrasing of Hydra's and OmegaConf's
errors here (`phrase_errors_of`) when `experiments` is imported.
"""

from __future__ import annotations

import argparse
import errno
import os
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
# Top-level module -> the phrasing of its errors as user errors (phrase_errors_of).
_PHRASERS: dict[str, Callable[[BaseException], str]] = {}


class Reported(BaseException):
    """A user error already phrased (its one line is the message), carried past a framework's own handler: Hydra's
    catches Exception and prints a line of its own before re-raising, so a task's error travels as this instead."""


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
    phrase = _PHRASERS.get(type(exc).__module__.split(".")[0])
    return phrase(exc) if phrase else None


def phrase_errors_of(modules: tuple[str, ...], phrase: Callable[[BaseException], str]) -> None:
    """Every error raised by these top-level modules is the user's, phrased by `phrase` as one line: how the
    harness adds Hydra's and OmegaConf's errors (experiments/hydra_cli.py) without lrlora importing either."""
    for module in modules:
        _PHRASERS[module] = phrase


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
    except Reported as e:
        report(str(e))
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        line = user_message(e)
        if line is None:
            raise
        report(line)
        return EXIT_USER
    return status if isinstance(status, int) and not isinstance(status, bool) else EXIT_OK


def run(fn: Callable, *args, **kwargs):
    """The `if __name__ == "__main__":` of an argparse entry point: exit with `call`'s status."""
    sys.exit(call(fn, *args, **kwargs))
