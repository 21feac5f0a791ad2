"""Output folders as data sets: COCO files that pycocotools loads and decodes back to the masks, rebuilt on
resume; YOLO polygons that cover real CamVid masks; `wildseg export` without the model."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared_dataset, tiny_cli_args
from PIL import Image
from pycocotools.coco import COCO

from wildseg.cli import main
from wildseg.export import region_polygons, yolo_lines

LABELS = ["road", "car", "sky", "building"]


def camvid_pictures(folder: Path, count: int, start: int = 0) -> list[Path]:
    """CamVid test images `start`.. shrunk to 120 x 90, into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in sorted((shared_dataset("camvid") / "images").iterdir())[start : start + count]:
        paths.append(folder / f"{path.stem}.jpg")
        Image.open(path).convert("RGB").resize((120, 90)).save(paths[-1])
    return paths


def segment(*arguments, checkpoint):
    result = CliRunner().invoke(main, ["segment", *map(str, arguments), "-l", ",".join(LABELS), "-q",
                                       *map(str, tiny_cli_args(checkpoint)), "--tta", "none", "--crf-iters", "1"])
    assert result.exit_code == 0, result.output
    return result


def test_the_coco_file_loads_with_pycocotools_and_decodes_to_exactly_the_masks(tmp_path, tiny_checkpoint):
    camvid_pictures(tmp_path / "images" / "day", 3)
    out, annotations = tmp_path / "out", tmp_path / "annotations.json"
    segment(tmp_path / "images", "-r", "-o", out, "--coco", annotations, checkpoint=tiny_checkpoint)
    coco = COCO(str(annotations))
    assert [coco.cats[index]["name"] for index in sorted(coco.cats)] == LABELS, "categories in label order"
    assert len(coco.imgs) == 3
    for entry in coco.imgs.values():
        assert entry["file_name"].startswith("day/") and entry["file_name"].endswith(".jpg")
        stem = out / entry["file_name"][: -len(".jpg")]
        mask = np.array(Image.open(stem.with_suffix(".png")))
        record = json.loads(stem.with_suffix(".json").read_text())
        assert (entry["height"], entry["width"]) == mask.shape
        found = {}
        for annotation in coco.imgToAnns[entry["id"]]:
            index = record["labels"].index(coco.cats[annotation["category_id"]]["name"])
            assert np.array_equal(coco.annToMask(annotation), (mask == index).astype(np.uint8))
            assert annotation["area"] == int((mask == index).sum()) and annotation["iscrowd"] == 0
            rows, columns = np.nonzero(mask == index)
            assert annotation["bbox"] == [columns.min(), rows.min(), np.ptp(columns) + 1, np.ptp(rows) + 1]
            assert annotation["score"] == record["classes"][index]["mean_score"]
            found[index] = annotation
        assert sorted(found) == sorted(set(np.unique(mask)) - {0}), "one annotation per class present"


