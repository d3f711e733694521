"""The two errors a user can cause and the CLI turns into one line (exit code 2); everything else is a bug."""

from __future__ import annotations

__all__ = ["USER_ERRORS", "DistributedError", "NonFiniteLossError", "UserError"]


class UserError(ValueError):
    """A mistake the user can fix; the CLI prints it as one line and exits with code 2."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving (the CLI: one line, exit code 2)."""


class DistributedError(RuntimeError):
    """The ranks of a run could not form their process group or one stopped answering within the timeout (the CLI:
    one line, exit code 2); the run stops and its checkpoints stay."""


# The boundary between a user's mistake and a bug, in one place: the CLI prints these as one line (exit code 2) and
# lets everything else raise. Commands raise UserError for what they check; the others are what Python and torch
# raise for a user's bad value or path (a missing, clashing, unreadable or wrong-kind file).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
               NonFiniteLossError, DistributedError)
