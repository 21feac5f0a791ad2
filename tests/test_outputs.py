"""Per-class scores (.npz), heat maps, their paths and the overlay's legend and tint (wildseg/outputs.py)."""

import json
import re

import numpy as np
import pytest
from PIL import Image

import wildseg.outputs
from wildseg.outputs import (
    SWATCH_RING,
    class_boundaries,
    heatmap_image,
    heatmap_paths,
    is_done,
    label_palette,
    label_slug,
    legend_font_size,
    legend_swatch_boxes,
    luminance,
    output_paths,
    overlay_image,
    write_heatmaps,
    write_outputs,
    write_scores,
)

LABELS = ["background", "a/b c", "café", "日本"]
OLIVE, NAVY = 3, 4
"""Indices of (128, 128, 0) and (0, 0, 128) in PASCAL VOC's colour map."""


def random_scores(classes: int, height: int, width: int) -> np.ndarray:
    """Per-pixel probabilities (classes x height x width) that sum to 1 over classes."""
    raw = np.random.default_rng(0).random((classes, height, width)).astype(np.float32)
    return raw / raw.sum(axis=0)


def test_scores_file_round_trips_as_float16_with_labels_and_image_size(tmp_path):
    scores = random_scores(len(LABELS), 20, 30)
    path = tmp_path / "photo_scores.npz"
    write_scores(path, scores, LABELS, (40, 60))
    with np.load(path, allow_pickle=False) as stored:
        assert stored["scores"].dtype == np.float16
        np.testing.assert_array_equal(stored["scores"], scores.astype(np.float16))
        assert stored["labels"].dtype.kind == "U" and stored["labels"].tolist() == LABELS
        assert stored["image_size"].tolist() == [40, 60]
    assert [entry.name for entry in tmp_path.iterdir()] == ["photo_scores.npz"], "no temporary or .npz.npz left"


def test_a_failed_scores_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "photo_scores.npz"
    path.write_bytes(b"earlier run")

    def fail_half_way(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_scores(path, random_scores(2, 4, 4), ["background", "cat"], (4, 4))
    assert path.read_bytes() == b"earlier run"
    assert [entry.name for entry in tmp_path.iterdir()] == ["photo_scores.npz"]


def test_scores_must_match_the_labels(tmp_path):
    with pytest.raises(ValueError, match="3 labels"):
        write_scores(tmp_path / "x_scores.npz", random_scores(2, 4, 4), ["background", "cat", "dog"], (4, 4))


def test_output_paths_are_unchanged_by_default_and_name_extras_safely(tmp_path):
    assert output_paths("sub/photo", tmp_path) == {
        "mask": tmp_path / "sub" / "photo.png",
        "overlay": tmp_path / "sub" / "photo_overlay.jpg",
        "record": tmp_path / "sub" / "photo.json",
    }
    paths = output_paths("sub/photo", tmp_path, scores=True, heatmap_labels=LABELS)
    assert paths["scores"] == tmp_path / "sub" / "photo_scores.npz"
    extras = {key: path.name for key, path in paths.items() if key.startswith("heatmap_")}
    assert extras == {"heatmap_1": "photo_heatmap_1_a-b-c.jpg", "heatmap_2": "photo_heatmap_2_cafe.jpg",
                      "heatmap_3": "photo_heatmap_3_label.jpg"}
    assert all(path.parent == tmp_path / "sub" for path in paths.values())
    assert heatmap_paths(output_paths("sub/photo", tmp_path), LABELS) == {
        key: path for key, path in paths.items() if key.startswith("heatmap_")}


def test_label_slugs_are_short_lower_case_ascii():
    assert label_slug("  Traffic Light / Pole ") == "traffic-light-pole"
    assert label_slug("../../etc") == "etc"
    slug = label_slug("x" * 100 + " tail")
    assert len(slug) == 40 and re.fullmatch(r"[a-z0-9-]+", slug)


def test_write_outputs_writes_scores_and_heatmaps_before_the_record(tmp_path, monkeypatch):
    """Full-size mask 80 x 120, working resolution 40 x 60: the npz keeps the working scores and the full size,
    heat maps are JPEGs of the working size, and the record is the last file renamed into place."""
    scores = random_scores(len(LABELS), 40, 60)
    preview_mask = scores.argmax(axis=0).astype(np.uint8)
    mask = np.repeat(np.repeat(preview_mask, 2, axis=0), 2, axis=1)
    preview = np.full((40, 60, 3), 90, dtype=np.uint8)
    paths = output_paths("photo", tmp_path, scores=True, heatmap_labels=LABELS)
    written = []
    write_atomically = wildseg.outputs.write_atomically

    def recording(path, write):
        write_atomically(path, write)
        written.append(path)

    monkeypatch.setattr(wildseg.outputs, "write_atomically", recording)
    write_outputs(paths, preview, preview_mask, mask, LABELS, {"labels": LABELS}, scores=scores,
                  save_scores=True, heatmaps=True)
    assert written[-1] == paths["record"] and sorted(written) == sorted(paths.values())
    with np.load(paths["scores"]) as stored:
        assert stored["scores"].shape == (4, 40, 60) and stored["image_size"].tolist() == [80, 120]
    for key in ("heatmap_1", "heatmap_2", "heatmap_3"):
        with Image.open(paths[key]) as heatmap:
            assert heatmap.format == "JPEG" and heatmap.size == (60, 40)
    assert json.loads(paths["record"].read_text())["labels"] == LABELS
    assert not list(tmp_path.glob(".*"))
    assert is_done(paths)
    paths["heatmap_2"].unlink()
    assert not is_done(paths), "an image whose asked-for heat map is missing is done again"
    assert is_done({key: paths[key] for key in ("mask", "overlay", "record")})


def test_write_outputs_needs_scores_for_the_extras(tmp_path):
    mask = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="need the scores"):
        write_outputs(output_paths("photo", tmp_path), np.zeros((4, 4, 3), np.uint8), mask, mask, ["background"],
                      {}, heatmaps=True)
    assert not list(tmp_path.iterdir())


