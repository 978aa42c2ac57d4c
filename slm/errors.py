"""The errors a user can fix, and the one place that turns them into a one-line message.

Every command (``train.py``, ``generate.py``, ``python -m slm.prepare``, ``slm.evaluate``,
``slm.serve``, ``slm.export``, ``slm.tokenizer``) reports an ``SlmError`` as
``error: <message>`` on one line (``report``) and exits with status 1 (``fail``, or
``run_cli`` around a command's ``main``); the message names the culprit and the fix.
"""

from __future__ import annotations

import logging
import re
import shlex
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


# Values that both Hydra and the shell take as they are (ASCII only: Hydra's lexer rejects
# unquoted non-ASCII text).
_PLAIN = re.compile(r"[A-Za-z0-9_./~+:@%-]+")


def override(key: str, value: str) -> str:
    """``key=value`` as one shell word that Hydra reads back as ``value``: for the commands
    that error messages suggest, and the README's quoting examples.

    Hydra needs quotes around values holding spaces, quotes, brackets, commas or non-ASCII
    text; inside its double quotes, a ``"`` and the backslashes before one (or at the end)
    are escaped. The shell then gets the word in single quotes (an apostrophe as ``'\\''``).
    """
    if not _PLAIN.fullmatch(value):
        escaped = re.sub(r'(\\*)("|$)', lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), value)
        value = f'"{escaped}"'
    word = f"{key}={value}"
    if "'" not in word:
        return shlex.quote(word)
    return "'" + word.replace("'", "'\\''") + "'"  # it's -> 'it'\''s': close, \', reopen


def report(e: BaseException, log: logging.Logger | None = None) -> int:
    """Report ``e`` as ``error: ...`` on one line (to ``log`` too, so a run's log file has
    it); the exit status of a command that stops there, 1."""
    message = f"error: {one_line(e)}"
    if log is not None and log.hasHandlers():
        log.error(message)
    else:
        print(message, file=sys.stderr)
    return 1


def fail(e: BaseException, log: logging.Logger | None = None, status: int = 1) -> NoReturn:
    """``report`` ``e`` and exit with ``status``."""
    report(e, log)
    sys.exit(status)


def run_cli(main: Callable[[], T], errors: tuple[type[BaseException], ...] = (SlmError,)) -> T:
    """``main()``, with ``errors`` reported on one line (exit status 1)."""
    try:
        return main()
    except errors as e:
        fail(e)
