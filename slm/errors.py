"""The errors a user can fix, and the one place that turns them into a one-line message.

Every entry point (``train.py``, ``generate.py``, ``python -m slm.prepare``,
``python -m slm.evaluate``) reports an ``SlmError`` as ``error: <message>`` on one line and
exits with status 1; the message names the culprit and the fix.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")


class SlmError(ValueError):
    """A mistake in the user's input; the one-line message names it and the fix."""


class ConfigError(SlmError):
    """An invalid combination of config values."""


class DataError(SlmError):
    """A bad source, data dir or bin."""


class CheckpointError(SlmError):
    """A checkpoint that cannot be loaded or does not fit the run."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message, for a one-line error."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(e: BaseException) -> str:
    """``Type: first line of the message`` of ``e``, or of its cause where it has one: a
    library's error quoted inside one of ours."""
    e = e.__cause__ or e
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def one_line(e: BaseException) -> str:
    """An error's whole message, folded onto one line."""
    return " ".join(str(e).split()) or type(e).__name__


def fail(e: BaseException, log: logging.Logger | None = None) -> NoReturn:
    """Report ``e`` as ``error: ...`` (to ``log`` too, so a run's log file has it) and exit 1."""
    message = f"error: {one_line(e)}"
    if log is not None and log.hasHandlers():
        log.error(message)
    else:
        print(message, file=sys.stderr)
    sys.exit(1)


def run_cli(main: Callable[[], T], errors: tuple[type[BaseException], ...] = (SlmError,)) -> T:
    """``main()``, with ``errors`` reported on one line (exit status 1)."""
    try:
        return main()
    except errors as e:
        fail(e)
