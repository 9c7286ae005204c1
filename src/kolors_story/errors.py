"""The errors a user can act on. The entry points print their message as one ``error: ...`` line
and exit 2; any other exception is a bug and keeps its traceback (as does every error with
``HYDRA_FULL_ERROR=1``). Every stage's own error class derives from :class:`UserError`."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


class UserError(Exception):
    """Something the user can fix (a setting, an input file, the disk); the message says what."""


class SettingsError(UserError, ValueError):
    """A setting no stage can work with; the message names the key, the value and what to use."""


class MissingFileError(UserError, FileNotFoundError):
    """An input file or folder the run needs is not there; the message names it."""


class OutputExistsError(UserError, FileExistsError):
    """The output would replace an earlier result; the message names the key that allows it."""


class TrainingError(UserError, RuntimeError):
    """Training stopped (non-finite loss, bad config ...); the message says why and what to do."""


def user_error_message(exc: BaseException) -> str | None:
    """The message to show for an error the user can fix (a setting, a file, the disk), or None
    for anything else (a bug: it keeps its traceback)."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        where = f" writing {exc.filename}" if exc.filename else ""
        return (f"no space left on the device{where}: free some space or choose another output folder; "
                "results written before were left as they were")
    if isinstance(exc, OSError) and exc.errno in _NOT_ALLOWED + (errno.ENOENT,):
        return f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
    return None


def print_user_error(exc: BaseException) -> bool:
    """Print ``error: <message>`` for an error the user can fix and say so; False for a bug (and
    for everything with ``HYDRA_FULL_ERROR=1``), which the caller re-raises with its traceback."""
    message = user_error_message(exc)
    if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return False
    print(f"error: {message}", file=sys.stderr)
    return True


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """For a ``python -m`` tool's ``main``: an error the user can fix is one ``error: ...`` line and
    exit code 2, as for train.py, generate.py and evaluate.py."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as exc:
            if not print_user_error(exc):
                raise
            return 2

    return wrapped

