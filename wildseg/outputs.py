"""Writing a segmentation to disk: palette PNG mask, colour overlay with legend, JSON record; all atomic,
in background threads (`BackgroundWriter`) so that encoding and disk I/O overlap the model's work."""

import glob
import json
import os
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Hashable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import WildsegError, first_line

OVERLAY_OPACITY = 0.5
TEMPORARY_SUFFIX = ".part"


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


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it over `path`; never leave a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~PROCESS_UMASK)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, data, what: str) -> None:
    """Write `data` as indented JSON to `path` atomically; a failure is one line naming `what` was being written."""
    text = json.dumps(data, indent=2) + "\n"
    try:
        write_atomically(path, lambda temporary: temporary.write_text(text))
    except OSError as error:
        raise WildsegError(f"cannot write {what} {path}: {first_line(error)}") from None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


PROCESS_UMASK = _current_umask()
"""Read once at import: reading it sets it for a moment, which writer threads must not race."""


def mask_image(mask: np.ndarray, palette: np.ndarray) -> Image.Image:
    """A palette-indexed ('P') image whose pixel values are the class indices."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(palette.flatten().tolist())
    return image


def overlay_image(image: np.ndarray, mask: np.ndarray, labels: list[str], palette: np.ndarray) -> Image.Image:
    """The photo with each labelled pixel tinted by its class colour, and a legend of the classes present."""
    colours = palette[mask].astype(np.float32)
    tinted = np.where(
        (mask > 0)[..., None], (1 - OVERLAY_OPACITY) * image + OVERLAY_OPACITY * colours, image.astype(np.float32)
    )
    overlay = Image.fromarray(np.round(tinted).astype(np.uint8))
    present = [index for index in range(len(labels)) if np.any(mask == index)]
    draw = ImageDraw.Draw(overlay)
    font_size = max(12, min(overlay.size) // 30)
    font = ImageFont.load_default(size=font_size)
    swatch = font_size
    for row, index in enumerate(present):
        top = 4 + row * (swatch + 4)
        text_width = draw.textlength(labels[index], font=font)
        draw.rectangle([4, top - 2, 14 + swatch + text_width, top + swatch + 2], fill=(0, 0, 0))
        draw.rectangle([6, top, 6 + swatch, top + swatch], fill=tuple(int(c) for c in palette[index]))
        draw.text((10 + swatch, top), labels[index], fill=(255, 255, 255), font=font)
    return overlay


def output_paths(stem: Path, out_dir: Path) -> dict[str, Path]:
    """Where an image's outputs go: <stem>.png, <stem>_overlay.jpg and <stem>.json under `out_dir`.

    `stem` may hold sub-folders (mirroring where the image was found).
    """
    base = out_dir / stem
    return {
        "mask": base.with_name(f"{base.name}.png"),
        "overlay": base.with_name(f"{base.name}_overlay.jpg"),
        "record": base.with_name(f"{base.name}.json"),
    }


def is_done(paths: dict[str, Path]) -> bool:
    """An image is done when its JSON record (written last) is readable and its mask exists."""
    try:
        record = json.loads(paths["record"].read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "labels" in record and paths["mask"].is_file()


def remove_stale_temporaries(paths) -> None:
    """Delete the temporary files that `write_atomically` left beside `paths` when a run was killed (and only
    theirs: another run writing other names into the same folder keeps its own)."""
    for path in paths:
        if path.parent.is_dir():
            for leftover in path.parent.glob(f".{glob.escape(path.name)}.*{TEMPORARY_SUFFIX}"):
                if leftover.is_file():
                    leftover.unlink(missing_ok=True)


def write_outputs(
    paths: dict[str, Path],
    preview_image: np.ndarray,
    preview_mask: np.ndarray,
    mask: np.ndarray,
    labels: list[str],
    record: dict,
) -> None:
    """Write mask, overlay and JSON record atomically; the JSON comes last and so marks the image as done.

    The overlay is drawn on the preview (the image at working resolution, for very large images). A record
    left by an earlier run is removed first, so a failure part-way never pairs it with a new mask.
    """
    paths["record"].unlink(missing_ok=True)
    palette = label_palette(256)
    write_atomically(paths["mask"], lambda path: mask_image(mask, palette).save(path, format="PNG"))
    overlay = overlay_image(preview_image, preview_mask, labels, palette)
    write_atomically(paths["overlay"], lambda path: overlay.save(path, format="JPEG", quality=90))
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
