"""Label lists as users give them: a comma-separated string or a sequence of names."""

import warnings
from typing import Iterable, Union

from .errors import WildsegError, WildsegWarning

BACKGROUND = "background"
MAX_LABELS = 255
"""Labels one mask holds: with the background, class indices fill a uint8 PNG."""


def clean_labels(labels: Union[str, Iterable[str]]) -> list[str]:
    """Trim names, drop empty ones and merge duplicates (compared case-folded), keeping first-seen order.

    A string is split on commas. Raises WildsegError when no name is left or more than MAX_LABELS are; warns for
    each merged duplicate.
    """
    names = labels.split(",") if isinstance(labels, str) else list(labels)
    kept: dict[str, str] = {}
    for raw in names:
        if not isinstance(raw, str):
            raise WildsegError(f"label {raw!r} is not a string: give label names as text, e.g. --labels \"cat,dog\"")
        name = " ".join(raw.split())
        if not name:
            continue
        key = name.casefold()
        if key in kept:
            warnings.warn(f"duplicate label {name!r} merged with {kept[key]!r}", WildsegWarning, stacklevel=2)
            continue
        kept[key] = name
    if not kept:
        raise WildsegError('no label names given: pass the names of what is in the image, e.g. --labels "cat,sofa"')
    if BACKGROUND in kept:
        raise WildsegError(
            f"'{BACKGROUND}' is reserved for pixels that match no label (class 0): leave it out of --labels"
        )
    if len(kept) > MAX_LABELS:
        raise WildsegError(f"{len(kept)} labels given, at most {MAX_LABELS} fit in one mask: split the label list")
    return list(kept.values())
