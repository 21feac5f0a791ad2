"""Reading images from paths, PIL images or arrays into RGB uint8 arrays, as the image is displayed."""

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import WildsegError, first_line

ImageInput = Union[str, Path, Image.Image, np.ndarray]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def load_image(source: ImageInput) -> np.ndarray:
    """Return the image as an H x W x 3 uint8 RGB array, rotated as its EXIF orientation says."""
    if isinstance(source, (str, Path)):
        return _pil_to_rgb(_open_image_file(Path(source)))
    if isinstance(source, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(source))
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    raise WildsegError(
        f"cannot read an image from a {type(source).__name__}: pass a file path, a PIL image or an array"
    )


def _open_image_file(path: Path) -> Image.Image:
    if not path.exists():
        raise WildsegError(f"image not found: {path} (check the path)")
    if path.is_dir():
        raise WildsegError(f"{path} is a folder, not an image file: pass an image file")
    if path.stat().st_size == 0:
        raise WildsegError(f"{path} is empty (0 bytes): an interrupted copy or download? copy it again")
    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise WildsegError(f"{path} is not an image file Pillow can read (JPEG, PNG, BMP, TIFF, WebP, ...)") from None
    except Image.DecompressionBombError:
        raise WildsegError(
            f"{path} is too large for Pillow's safety limit ({Image.MAX_IMAGE_PIXELS * 2} pixels): downscale it first"
        ) from None
    except PermissionError:
        raise WildsegError(f"cannot read {path}: permission denied (check the file's permissions)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise WildsegError(
            f"cannot decode {path}: {first_line(error)} (the file may be truncated or damaged)"
        ) from None
    return ImageOps.exif_transpose(image)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to RGB (16-bit and float grey images through `_array_to_rgb`)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return _array_to_rgb(np.array(image))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.array(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Accept H x W, H x W x 1, H x W x 3 or H x W x 4 arrays of uint8, integers or floats in [0, 1].

    Integers up to 255 are kept, up to 65535 are read as 16-bit (divided by 257), larger ones are scaled by
    their maximum.
    """
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[..., :3] if array.shape[2] != 1 else array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise WildsegError(f"an image array must be H x W or H x W x 3 (or 4), got shape {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        return np.ascontiguousarray(np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8))
    if np.issubdtype(array.dtype, np.integer):
        peak = int(array.max())
        scale = 1.0 if peak <= 255 else 1.0 / 257.0 if peak <= 65535 else 255.0 / peak
        return np.ascontiguousarray(np.clip(np.round(array * scale), 0, 255).astype(np.uint8))
    raise WildsegError(f"unsupported image array type {array.dtype}: use uint8, 16-bit integers or floats in [0, 1]")

