"""Errors a user can cause and fix, and how entry points report them.

Every problem with what the user brought (config keys, data files, bands, units, schedules, weights, the run
directory) is raised as a :class:`UserInputError` (or a subclass) whose message names the file, band or config key,
says what is wrong and how to fix it. Entry points wrap their ``main`` with :func:`cli_entry`: such an error prints
one line ``error: <message>`` on stderr (on the main process only under ``accelerate launch``) and exits with status
2, without a traceback. ``--debug`` on the command line or ``EOSEG_DEBUG=1`` in the environment re-raises it with
its traceback. Anything else is a bug and keeps its traceback.

    @cli_entry
    def main(argv=None): ...
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, TypeVar

__all__ = ["UserInputError", "DataError", "MissingFileError", "RunDirError", "cli_entry", "debug_requested",
           "is_main_process"]

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2


class UserInputError(ValueError):
    """Something the user brought is wrong: the message names the file/band/key, the problem and the fix."""


class DataError(UserInputError):
    """A data file, band, unit or sensor description does not fit what the config says."""


class MissingFileError(UserInputError, FileNotFoundError):
    """A file or directory the config or command line names does not exist (also a ``FileNotFoundError``)."""


class RunDirError(UserInputError):
    """The output directory cannot be used as asked (holds another run, nothing to resume, ...)."""


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("EOSEG_DEBUG", "").strip() not in ("", "0", "false", "False")


def is_main_process() -> bool:
    """Rank 0 (or a single process), read from the launcher's environment, usable before any process group."""
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value is not None:
            try:
                return int(value) == 0
            except ValueError:
                return True
    return True


def cli_entry(main: F) -> F:
    """Run ``main``; a :class:`UserInputError` becomes one message on stderr (main process) and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        argv = args[0] if args else kwargs.get("argv")
        try:
            return main(*args, **kwargs)
        except UserInputError as exc:
            if debug_requested(list(argv) if argv is not None else None):
                raise
            if is_main_process():
                print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper  # type: ignore[return-value]
