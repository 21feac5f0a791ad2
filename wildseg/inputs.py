"""What `wildseg segment` is given: image files, folders, glob patterns and `@list.txt` files, and per-image labels.

Every image gets an output stem that mirrors where it was found: relative to the folder it was found in
(folder inputs), to the fixed part of a glob pattern, or to the common folder of the files named directly or
in lists. Two images never share a stem.
"""

import csv
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .errors import WildsegError, first_line, setting
from .images import IMAGE_SUFFIXES

GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class InputImage:
    """An image path and the output stem (relative path without suffix) its outputs are written under."""

    path: Path
    stem: Path


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` (1 <= K <= N) as (K, N), or a one-line error."""
    index, _, count = text.partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit() and 1 <= int(index) <= int(count)):
        raise WildsegError(f"{setting('shard')} takes K/N with 1 <= K <= N (e.g. 3/8), got {text!r}")
    return int(index), int(count)


def shard_index(stem: str, count: int) -> int:
    """The shard K (1..count) of the image with output stem `stem` (a POSIX path relative to the inputs given, the
    same in every listing order and run): its SHA-256 modulo `count`, plus 1."""
    return int.from_bytes(hashlib.sha256(stem.encode("utf-8")).digest()[:8], "big") % count + 1


def in_shard(image: InputImage, shard: tuple[int, int]) -> bool:
    """Whether an image belongs to shard K of N (`shard_index`). The N shards hold every image once."""
    return shard_index(image.stem.as_posix(), shard[1]) == shard[0]


def has_image_suffix(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def expand_inputs(
    arguments: Iterable[str], recursive: bool = False, exclude: Optional[Path] = None, labels: Optional[str] = None
) -> list[InputImage]:
    """Images named by `arguments`, in order, each once, with output stems that do not collide.

    A folder contributes its files with an image extension (any letter case; with `recursive`, those of its
    sub-folders too); a glob pattern its matches; `@FILE` the paths listed in FILE, one per line; anything
    else is an image path (any extension; it fails on its own if it is not an image). Folders and
    patterns skip what lies under `exclude` (the output folder); a folder inside it is refused. A missing input
    that looks like a label (no extension, no folder) is answered with how to give it beside `labels`, the labels
    given.
    """
    return listed_inputs(arguments, recursive, exclude, labels)[0]


def listed_inputs(
    arguments: Iterable[str], recursive: bool = False, exclude: Optional[Path] = None, labels: Optional[str] = None,
    shard: Optional[tuple[int, int]] = None,
) -> tuple[list[InputImage], int]:
    """`expand_inputs`, keeping only the images of `shard` (K, N) when one is given, and how many images the inputs
    hold in all (`unique_inputs`, whose listing streams)."""
    kept, total = [], 0
    for path, _, stem in unique_inputs(arguments, recursive, exclude, labels):
        total += 1
        if shard is None or shard_index(stem, shard[1]) == shard[0]:
            kept.append(InputImage(Path(path), Path(stem)))
    return kept, total


def unique_inputs(arguments: Iterable[str], recursive: bool = False, exclude: Optional[Path] = None,
                  labels: Optional[str] = None) -> Iterator[tuple[str, str, str]]:
    """(path, its absolute form, output stem as a POSIX path) of each image `expand_inputs` lists, in its order, as
    it is found: each is checked for repeats and colliding stems with a hash of its absolute path and stem kept, not
    the input, so that listing millions of inputs holds two hashes per input."""
    arguments = list(arguments)
    seen_paths: set[int] = set()
    seen_stems: set[int] = set()
    for path, stem in _found(arguments, recursive, exclude, labels):
        absolute = os.path.abspath(path)
        path_key = hash(absolute)
        if path_key in seen_paths:
            continue
        stem_key = hash(stem.casefold())
        if stem_key in seen_stems:
            _refuse_collision(arguments, recursive, exclude, labels, path, stem)
        seen_paths.add(path_key)
        seen_stems.add(stem_key)
        yield path, absolute, stem


def _refuse_collision(arguments: list[str], recursive: bool, exclude: Optional[Path], labels: Optional[str],
                      path: str, stem: str) -> None:
    """The error for an image whose stem an earlier one has (case aside); the listing is walked again to name that
    one (or, for a hash that only looked alike, to return)."""
    for earlier, earlier_stem in _found(arguments, recursive, exclude, labels):
        if os.path.abspath(earlier) == os.path.abspath(path):
            return
        if earlier_stem.casefold() == stem.casefold():
            raise WildsegError(f"{Path(earlier)} and {Path(path)} would write the same outputs {stem}.*: give their "
                               "common folder instead, or segment them in two runs")


def _found(arguments: list[str], recursive: bool, exclude: Optional[Path], labels: Optional[str]
           ) -> Iterator[tuple[str, str]]:
    """(path, output stem) of every image the arguments name, in order, repeats included (see `expand_inputs`)."""
    loose: list[Path] = []
    for argument in arguments:
        if argument.startswith("@"):
            loose.extend(_listed_paths(Path(argument[1:])))
        elif Path(argument).is_dir():
            folder = Path(argument)
            if _inside(folder, exclude):
                raise WildsegError(
                    f"the input folder {folder} lies in the output folder {exclude}, whose images are skipped as "
                    f"outputs: give another {setting('out')} (for example {folder.absolute().name}_masks)"
                )
            yield from _scan(folder, recursive, exclude)
        elif any(character in argument for character in GLOB_CHARACTERS):
            matches = sorted(Path(match) for match in glob.glob(argument, recursive=recursive))
            matches = [path for path in matches if has_image_suffix(path) and not _inside(path, exclude)]
            if not matches:
                raise WildsegError(f"the pattern {argument!r} matches no image: check it, or quote it for the shell")
            base = _fixed_prefix(argument)
            yield from ((str(path), path.relative_to(base).with_suffix("").as_posix()) for path in matches)
        elif Path(argument).exists():
            loose.append(Path(argument))
        elif not Path(argument).suffix and os.sep not in argument and "/" not in argument:
            together = ",".join([*([labels] if labels else []), argument])
            raise WildsegError(f"image not found: {argument}; if {argument!r} is a label, several labels go in one "
                               f'quoted, comma-separated argument: {setting("labels")} "{together}"')
        else:
            raise WildsegError(f"image not found: {argument} (check the path)")
    if loose:
        base = Path(os.path.commonpath([path.absolute().parent for path in loose]))
        yield from ((str(path), path.absolute().relative_to(base).with_suffix("").as_posix()) for path in loose)


def _scan(folder: Path, recursive: bool, exclude: Optional[Path]) -> Iterator[tuple[str, str]]:
    """(path, stem relative to `folder`) of the entries of `folder` named like images, outside `exclude`, in the
    order of their sorted paths (each folder's entries by name, a sub-folder's files where its name sorts).

    Recursively, files only (sub-folders are searched, not those reached by a link, as pathlib's rglob); otherwise
    a folder named like an image is kept so that it fails with its own message.
    """
    excluded = None if exclude is None else os.path.abspath(exclude)

    def walk(directory: str, relative: str) -> Iterator[tuple[str, str]]:
        if excluded is not None and (directory == excluded or directory.startswith(excluded + os.sep)):
            return
        try:
            with os.scandir(directory) as scanned:
                entries = sorted((entry.name, entry.is_dir(follow_symlinks=False), entry.is_file())
                                 for entry in scanned)
        except PermissionError:  # as pathlib's rglob: an unreadable folder is passed over
            return
        shown = os.path.join(str(folder), relative)
        for name, is_folder, is_file in entries:
            if recursive and is_folder:
                yield from walk(os.path.join(directory, name), f"{relative}{name}/")
            elif is_file or not recursive:
                root, suffix = os.path.splitext(name)
                if suffix.lower() in IMAGE_SUFFIXES:
                    yield shown + name, relative + root

    yield from walk(os.path.abspath(folder), "")


def _inside(path: Path, folder: Optional[Path]) -> bool:
    return folder is not None and path.absolute().is_relative_to(folder.absolute())


def _fixed_prefix(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard."""
    parts = Path(pattern).parts
    first_wildcard = next(index for index, part in enumerate(parts) if set(part) & set(GLOB_CHARACTERS))
    return Path(*parts[:first_wildcard]) if first_wildcard else Path(".")


def _listed_paths(list_file: Path) -> list[Path]:
    """Paths listed one per line in `list_file`, relative ones taken from the list's folder."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise WildsegError(f"cannot read the image list @{list_file}: {first_line(error)}") from None
    return [list_file.parent / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def table_key(image: Path) -> Path:
    """How a labels file's table keys an image: its absolute path with `..` and `.` resolved (links are kept)."""
    return Path(os.path.normpath(Path(image).absolute()))


def read_labels_file(path: Path) -> dict[Path, list[str]]:
    """Per-image labels from a JSON object {image: "a,b" or ["a", "b"]} or a CSV whose rows are
    `image,label,label,...` (a cell may hold several comma-separated labels; a header row `image,labels` is
    skipped). Relative image paths are taken from the labels file's folder; keys are `table_key`s."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise WildsegError(f"cannot read {setting('labels_file')} {path}: {first_line(error)}") from None
    if path.suffix.lower() == ".json":
        entries = _json_entries(text, path)
    else:
        entries = _csv_entries(text)
    labels = {}
    for image, names in entries:
        names = [name.strip() for cell in names for name in cell.split(",") if name.strip()]
        labels[table_key(path.parent / image)] = names
    if not labels:
        raise WildsegError(f"{setting('labels_file')} {path} gives no image: write one `image,label,...` row per image")
    return labels


def _json_entries(text: str, path: Path) -> list[tuple[str, list[str]]]:
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as error:
        raise WildsegError(f"{setting('labels_file')} {path} is not valid JSON: {error}") from None
    if not isinstance(mapping, dict):
        raise WildsegError(f"{setting('labels_file')} {path} must hold a JSON object mapping image paths to labels")
    entries = []
    for image, names in mapping.items():
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise WildsegError(f"{setting('labels_file')} {path}: the labels of {image!r} must be a string or a list "
                               "of strings")
        entries.append((image, names))
    return entries


def _csv_entries(text: str) -> list[tuple[str, list[str]]]:
    rows = [row for row in csv.reader(text.splitlines()) if row and row[0].strip()]
    if rows and [cell.strip().casefold() for cell in rows[0][:2]] == ["image", "labels"]:
        rows = rows[1:]
    return [(row[0].strip(), row[1:]) for row in rows]
