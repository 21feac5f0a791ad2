"""Reading images of every common mode as displayed RGB, and clear errors for files that are not images."""

from pathlib import Path

import numpy as np
import pytest
from conftest import raises_worded
from PIL import Image

from wildseg.images import load_image
from wildseg.inputs import InputImage, expand_inputs, in_shard, listed_inputs, parse_shard


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
    with raises_worded("shape"):
        load_image(np.zeros((5, 6, 2)))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda path: None, "image not found"),
        (lambda path: path.mkdir(), "is a folder"),
        (lambda path: path.write_text("hello"), "not an image file"),
        (lambda path: path.write_bytes(b""), r"is empty \(0 bytes\)"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, make, message):
    path = tmp_path / "photo.jpg"
    make(path)
    with raises_worded(message):
        load_image(path)


def test_truncated_jpeg_is_a_clear_error(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with raises_worded("cannot decode .*truncated"):
        load_image(tmp_path / "cut.jpg")


def test_images_beyond_pillows_safety_limit_are_a_clear_error(tmp_path, monkeypatch):
    Image.new("RGB", (30, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with raises_worded("too large for Pillow's safety limit"):
        load_image(tmp_path / "big.png")


def test_shards_cover_every_image_once_in_any_order_and_keep_their_images_as_files_are_added():
    images = [InputImage(Path(f"{index}.jpg"), Path(f"trip/{index}")) for index in range(200)]
    shards = {count: [[image for image in images if in_shard(image, (index, count))]
                      for index in range(1, count + 1)] for count in (1, 3, 8)}
    for count, parts in shards.items():
        assert sorted(image.stem for part in parts for image in part) == sorted(image.stem for image in images)
        assert all(len(part) > 200 / count / 2 for part in parts), "roughly even"
    reversed_parts = [[image for image in reversed(images) if in_shard(image, (index, 3))] for index in (1, 2, 3)]
    assert [sorted(image.stem for image in part) for part in reversed_parts] == [
        sorted(image.stem for image in part) for part in shards[3]]
    more = images + [InputImage(Path("new.jpg"), Path("trip/new"))]
    assert [image for image in more[:200] if in_shard(image, (2, 3))] == shards[3][1]


def test_the_streamed_listing_keeps_pathlibs_order_and_each_shards_images(tmp_path, monkeypatch):
    """A tree with sub-folders sorting among files, mixed-case suffixes, a file named like a folder's prefix, a
    non-image and the output folder: the listing is `sorted(rglob)`'s order, and a shard's images are those that
    `in_shard` picks from the whole listing."""
    monkeypatch.chdir(tmp_path)
    names = ["a.jpg", "a/b.png", "a/c/d.JPG", "a-b.jpg", "b/x.webp", "b/x.txt", "B.tif", "out/old.png", "z.jpeg"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    reference = sorted(path for path in Path(".").rglob("*") if path.is_file() and path.suffix.lower() in
                       {".jpg", ".jpeg", ".png", ".tif", ".webp"} and path.parts[0] != "out")
    listed = expand_inputs(["."], recursive=True, exclude=Path("out"))
    assert [image.path for image in listed] == reference
    assert [image.stem for image in listed] == [path.with_suffix("") for path in reference]
    for shard in ((1, 3), (2, 3), (3, 3)):
        kept, total = listed_inputs(["."], recursive=True, exclude=Path("out"), shard=shard)
        assert total == len(reference) and kept == [image for image in listed if in_shard(image, shard)]


@pytest.mark.parametrize("text", ["0/3", "4/3", "a/b", "3", "1/0"])
def test_bad_shards_are_one_line_errors(text):
    with raises_worded("--shard takes K/N"):
        parse_shard(text)
