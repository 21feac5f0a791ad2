"""Errors and warnings meant for the person running wildseg."""


class WildsegError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it, in one line."""


class WildsegWarning(UserWarning):
    """Something wildseg changed on the user's behalf (for example, merged duplicate labels)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), at most 300 characters."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
