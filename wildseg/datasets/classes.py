"""Class-name lists: one class per line, `name, synonym, ...`; a first name `background` marks the background class.

A class is scored by the best of its names (the max over synonyms, as in the training-free CLIP segmenters'
class lists). The background class is the segmenter's threshold background (`pseudolabels`) together with
any further names on its line, usually stuff words such as `sky, wall, floor`.
"""

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

from ..errors import WildsegError
from ..labels import BACKGROUND


@dataclass(frozen=True)
class ClassName:
    """A dataset class: its display `name`, the `prompts` the text encoder sees, and whether it is background."""

    name: str
    prompts: tuple[str, ...]
    is_background: bool = False


def parse_class_names(lines: Iterable[str], source: str) -> list[ClassName]:
    """Classes from the non-blank `lines` of a class-name list; `source` names the list in errors."""
    classes, owner = [], {}
    for line in lines:
        names = [" ".join(part.split()) for part in line.split(",")]
        names = [name for name in names if name]
        if not names:
            continue
        is_background = names[0].casefold() == BACKGROUND
        if is_background and any(name.is_background for name in classes):
            raise WildsegError(f"{source}: only one line may start with 'background'")
        prompts = tuple(names[1:] if is_background else names)
        for prompt in prompts:
            key = prompt.casefold()
            if key == BACKGROUND:
                raise WildsegError(f"{source}: 'background' may only start a line (the background class)")
            if key in owner:
                raise WildsegError(
                    f"{source}: the name {prompt!r} belongs to both class {owner[key]} and class {len(classes)}: "
                    "make every name unique"
                )
            owner[key] = len(classes)
        classes.append(ClassName(names[0], prompts, is_background))
    if not classes:
        raise WildsegError(f"{source} lists no class names")
    return classes


def read_class_names(path: Path) -> list[ClassName]:
    """Classes from a text file in the class-name list format (see the module docstring)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise WildsegError(f"cannot read the class names {path}: {error}") from None
    return parse_class_names(text.splitlines(), str(path))


def published_class_prompts(class_list: str) -> list[tuple[str, ...]]:
    """The queries of each class of a class list that an official dense segmenter evaluates with, word for word
    (`classnames/published/<class_list>`, copied from its repository): line i holds class i's names separated by
    ', ', read as their `get_cls_idx` reads them."""
    text = resources.files(__package__).joinpath("classnames", "published", class_list).read_text(encoding="utf-8")
    return [tuple(line.split(", ")) for line in text.split("\n") if line]


def builtin_class_names(key: str) -> list[ClassName]:
    """A class-name list shipped with wildseg, from `wildseg/datasets/classnames/<key>.txt`."""
    text = resources.files(__package__).joinpath("classnames", f"{key}.txt").read_text(encoding="utf-8")
    return parse_class_names(text.splitlines(), f"class list {key}")
