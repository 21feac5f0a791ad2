"""Errors and warnings meant for the person running wildseg, and how a failure of one image is worded.

A message may name a setting with `setting(name)` (the Python API's parameter name, e.g. `window`): read in
Python (`str(error)`) it says `window`; the command line words the same mark as its flag (`--window`) with
`WildsegError.worded`, so that one message reads right in both places.
"""

import logging
import re
from typing import Callable

SETTING_MARK = re.compile("\u2039([A-Za-z0-9_.]+)\u203a")
LOG = logging.getLogger("wildseg")
"""wildseg's logger: unexpected errors of single images go here with their traceback (`failure_reason`)."""


def setting(name: str) -> str:
    """A setting's name marked inside an error or warning message, worded by whoever shows the message."""
    return f"\u2039{name}\u203a"


def checkpoint_not_found(path) -> "WildsegError":
    """The error for a --checkpoint that names no file (said before the model loads and by the loader)."""
    return WildsegError(f"checkpoint not found: {path} (check the path given to {setting('checkpoint')})")


def model_config_not_a_file(path) -> "WildsegError":
    """The error for a --model-config that names no file."""
    return WildsegError(f"the {setting('model_config')} {path} is not a file: give an open_clip model config JSON")


def word_settings(text: str, spell: Callable[[str], str]) -> str:
    """`text` with each setting marked by `setting` written by `spell` (e.g. as a command-line flag)."""
    return SETTING_MARK.sub(lambda match: spell(match.group(1)), text)


class WordedMessage:
    """A message whose settings are marked (`setting`): said with their Python names, or worded by the caller."""

    def __str__(self) -> str:
        return self.worded(lambda name: name)

    def worded(self, spell: Callable[[str], str]) -> str:
        """The message with each marked setting written by `spell` (e.g. as a command-line flag)."""
        return word_settings(str(self.args[0]) if self.args else "", spell)


class WildsegError(WordedMessage, Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it, in one line."""


class WildsegWarning(WordedMessage, UserWarning):
    """Something wildseg changed on the user's behalf (for example, merged duplicate labels)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), at most 300 characters."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


EXPECTED_FAILURES = (WildsegError, OSError, MemoryError)
"""What may go wrong with one image of a batch without a bug: its file, its labels, its pixels, the machine."""


def failure_reason(error: BaseException, item: object) -> str:
    """The one-line reason an image of a batch failed. An expected failure (`EXPECTED_FAILURES`) is its message; any
    other error is a bug: its traceback goes to wildseg's logger (`LOG`) and the line says so, so that the batch
    goes on and the bug can still be reported."""
    if isinstance(error, EXPECTED_FAILURES):
        return first_line(error)
    LOG.error("unexpected error on %s", item, exc_info=(type(error), error, error.__traceback__))
    files = [handler.baseFilename for handler in LOG.handlers if isinstance(handler, logging.FileHandler)]
    where = f"is in {files[0]}" if files else "is logged"
    return f"unexpected {type(error).__name__}: {first_line(error)} (a bug in wildseg: the traceback {where})"
