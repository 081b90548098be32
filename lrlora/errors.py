"""Typed errors for mistakes the user fixes: each message names the problem and the fix in one line.

    try: ...
    except UserError as e: sys.exit(f"error: {e}")     # what every command-line entry point does

Each also derives from the built-in class a caller would expect (ValueError, FileExistsError, ...), so
`except ValueError` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message is the whole story (no traceback needed)."""


class ConfigError(UserError, ValueError, TypeError):
    """A setting is out of range or of the wrong type."""


class AdapterError(UserError, ValueError):
    """An adapter folder is missing, corrupt, or does not fit the model."""


class UnsafeWrite(UserError, FileExistsError):
    """A write would replace or delete files this code did not write (or its own input)."""


class CheckpointError(UserError, ValueError):
    """A training checkpoint is unreadable or belongs to another run."""


class NonFiniteError(UserError, FloatingPointError):
    """A loss, metric or result is NaN or infinite: never recorded as a result."""


class AdapterNotFound(AdapterError, FileNotFoundError):
    """The adapter folder, or a file it needs, does not exist."""
