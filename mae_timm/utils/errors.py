"""The two errors a user can cause and the CLI turns into one line (exit code 2); everything else is a bug."""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "UserError"]


class UserError(ValueError):
    """A mistake the user can fix; the CLI prints it as one line and exits with code 2."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving (the CLI: one line, exit code 2)."""
