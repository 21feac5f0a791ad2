"""Writing a segmentation to disk: palette PNG mask, colour overlay with legend, JSON record, and on request
per-class scores (.npz) and heat maps (JPEG); all atomic, in background threads (`BackgroundWriter`) so that
encoding and disk I/O overlap the model's work."""

import json
import os
import re
import time
import unicodedata
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable, Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import TEMPORARY_SUFFIX, write_atomically

OVERLAY_OPACITY = 0.6
BOUNDARY_WIDTH = 2
"""Pixels of a class within this distance (Chebyshev) of another class are drawn as its boundary line."""
PANEL_OPACITY = 0.75
"""How much the semi-opaque black panels behind legends darken the photo."""
LEGEND_MARGIN = 4
LEGEND_PADDING = 4
SWATCH_RING = 2
HEATMAP_COLORMAP = cv2.COLORMAP_TURBO
HEATMAP_OPACITY = 0.6
SLUG_LENGTH = 40
BASIC_OUTPUTS = ("mask", "overlay", "record")
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def label_palette(count: int) -> np.ndarray:
    """count x 3 uint8 colours, PASCAL VOC's colour map: class bits spread over the high bits of R, G and B."""
    colours = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        value, shift = index, 7
        while value:
            for channel in range(3):
                colours[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return colours


def mask_image(mask: np.ndarray, palette: np.ndarray) -> Image.Image:
    """A palette-indexed ('P') image whose pixel values are the class indices."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(palette.flatten().tolist())
    return image


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma (0-255) of RGB values along the last axis."""
    return np.asarray(rgb, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def contrasting(rgb) -> tuple[int, int, int]:
    """White for a dark colour (luma below 128), black for a light one."""
    return WHITE if luminance(rgb) < 128 else BLACK


def class_boundaries(mask: np.ndarray) -> np.ndarray:
    """Labelled pixels (class > 0) within `BOUNDARY_WIDTH` pixels of a pixel of another class: a grey-scale
    erosion or dilation of the mask over that window changes them."""
    window = np.ones((2 * BOUNDARY_WIDTH + 1,) * 2, dtype=np.uint8)
    classes = mask.astype(np.uint8)
    changed = (cv2.erode(classes, window) != classes) | (cv2.dilate(classes, window) != classes)
    return changed & (classes > 0)


def legend_font_size(width: int, height: int) -> int:
    """The legends' font size in pixels for an image of width x height."""
    return max(12, min(width, height) // 30)


def legend_swatch_boxes(width: int, height: int, count: int) -> list[tuple[int, int, int, int]]:
    """The overlay legend's swatches, one row per entry: (left, top, right, bottom), inclusive pixel bounds; each
    is framed by a `SWATCH_RING`-pixel ring, all on a panel `LEGEND_PADDING` pixels wider."""
    size = legend_font_size(width, height)
    left = LEGEND_MARGIN + LEGEND_PADDING + SWATCH_RING
    step = size + 2 * SWATCH_RING + LEGEND_PADDING
    return [(left, left + row * step, left + size - 1, left + row * step + size - 1) for row in range(count)]


def _darken(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """`image` with the inclusive `box` blended with black at `PANEL_OPACITY` (a semi-opaque panel)."""
    pixels = np.asarray(image).copy()
    left, top, right, bottom = (max(0, value) for value in box)
    region = pixels[top:bottom + 1, left:right + 1]
    pixels[top:bottom + 1, left:right + 1] = np.round(region * (1 - PANEL_OPACITY)).astype(np.uint8)
    return Image.fromarray(pixels)


def _stroke(font_size: int) -> int:
    return max(1, font_size // 10)


def _outlined_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, font_size: int) -> None:
    """White text with a black outline (Pillow's stroke), readable on any background; `xy` is its left middle."""
    draw.text(xy, text, fill=WHITE, font=font, anchor="lm", stroke_width=_stroke(font_size), stroke_fill=BLACK)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font, font_size: int) -> int:
    return int(np.ceil(draw.textlength(text, font=font))) + 2 * _stroke(font_size)


def overlay_image(image: np.ndarray, mask: np.ndarray, labels: list[str], palette: np.ndarray) -> Image.Image:
    """The photo with each labelled pixel tinted by its class colour, class boundaries drawn white on dark and
    black on light surroundings (background pixels untouched), and a legend of the classes present.

    Legend entries sit on a semi-opaque black panel; each swatch has a ring of the colour contrasting with it
    (`contrasting`) and each name is outlined text, so that black, navy or white swatches stay visible.
    """
    labelled = (mask > 0)[..., None]
    tinted = (1 - OVERLAY_OPACITY) * image + OVERLAY_OPACITY * palette[mask].astype(np.float32)
    pixels = np.round(np.where(labelled, tinted, image.astype(np.float32))).astype(np.uint8)
    boundaries = class_boundaries(mask)
    dark_surroundings = cv2.blur(luminance(pixels), (9, 9)) < 128
    pixels[boundaries & dark_surroundings] = WHITE
    pixels[boundaries & ~dark_surroundings] = BLACK
    present = [index for index in range(len(labels)) if np.any(mask == index)]
    overlay = Image.fromarray(pixels)
    if not present:
        return overlay
    font_size = legend_font_size(*overlay.size)
    font = ImageFont.load_default(size=font_size)
    boxes = legend_swatch_boxes(*overlay.size, len(present))
    text_left = boxes[0][2] + SWATCH_RING + LEGEND_PADDING
    widest = max(_text_width(ImageDraw.Draw(overlay), labels[index], font, font_size) for index in present)
    overlay = _darken(overlay, (LEGEND_MARGIN, LEGEND_MARGIN, text_left + widest + LEGEND_PADDING,
                                boxes[-1][3] + SWATCH_RING + LEGEND_PADDING))
    draw = ImageDraw.Draw(overlay)
    for index, (left, top, right, bottom) in zip(present, boxes):
        colour = tuple(int(channel) for channel in palette[index])
        draw.rectangle([left - SWATCH_RING, top - SWATCH_RING, right + SWATCH_RING, bottom + SWATCH_RING],
                       fill=contrasting(colour))
        draw.rectangle([left, top, right, bottom], fill=colour)
        _outlined_text(draw, (text_left, (top + bottom + 1) / 2), labels[index], font, font_size)
    return overlay


def label_slug(label: str) -> str:
    """A file-name-safe form of a label: ASCII letters (accents dropped) and digits, lower case, other runs of
    characters as one '-', at most `SLUG_LENGTH` characters; 'label' when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:SLUG_LENGTH].strip("-")
    return slug or "label"


def heatmap_image(image: np.ndarray, score: np.ndarray, label: str) -> Image.Image:
    """One class's score map (h x w, probabilities) as OpenCV's TURBO colour map on the fixed scale 0 -> 0,
    1 -> 255 (comparable across classes and images), blended over `image` (h x w x 3 RGB) at `HEATMAP_OPACITY`,
    with the label name and a 0-1 colour bar on a semi-opaque panel at the top left."""
    levels = np.round(np.clip(score, 0, 1) * 255).astype(np.uint8)
    colours = cv2.applyColorMap(levels, HEATMAP_COLORMAP)[..., ::-1].astype(np.float32)
    blended = np.round((1 - HEATMAP_OPACITY) * image + HEATMAP_OPACITY * colours).astype(np.uint8)
    heatmap = Image.fromarray(blended)
    font_size = legend_font_size(*heatmap.size)
    font = ImageFont.load_default(size=font_size)
    draw = ImageDraw.Draw(heatmap)
    left = LEGEND_MARGIN + LEGEND_PADDING
    label_middle = left + font_size / 2
    bar_top = left + font_size + LEGEND_PADDING
    bar_bottom = bar_top + font_size - 1
    bar_left = left + _text_width(draw, "0", font, font_size) + LEGEND_PADDING
    bar_right = bar_left + 5 * font_size - 1
    one_left = bar_right + 1 + LEGEND_PADDING
    label_right = left + _text_width(draw, label, font, font_size)
    one_right = one_left + _text_width(draw, "1", font, font_size)
    heatmap = _darken(heatmap, (LEGEND_MARGIN, LEGEND_MARGIN, max(label_right, one_right) + LEGEND_PADDING,
                                bar_bottom + LEGEND_PADDING))
    ramp = np.linspace(0, 255, bar_right - bar_left + 1).round().astype(np.uint8)[None, :]
    bar = cv2.applyColorMap(np.repeat(ramp, bar_bottom - bar_top + 1, axis=0), HEATMAP_COLORMAP)[..., ::-1]
    heatmap.paste(Image.fromarray(np.ascontiguousarray(bar)), (bar_left, bar_top))
    draw = ImageDraw.Draw(heatmap)
    draw.rectangle([bar_left - 1, bar_top - 1, bar_right + 1, bar_bottom + 1], outline=WHITE)
    _outlined_text(draw, (left, label_middle), label, font, font_size)
    bar_middle = (bar_top + bar_bottom + 1) / 2
    _outlined_text(draw, (left, bar_middle), "0", font, font_size)
    _outlined_text(draw, (one_left, bar_middle), "1", font, font_size)
    return heatmap


def write_scores(path: Path, scores: np.ndarray, labels: Sequence[str], image_size: tuple[int, int]) -> None:
    """Write NumPy's compressed .npz (read by `np.load` alone) atomically: `scores` as float16 (classes x h x w,
    working resolution), `labels` as a unicode array (background first), `image_size` as the full (H, W)."""
    if scores.ndim != 3 or len(scores) != len(labels):
        raise ValueError(f"scores of shape {scores.shape} do not match {len(labels)} labels")
    arrays = {"scores": scores.astype(np.float16), "labels": np.array(list(labels), dtype=np.str_),
              "image_size": np.array(image_size, dtype=np.int64)}

    def save(temporary: Path) -> None:
        with open(temporary, "wb") as file:
            np.savez_compressed(file, **arrays)

    write_atomically(path, save)


def write_heatmaps(paths: dict[str, Path], image: np.ndarray, scores: np.ndarray, labels: Sequence[str]) -> None:
    """Write the heat map of each class but background (`heatmap_image`) as a JPEG to its `heatmap_paths` path,
    atomically; `image` and `scores` are at working resolution."""
    for index, path in enumerate(heatmap_paths(paths, labels).values(), start=1):
        heatmap = heatmap_image(image, scores[index], labels[index])
        write_atomically(path, lambda temporary: heatmap.save(temporary, format="JPEG", quality=90))


def output_paths(stem: Path, out_dir: Path, *, scores: bool = False,
                 heatmap_labels: Optional[Sequence[str]] = None, instances: bool = False) -> dict[str, Path]:
    """Where an image's outputs go: <stem>.png, <stem>_overlay.jpg and <stem>.json under `out_dir`; with
    `scores`, also 'scores': <stem>_scores.npz; with `heatmap_labels` (background first), also its
    `heatmap_paths`; with `instances`, also 'instances': <stem>_instances.png (`instances_path`).

    `stem` may hold sub-folders (mirroring where the image was found).
    """
    base = out_dir / stem
    paths = {
        "mask": base.with_name(f"{base.name}.png"),
        "overlay": base.with_name(f"{base.name}_overlay.jpg"),
        "record": base.with_name(f"{base.name}.json"),
    }
    if scores:
        paths["scores"] = scores_path(paths)
    if heatmap_labels is not None:
        paths.update(heatmap_paths(paths, heatmap_labels))
    if instances:
        paths["instances"] = instances_path(paths)
    return paths


def _stem_path(paths: dict[str, Path]) -> Path:
    """out_dir / stem of an image whose outputs are `paths`: its mask's path less '.png'."""
    return paths["mask"].with_suffix("")


def scores_path(paths: dict[str, Path]) -> Path:
    """Where the scores of an image whose outputs are `paths` (from `output_paths`) go: <stem>_scores.npz."""
    base = _stem_path(paths)
    return base.with_name(f"{base.name}_scores.npz")


def instances_path(paths: dict[str, Path]) -> Path:
    """Where the object map of an image whose outputs are `paths` goes: <stem>_instances.png, a 16-bit PNG whose
    value i is the record's object i (`instances.ImageObjects`), 0 where there is none."""
    base = _stem_path(paths)
    return base.with_name(f"{base.name}_instances.png")


def write_object_map(path: Path, object_map: np.ndarray) -> None:
    """Write an object map (H x W uint16) as a 16-bit grey PNG, atomically."""
    image = Image.fromarray(object_map.astype(np.uint16))
    write_atomically(path, lambda temporary: image.save(temporary, format="PNG"))


def heatmap_paths(paths: dict[str, Path], labels: Sequence[str]) -> dict[str, Path]:
    """The heat maps of an image whose outputs are `paths` (from `output_paths`), for `labels` (background
    first): 'heatmap_<index>' -> <stem>_heatmap_<index>_<label_slug>.jpg for each index from 1."""
    base = _stem_path(paths)
    return {f"heatmap_{index}": base.with_name(f"{base.name}_heatmap_{index}_{label_slug(labels[index])}.jpg")
            for index in range(1, len(labels))}


def done_record(paths: dict[str, Path]) -> Optional[dict]:
    """The JSON record of an image that is done, else None: done when its record (written last) is readable and its
    mask exists, and so do the scores and heat maps among `paths` (none unless `output_paths` was asked for them)."""
    try:
        record = json.loads(paths["record"].read_text())
    except (OSError, ValueError):
        return None
    extras = [path for key, path in paths.items() if key not in BASIC_OUTPUTS]
    done = is_record(record) and paths["mask"].is_file() and all(path.is_file() for path in extras)
    return record if done else None


def is_record(record) -> bool:
    """Whether JSON read from an image's record file is a finished record (its labels are written)."""
    return isinstance(record, dict) and "labels" in record


def is_done(paths: dict[str, Path]) -> bool:
    """Whether an image is done (`done_record`)."""
    return done_record(paths) is not None


@dataclass(frozen=True)
class FolderEntries:
    """An output folder's entries, listed once: the names of its files and of its sub-folders, and per name the
    temporary files that `write_atomically` left beside it when a run was killed (`.NAME.<letters>.part`)."""

    files: frozenset[str] = frozenset()
    folders: frozenset[str] = frozenset()
    temporaries: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.files or self.folders or self.temporaries)


def folder_entries(folder: Path) -> FolderEntries:
    """The `FolderEntries` of `folder` (none where it does not exist yet)."""
    files, folders, temporaries = set(), set(), {}
    try:
        with os.scandir(folder) as scanned:
            for entry in scanned:
                if entry.is_dir():
                    folders.add(entry.name)
                elif entry.name.startswith(".") and entry.name.endswith(TEMPORARY_SUFFIX):
                    original = entry.name[1 : -len(TEMPORARY_SUFFIX)].rpartition(".")[0]
                    temporaries.setdefault(original, []).append(entry.name)
                else:
                    files.add(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return FolderEntries(frozenset(files), frozenset(folders), temporaries)


def remove_stale_temporaries(paths: Iterable[Path]) -> None:
    """Delete the temporary files that `write_atomically` left beside `paths` when a run was killed (and only
    theirs: another run writing other names into the same folder keeps its own), listing each folder once."""
    names: dict[Path, set[str]] = {}
    for path in paths:
        names.setdefault(path.parent, set()).add(path.name)
    for folder, wanted in names.items():
        for name, leftovers in folder_entries(folder).temporaries.items():
            if name in wanted:
                for leftover in leftovers:
                    (folder / leftover).unlink(missing_ok=True)


def write_outputs(
    paths: dict[str, Path],
    preview_image: np.ndarray,
    preview_mask: np.ndarray,
    mask: np.ndarray,
    labels: list[str],
    record: dict,
    *,
    scores: Optional[np.ndarray] = None,
    save_scores: bool = False,
    heatmaps: bool = False,
    object_map: Optional[np.ndarray] = None,
) -> None:
    """Write mask, overlay, then on request scores, heat maps and the object map, and JSON record atomically; the
    JSON comes last and so marks the image as done.

    The overlay and heat maps are drawn on the preview (the image at working resolution, for very large
    images). `save_scores` writes `scores` (classes x h x w at working resolution) to <stem>_scores.npz,
    `heatmaps` writes one heat map per label and `object_map` (full size, `instances.ImageObjects.map`) goes to
    <stem>_instances.png, all where `output_paths` puts them (whether or not `paths` holds them). A record left by
    an earlier run is removed first, so a failure part-way never pairs it with a new mask. A record with
    `timings_s` gains `write_s`: the seconds the files before it took.
    """
    if (save_scores or heatmaps) and scores is None:
        raise ValueError("save_scores and heatmaps need the scores")
    started = time.perf_counter()
    paths["record"].unlink(missing_ok=True)
    palette = label_palette(256)
    write_atomically(paths["mask"], lambda path: mask_image(mask, palette).save(path, format="PNG"))
    overlay = overlay_image(preview_image, preview_mask, labels, palette)
    write_atomically(paths["overlay"], lambda path: overlay.save(path, format="JPEG", quality=90))
    if save_scores:
        write_scores(scores_path(paths), scores, labels, mask.shape[:2])
    if heatmaps:
        write_heatmaps(paths, preview_image, scores, labels)
    if object_map is not None:
        write_object_map(instances_path(paths), object_map)
    if isinstance(record.get("timings_s"), dict):
        record = {**record, "timings_s": {**record["timings_s"], "write_s": time.perf_counter() - started}}
    text = json.dumps({**record, "palette": palette[: len(labels)].tolist()}, indent=2)
    write_atomically(paths["record"], lambda path: path.write_text(text + "\n"))


class BackgroundWriter:
    """Runs writes in `threads` threads while the caller goes on.

    `submit(key, write)` queues `write()` (waiting while `threads` writes are unfinished, which bounds the
    results held in memory); `finished()` returns (key, error) for every write that has ended since the
    last call, error None on success; `finished(wait_all=True)` waits for all of them first. As a context
    manager it waits for every write on exit, so that none is cut short.
    """

    def __init__(self, threads: int):
        self.executor = ThreadPoolExecutor(max(1, threads), thread_name_prefix="wildseg-write")
        self.limit = max(1, threads)
        self.running: dict[Future, Hashable] = {}

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.executor.shutdown(wait=True)

    def submit(self, key: Hashable, write: Callable[[], None]) -> None:
        unfinished = [future for future in self.running if not future.done()]
        if len(unfinished) >= self.limit:
            wait(unfinished, return_when=FIRST_COMPLETED)
        self.running[self.executor.submit(write)] = key

    def finished(self, wait_all: bool = False) -> list[tuple[Hashable, Optional[BaseException]]]:
        if wait_all:
            wait(self.running)
        ended = [future for future in self.running if future.done()]
        return [(self.running.pop(future), future.exception()) for future in ended]