def test_heatmap_colour_follows_the_score_on_a_fixed_scale(tmp_path):
    """On a grey (128) photo, the heat-map JPEGs of a label scoring 1 everywhere and of one scoring 0 everywhere
    differ below the legend by 28.0 on average over channels (measured: (124, 54, 54) vs (80, 62, 86); before
    JPEG 28.7), red higher by 44; the colour of a score is the same whatever the other scores (fixed scale,
    no normalisation per map)."""
    photo = np.full((120, 160, 3), 128, dtype=np.uint8)
    scores = np.zeros((3, 120, 160), np.float32)
    scores[1] = 1
    labels = ["background", "everywhere", "nowhere"]
    paths = output_paths("grey", tmp_path, heatmap_labels=labels)
    write_heatmaps(paths, photo, scores, labels)
    below_legend = slice(60, None)
    with Image.open(paths["heatmap_1"]) as hot_file, Image.open(paths["heatmap_2"]) as cold_file:
        hot = np.asarray(hot_file, dtype=np.float32)[below_legend]
        cold = np.asarray(cold_file, dtype=np.float32)[below_legend]
    assert np.abs(hot - cold).mean() >= 27
    assert hot[..., 0].mean() - cold[..., 0].mean() >= 40, "red rises with the score"
    ramp = np.tile(np.linspace(0, 1, 160, dtype=np.float32), (120, 1))
    half = np.where(ramp < 0.5, ramp, 0.5).astype(np.float32)
    left_of_ramp = np.asarray(heatmap_image(photo, ramp, "ramp"))[below_legend, :80]
    left_of_half = np.asarray(heatmap_image(photo, half, "half"))[below_legend, :80]
    np.testing.assert_array_equal(left_of_ramp, left_of_half)


def legend_scene(brightness: int):
    """A uniform photo of `brightness` (240 x 320) with an olive and a navy square, away from the legend."""
    height, width = 240, 320
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[120:200, 100:180] = OLIVE
    mask[120:200, 200:300] = NAVY
    photo = np.full((height, width, 3), brightness, dtype=np.uint8)
    labels = ["background", "person", "car", "olive", "navy"]
    return photo, mask, labels


def swatch_and_ring(overlay: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of a legend swatch and of the `SWATCH_RING`-pixel frame around it."""
    left, top, right, bottom = box
    ring = SWATCH_RING
    framed = overlay[top - ring:bottom + ring + 1, left - ring:right + ring + 1]
    inside = np.zeros(framed.shape[:2], dtype=bool)
    inside[ring:-ring, ring:-ring] = True
    return framed[inside], framed[~inside]


@pytest.mark.parametrize("brightness", [0, 235])
def test_every_legend_swatch_stands_out_from_its_surroundings(brightness):
    """Each swatch is framed by white (dark swatch) or black (light swatch): on a black and on a bright photo the
    luma of background's black, olive (113.4) and navy (14.6) swatches differs from their frame by at least
    141.6 (olive against white), where the old black box left black and navy swatches at a difference of 0
    and 14.6."""
    photo, mask, labels = legend_scene(brightness)
    palette = label_palette(256)
    overlay = np.asarray(overlay_image(photo, mask, labels, palette))
    boxes = legend_swatch_boxes(320, 240, 3)
    for index, box in zip((0, OLIVE, NAVY), boxes):
        swatch, ring = swatch_and_ring(overlay, box)
        assert (swatch == palette[index]).all() and (ring == ring[0]).all()
        assert abs(luminance(palette[index]) - luminance(ring[0])) >= 141
    assert legend_font_size(320, 240) == 12


def test_legend_text_is_white_with_a_black_outline_on_a_bright_photo():
    photo, mask, labels = legend_scene(235)
    overlay = np.asarray(overlay_image(photo, mask, labels, label_palette(256)))
    left, top, right, bottom = legend_swatch_boxes(320, 240, 3)[1]
    text = luminance(overlay[top:bottom + 1, right + SWATCH_RING + 4:right + 60])
    assert text.max() >= 250 and text.min() <= 5


@pytest.mark.parametrize("brightness, olive_change, navy_change", [(0, 51, 25), (235, 89, 115)])
def test_the_tint_and_boundaries_change_labelled_pixels_only(brightness, olive_change, navy_change):
    """Mean absolute channel change inside the squares (boundaries excluded), measured: black photo olive 51.3,
    navy 25.7 (blue 0 -> 77); bright (235) photo olive 89.7, navy 115.3 (at the old opacity 0.5 without
    boundaries: 42.7, 21.3, 74.3, 95.7). Boundary pixels (2 px inside each
    square) turn white on the dark photo and black on the bright one (change 255 and 235); background pixels
    outside the legend keep their value exactly."""
    photo, mask, labels = legend_scene(brightness)
    overlay = np.asarray(overlay_image(photo, mask, labels, label_palette(256))).astype(np.int16)
    change = np.abs(overlay - photo)
    boundaries = class_boundaries(mask)
    assert change[(mask == OLIVE) & ~boundaries].mean() >= olive_change
    assert change[(mask == NAVY) & ~boundaries].mean() >= navy_change
    assert change[boundaries].min() >= 235
    assert boundaries.sum() == (80 * 80 - 76 * 76) + (80 * 100 - 76 * 96), "2-pixel frames inside both squares"
    below_legend = np.s_[100:, :]
    assert not change[below_legend][mask[below_legend] == 0].any()
