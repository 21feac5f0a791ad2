"""Reading images of every common mode as displayed RGB, and clear errors for files that are not images."""

import numpy as np
import pytest
from PIL import Image

from wildseg.errors import WildsegError
from wildseg.images import load_image


def test_modes_become_rgb(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert np.array_equal(load_image(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, axis=2))

    deep = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert np.array_equal(load_image(tmp_path / "deep.png")[..., 0], np.round(deep / 257).astype(np.uint8))

    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png")[0, 0].tolist() == [200, 0, 0]

    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)
    assert load_image(tmp_path / "palette.png")[0, 0].tolist() == [10, 20, 30]

    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red = load_image(tmp_path / "cmyk.jpg")[1, 1]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_exif_rotation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    displayed = load_image(tmp_path / "rotated.jpg")
    assert displayed.shape == (40, 20, 3)
    assert displayed[:10].mean() > 200 and displayed[20:].mean() < 30


def test_arrays_are_accepted():
    assert load_image(np.zeros((5, 6), dtype=np.uint8)).shape == (5, 6, 3)
    assert load_image(np.full((5, 6, 3), 0.5)).max() == 128
    assert load_image(np.zeros((5, 6, 4), dtype=np.uint8)).shape == (5, 6, 3)
    with pytest.raises(WildsegError, match="shape"):
        load_image(np.zeros((5, 6, 2)))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda path: None, "image not found"),
        (lambda path: path.mkdir(), "is a folder"),
        (lambda path: path.write_text("hello"), "not an image file"),
        (lambda path: path.write_bytes(b""), "not an image file"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, make, message):
    path = tmp_path / "photo.jpg"
    make(path)
    with pytest.raises(WildsegError, match=message):
        load_image(path)


def test_truncated_jpeg_is_a_clear_error(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(WildsegError, match="cannot decode .*truncated"):
        load_image(tmp_path / "cut.jpg")


def test_images_beyond_pillows_safety_limit_are_a_clear_error(tmp_path, monkeypatch):
    Image.new("RGB", (30, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(WildsegError, match="too large for Pillow's safety limit"):
        load_image(tmp_path / "big.png")
