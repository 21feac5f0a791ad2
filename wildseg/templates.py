"""Prompt templates of the label embeddings: the built-in sets and template files.

A label is embedded as the mean of its prompts (Radford et al. 2021, Sec. 3.1.4): each template with the label
in place of its `{}`. This module imports nothing heavy (open_clip's 80 ImageNet templates are read when that set
is used), so that the command line checks a template file before the model loads.
"""

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

from .cache import digest
from .errors import WildsegError, setting


def imagenet_templates() -> Sequence[Union[str, Callable[[str], str]]]:
    """CLIP's 80 ImageNet prompt templates, as open_clip ships them (`open_clip.zero_shot_metadata`). Where open_clip
    is not imported yet, its metadata file is read alone, without the package and torch, which take seconds and
    hundreds of megabytes: a run's request holds the templates, and a resumed run or a Ray driver needs no model."""
    loaded = sys.modules.get("open_clip")
    found = importlib.util.find_spec("open_clip") if loaded is None else None
    metadata = None if found is None else Path(found.submodule_search_locations[0]) / "zero_shot_metadata.py"
    if metadata is None or not metadata.is_file():
        import open_clip

        return open_clip.OPENAI_IMAGENET_TEMPLATES
    spec = importlib.util.spec_from_file_location("wildseg_open_clip_templates", metadata)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OPENAI_IMAGENET_TEMPLATES


TEMPLATE_SETS: dict[str, Callable[[], Sequence[Union[str, Callable[[str], str]]]]] = {
    "imagenet80": imagenet_templates,
    "photo": lambda: ("a photo of a {}.",),
}
"""The built-in template sets by name, each read when used."""


@dataclass(frozen=True)
class TemplateSet:
    """Prompt templates, each a str.format pattern with one `{}` where the label goes.

    `identity` names the set in records and caches: the built-in set's name, or for a file its name and the
    SHA-256 of its templates; `digest` is the SHA-256 of the templates themselves (the disk cache's key).
    """

    templates: tuple[str, ...]
    identity: str

    @property
    def digest(self) -> str:
        return digest("\n".join(self.templates))


def resolve_templates(templates: Union[str, Path, TemplateSet]) -> TemplateSet:
    """The templates a `templates` setting names.

    Args:
        templates: a built-in set's name (`TEMPLATE_SETS`), the path of a template file (`read_template_file`),
            or a TemplateSet, returned as it is.

    Returns:
        The TemplateSet.
    """
    if isinstance(templates, TemplateSet):
        return templates
    if isinstance(templates, str) and templates in TEMPLATE_SETS:
        patterns = tuple(each if isinstance(each, str) else each("{}") for each in TEMPLATE_SETS[templates]())
        return TemplateSet(patterns, templates)
    return read_template_file(Path(templates))


def check_templates(templates: Union[str, Path, TemplateSet]) -> None:
    """Refuse a `templates` setting that names neither a built-in set nor a usable template file (without reading
    the built-in sets)."""
    if not isinstance(templates, TemplateSet) and not (isinstance(templates, str) and templates in TEMPLATE_SETS):
        read_template_file(Path(templates))


def read_template_file(path: Path) -> TemplateSet:
    """Templates from a UTF-8 text file: one per line with `{}` where the label goes; blank lines and lines
    starting with `#` are skipped; `{{` and `}}` write literal braces.

    Args:
        path: the file.

    Returns:
        A TemplateSet named by the file's name and the SHA-256 of its templates.
    """
    name = f"{setting('templates')} {path}"
    if not path.is_file():
        raise WildsegError(f"{name} is neither a built-in template set ({', '.join(TEMPLATE_SETS)}) nor a file: "
                           "pass one of those names or the path of a text file with one template per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise WildsegError(f"{name} is not UTF-8 text: save it as UTF-8, one template per line") from None
    templates = []
    for number, line in enumerate(lines, start=1):
        template = line.strip()
        if not template or template.startswith("#"):
            continue
        if "{}" not in template:
            raise WildsegError(f"{name} line {number} ({template!r}) has no {{}} where the label goes: "
                               "write it as e.g. 'a photo of a {}.'")
        try:
            template.format("label")
        except (IndexError, KeyError, ValueError):
            raise WildsegError(f"{name} line {number} ({template!r}) has braces other than one {{}}: "
                               "keep one {} for the label and write literal braces as {{ and }}") from None
        templates.append(template)
    if not templates:
        raise WildsegError(f"{name} has no templates (only blank lines and # comments): write one template per "
                           "line with {} where the label goes")
    return TemplateSet(tuple(templates), f"{path.name} sha256:{digest(chr(10).join(templates))[:16]}")
