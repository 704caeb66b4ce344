"""Errors in what the user gave (a path, a file, a flag's value): ``main.py`` prints their message alone, as
``error: <message>`` with exit status 1, instead of a traceback (``user_errors_as_messages``; ``DETR_DEBUG=1`` shows
the traceback too).
Each is also the built-in type a caller would expect (``FileNotFoundError``, ``ValueError``, ``RuntimeError``)."""
import contextlib
import os
import sys
from typing import Iterator


class UserError(Exception):
    """A problem with the user's input that the message explains; not a bug."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    pass


class UserValueError(UserError, ValueError):
    pass


class UserRuntimeError(UserError, RuntimeError):
    pass


def message_of(err: BaseException) -> str:
    """The message of ``err``; for one re-raised from a DataLoader worker (whose message is the worker's whole
    traceback), the original error's message."""
    message = str(err)
    if message.startswith("Caught ") and "\nOriginal Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        name, sep, rest = last.partition(": ")
        message = rest if sep and " " not in name else last
    return message


@contextlib.contextmanager
def user_errors_as_messages() -> Iterator[None]:
    """A command's errors in the user's input (``UserError``: a missing file, a bad path, a checkpoint that does not
    fit, offline weights) end in ``error: <message>`` on stderr and exit status 1; with DETR_DEBUG=1 in the
    environment they keep their traceback, as every other error does."""
    try:
        yield
    except UserError as err:
        if os.environ.get("DETR_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {message_of(err)}", file=sys.stderr)
        sys.exit(1)
