"""Label lists as users give them: a comma-separated string or a sequence of names."""

import warnings
from typing import Callable, Iterable, Optional, Union

from .errors import WildsegError, WildsegWarning, setting

BACKGROUND = "background"
MAX_LABELS = 255
"""Labels one mask holds: with the background, class indices fill a uint8 PNG."""


def clean_labels(labels: Union[str, Iterable[str]], on_notice: Optional[Callable[[str], None]] = None) -> list[str]:
    """Trim names, drop empty ones and merge duplicates (compared case-folded), keeping first-seen order.

    Args:
        labels: a comma-separated string or a sequence of names.
        on_notice: told of each merged duplicate in one line; by default a WildsegWarning says it.

    Returns:
        The names. Raises WildsegError when no name is left or more than MAX_LABELS are.
    """
    names = labels.split(",") if isinstance(labels, str) else list(labels)
    kept: dict[str, str] = {}
    for raw in names:
        if not isinstance(raw, str):
            raise WildsegError(f"label {raw!r} is not a string: give label names as text, e.g. {setting('labels')} "
                               '"cat,dog"')
        name = " ".join(raw.split())
        if not name:
            continue
        key = name.casefold()
        if key in kept:
            notice = f"duplicate label {name!r} merged with {kept[key]!r}"
            if on_notice is None:
                warnings.warn(notice, WildsegWarning, stacklevel=2)
            else:
                on_notice(notice)
            continue
        kept[key] = name
    if not kept:
        raise WildsegError(f'no label names given: pass the names of what is in the image, e.g. {setting("labels")} '
                           '"cat,sofa"')
    if BACKGROUND in kept:
        raise WildsegError(
            f"'{BACKGROUND}' is reserved for pixels that match no label (class 0): leave it out of {setting('labels')}"
        )
    if len(kept) > MAX_LABELS:
        raise WildsegError(f"{len(kept)} labels given, at most {MAX_LABELS} fit in one mask: split the label list")
    return list(kept.values())