def test_the_coco_file_holds_every_image_once_when_a_run_is_resumed_and_extended(tmp_path, tiny_checkpoint):
    pictures = camvid_pictures(tmp_path / "images", 3)
    out, annotations = tmp_path / "out", tmp_path / "annotations.json"
    segment(*pictures[:2], "-o", out, "--coco", annotations, checkpoint=tiny_checkpoint)
    assert len(json.loads(annotations.read_text())["images"]) == 2
    segment(*pictures, "-o", out, "--coco", annotations, "--summary", tmp_path / "summary.json",
                     checkpoint=tiny_checkpoint)
    assert json.loads((tmp_path / "summary.json").read_text())["skipped"] == 2
    dataset = json.loads(annotations.read_text())
    assert sorted(entry["file_name"] for entry in dataset["images"]) == sorted(path.name for path in pictures)
    assert len({entry["id"] for entry in dataset["images"]}) == 3
    assert len({annotation["id"] for annotation in dataset["annotations"]}) == len(dataset["annotations"])
    assert not list(tmp_path.glob(".annotations.json.*")), "written atomically: no temporary file remains"
    exported = CliRunner().invoke(main, ["export", str(out), "--coco", str(tmp_path / "again.json")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "again.json").read_text() == annotations.read_text(), "export writes what segment wrote"
    assert "3 images, 4 categories" in exported.output


def rasterised(lines: list[str], shape: tuple[int, int], classes: int) -> np.ndarray:
    """The YOLO lines drawn back: per class, the union of its filled polygons (classes x H x W)."""
    height, width = shape
    drawn = np.zeros((classes, height, width), dtype=np.uint8)
    for line in lines:
        values = line.split()
        points = np.array(values[1:], dtype=np.float64).reshape(-1, 2) * (width, height)
        cv2.fillPoly(drawn[int(values[0])], [np.round(points).astype(np.int32)], 1)
    return drawn


def polygon_ious(min_region: float) -> tuple[np.ndarray, float]:
    """Per CamVid class present in the ground truth of the first 10 test images (11 classes, 360 x 480), the IoU
    of its YOLO polygons drawn back with its pixels, over all images; and the IoU over all classes' pixels."""
    names = [f"class{index}" for index in range(11)]
    hits, unions = np.zeros(11), np.zeros(11)
    for path in sorted((shared_dataset("camvid") / "masks").iterdir())[:10]:
        truth = np.array(Image.open(path))
        mask = np.where(truth < 11, truth + 1, 0)  # class i is label i + 1; void is background
        lines = yolo_lines(mask, ["background", *names], {name: index for index, name in enumerate(names)},
                           min_region)
        drawn = rasterised(lines, mask.shape, 11)
        for index in range(11):
            region = mask == index + 1
            hits[index] += np.sum(region & (drawn[index] == 1))
            unions[index] += np.sum(region | (drawn[index] == 1))
    present = unions > 0
    return hits[present] / unions[present], hits.sum() / unions.sum()


def test_yolo_polygons_drawn_back_cover_real_camvid_masks():
    """Measured: 0.993 over all pixels; per class 0.966 to 1.000 but poles 0.866, whose thin masks break into
    specks under the default 0.01% of the image that are skipped (0.958 when none is; the rest of the loss is
    filled holes, which the format cannot hold, and one-pixel-wide parts)."""
    per_class, overall = polygon_ious(1e-4)
    assert overall >= 0.99 and np.sort(per_class)[1] >= 0.96 and per_class.min() >= 0.86, per_class
    per_class_with_specks, overall_with_specks = polygon_ious(0.0)
    assert per_class_with_specks.min() >= 0.95 and overall_with_specks > overall


def test_a_region_is_one_polygon_and_specks_are_skipped():
    region = np.zeros((20, 30), dtype=bool)
    region[2:8, 3:12] = True  # 54 pixels
    region[12:18, 15:25] = True  # 60 pixels
    region[5:7, 27:29] = True  # a speck of 4 pixels
    region[0, 20] = True  # one pixel: no polygon has fewer than 3 corners
    polygons = region_polygons(region, min_pixels=5)
    assert len(polygons) == 2
    assert sorted(map(tuple, polygons[0])) == [(3, 2), (3, 7), (11, 2), (11, 7)], "a rectangle's 4 corners"
    assert len(region_polygons(region, min_pixels=1)) == 3


def test_segment_writes_a_yolo_data_set_that_names_the_classes(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pictures = camvid_pictures(Path("images"), 2)
    segment("images", "-o", "out", "--yolo", "yolo", "--yolo-min-region", 0.001, checkpoint=tiny_checkpoint)
    data = (tmp_path / "yolo" / "data.yaml").read_text().splitlines()
    assert data[1:] == [f'path: "{tmp_path / "yolo"}"', "train: images", "val: images", "names:",
                        *(f'  {index}: "{name}"' for index, name in enumerate(LABELS))]
    for picture in pictures:
        mask = np.array(Image.open(Path("out") / f"{picture.stem}.png"))
        lines = (tmp_path / "yolo" / "labels" / f"{picture.stem}.txt").read_text().splitlines()
        assert lines == yolo_lines(mask, ["background", *LABELS], {name: index for index, name in
                                                                   enumerate(LABELS)}, 0.001)
        assert (tmp_path / "yolo" / "images" / picture.name).resolve() == picture.resolve()


@pytest.mark.parametrize("arguments, message", [
    (["export", "missing"], "give --coco FILE.json, --yolo DIR or both"),
    (["export", "missing", "--coco", "a.json"], "missing is not a folder: give the --out folder of wildseg segment"),
    (["export", ".", "--yolo-min-region", "0.1", "--coco", "a.json"],
     "--yolo-min-region is an option of --yolo: add --yolo DIR or leave it out"),
    (["export", ".", "--coco", "a.json"], ". holds no image wildseg segment finished (NAME.json records with their "
                                          "NAME.png masks): give the --out folder of a run"),
])
def test_export_usage_errors_are_one_line(arguments, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and result.output == f"wildseg: error: {message}\n"
