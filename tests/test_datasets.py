"""Data set readers: the real CamVid, NYUv2 and VOC files, and synthetic trees in each benchmark's layout."""

import functools
import hashlib
import http.server
import json
import tarfile
import threading

import numpy as np
import pytest
import torchvision.datasets.voc
from coarse_maps import coarse_probabilities
from conftest import as_command_line_says, raises_worded, shared_dataset
from PIL import Image

from wildseg.datasets import folder_dataset, open_dataset
from wildseg.datasets.classes import parse_class_names


def save_image(path, height=6, width=8, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def save_labels(path, values, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(values, dtype=np.uint8), mode="P" if palette else "L")
    if palette:
        image.putpalette([0, 0, 0] * 256)
    image.save(path)


def voc_tree(parent, ids_and_labels):
    root = parent / "VOCdevkit" / "VOC2012"
    for image_id, labels in ids_and_labels.items():
        save_image(root / "JPEGImages" / f"{image_id}.jpg", *np.shape(labels))
        save_labels(root / "SegmentationClass" / f"{image_id}.png", labels, palette=True)
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("".join(f"{image_id}\n" for image_id in ids_and_labels))
    return root


def test_camvid_reads_as_a_folder_dataset():
    dataset = folder_dataset(shared_dataset("camvid"), ignore_index=11)
    assert len(dataset) == 233 and len(dataset.classes) == 11
    assert dataset.classes[0].name == "sky" and dataset.classes[6].prompts == ("sign symbol",)
    assert dataset.background_class is None and dataset.scored_classes == list(range(11))
    sample = dataset[0]
    assert sample.image.shape == (360, 480, 3) and sample.image.dtype == np.uint8
    assert sample.truth.shape == (360, 480) and sample.truth.max() <= 11


def test_nyuv2_reads_as_a_folder_dataset_whose_class_0_is_ignored():
    dataset = folder_dataset(shared_dataset("nyuv2"), ignore_index=0)
    assert len(dataset) == 654 and len(dataset.classes) == 41 and dataset.classes[0].name == "unlabeled"
    assert dataset.scored_classes == list(range(1, 41))
    sample = dataset[0]
    assert sample.image.shape == (480, 640, 3) and sample.truth.shape == (480, 640)
    assert 0 in np.unique(sample.truth) and sample.truth.max() <= 40


def test_voc_reads_the_real_palette_masks_with_their_255_borders(tmp_path):
    (tmp_path / "VOCdevkit").mkdir()
    (tmp_path / "VOCdevkit" / "VOC2012").symlink_to(shared_dataset("voc2012"))
    raw = np.array(Image.open(shared_dataset("voc2012") / "SegmentationClass" / "2007_000123.png"))
    assert Image.open(shared_dataset("voc2012") / "SegmentationClass" / "2007_000123.png").mode == "P"

    voc21 = open_dataset("voc", tmp_path / "VOCdevkit" / "VOC2012")
    assert voc21.ids == ["2007_000123"] and voc21.background_class == 0 and len(voc21.classes) == 21
    sample = voc21[0]
    assert sample.image.shape == (375, 500, 3)
    assert np.array_equal(sample.truth, raw) and set(np.unique(raw)) == {0, 19, 255}

    voc20 = open_dataset("voc20", tmp_path)
    assert voc20.background_class is None and voc20.classes[18].name == "train"
    expected = np.where((raw >= 1) & (raw <= 20), raw - 1, 255)
    assert np.array_equal(voc20[0].truth, expected)


def test_voc_needs_its_own_layout(tmp_path):
    with raises_worded("not a PASCAL VOC 2012 folder"):
        open_dataset("voc", tmp_path)
    with raises_worded("--ignore-index is for folder datasets"):
        open_dataset("voc", tmp_path, ignore_index=3)
    with raises_worded("--download fetches PASCAL VOC only"):
        open_dataset("ade20k", tmp_path, download=tmp_path)
    with raises_worded("has no splits"):
        open_dataset("folder", tmp_path, split="train")


@pytest.fixture
def voc_archive_server(tmp_path, monkeypatch):
    """A local HTTP server offering a small VOC2012 tar, patched in as torchvision's download URL."""
    served = tmp_path / "served"
    voc_tree(served / "tree", {"2008_000001": np.array([[0, 1], [255, 15]])})
    with tarfile.open(served / "voc.tar", "w") as archive:
        archive.add(served / "tree" / "VOCdevkit", arcname="VOCdevkit")
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    entry = dict(torchvision.datasets.voc.DATASET_YEAR_DICT["2012"])
    entry["url"] = f"http://127.0.0.1:{server.server_port}/voc.tar"
    entry["md5"] = hashlib.md5((served / "voc.tar").read_bytes()).hexdigest()
    monkeypatch.setitem(torchvision.datasets.voc.DATASET_YEAR_DICT, "2012", entry)
    yield entry
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_voc_download_verifies_the_checksum_and_unpacks(voc_archive_server, tmp_path):
    dataset = open_dataset("voc", None, download=tmp_path / "data")
    assert dataset.ids == ["2008_000001"] and dataset[0].truth.tolist() == [[0, 1], [255, 15]]
    assert (tmp_path / "data" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2008_000001.jpg").is_file()


def test_voc_download_with_a_wrong_checksum_or_no_network_fails_in_one_line(voc_archive_server, tmp_path):
    voc_archive_server["md5"] = "0" * 32
    with raises_worded("could not download and verify VOC2012 .*corrupted") as error:
        open_dataset("voc", None, download=tmp_path / "bad")
    assert "\n" not in as_command_line_says(error.value)
    assert not any((tmp_path / "bad").iterdir()), "an archive that fails its checksum is not kept"
    voc_archive_server["url"] = "http://127.0.0.1:9/voc.tar"
    with raises_worded("could not download .*Connection refused"):
        open_dataset("voc20", None, download=tmp_path / "offline")


def test_context_maps_background_to_class_0_or_to_ignore(tmp_path):
    root = tmp_path / "VOC2010"
    save_image(root / "JPEGImages" / "2008_000002.jpg", 2, 3)
    save_labels(root / "SegmentationClassContext" / "2008_000002.png", [[0, 1, 59], [30, 0, 2]])
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    assert open_dataset("context", root)[0].truth.tolist() == [[0, 1, 59], [30, 0, 2]]
    assert open_dataset("context59", root)[0].truth.tolist() == [[255, 0, 58], [29, 255, 1]]
    assert open_dataset("context", root).classes[59].name == "wood"


def test_ade20k_shifts_classes_down_and_ignores_other(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    save_image(root / "images" / "validation" / "ADE_val_00000001.jpg", 1, 4)
    save_labels(root / "annotations" / "validation" / "ADE_val_00000001.png", [[0, 1, 150, 151]])
    dataset = open_dataset("ade20k", root)
    assert dataset.ids == ["ADE_val_00000001"] and dataset[0].truth.tolist() == [[255, 0, 149, 255]]


def test_coco_stuff_maps_the_171_used_ids_to_contiguous_classes(tmp_path):
    save_image(tmp_path / "images" / "val2017" / "000000000139.jpg", 1, 6)
    # stored values are category id - 1: person (id 1), id 12 (unused), stop sign (id 13), banner (92), wood (182)
    save_labels(tmp_path / "annotations" / "val2017" / "000000000139.png", [[0, 11, 12, 91, 181, 255]])
    dataset = open_dataset("coco-stuff", tmp_path)
    assert dataset[0].truth.tolist() == [[0, 255, 11, 80, 170, 255]]
    assert dataset.classes[11].name == "stop sign" and dataset.classes[80].name == "banner"


def test_cityscapes_maps_label_ids_to_the_19_train_ids(tmp_path):
    save_image(tmp_path / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png", 1, 5)
    # label ids: 7 road -> 0, 26 car -> 13, 33 bicycle -> 18, 0 unlabeled and 4 static -> ignored
    save_labels(tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png",
                [[7, 26, 33, 0, 4]])
    dataset = open_dataset("cityscapes", tmp_path)
    assert dataset.ids == ["lindau_000000_000019"] and dataset[0].truth.tolist() == [[0, 13, 18, 255, 255]]


def test_coco_object_paints_instances_smallest_on_top_over_background(tmp_path):
    save_image(tmp_path / "val2017" / "000000000042.jpg", 10, 10)
    square = lambda x0, y0, x1, y1: [[x0, y0, x1, y0, x1, y1, x0, y1]]  # noqa: E731
    categories = [{"id": category, "name": f"c{category}"} for category in range(1, 91)
                  if category not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    annotations = {
        "images": [{"id": 42, "file_name": "000000000042.jpg", "height": 10, "width": 10}],
        "categories": categories,
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 3, "segmentation": square(1, 1, 5, 5), "area": 16, "iscrowd": 0},
            {"id": 2, "image_id": 42, "category_id": 1, "segmentation": square(3, 3, 5, 5), "area": 4, "iscrowd": 0},
            {"id": 3, "image_id": 42, "category_id": 90, "segmentation": square(7, 0, 10, 2), "area": 6, "iscrowd": 1},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(annotations))
    dataset = open_dataset("coco-object", tmp_path)
    assert dataset.ids == ["000000000042"] and dataset.classes[3].name == "car"
    truth = dataset[0].truth
    from pycocotools import mask as coco_mask

    def area(polygon):
        return coco_mask.decode(coco_mask.frPyObjects(polygon, 10, 10)).max(axis=2).astype(bool)

    expected = np.zeros((10, 10), dtype=np.uint8)
    expected[area(square(1, 1, 5, 5))] = 3  # car: category 3 is the third thing
    expected[area(square(3, 3, 5, 5))] = 1  # person, smaller, on top of the car
    expected[area(square(7, 0, 10, 2))] = 80  # toothbrush (category 90), a crowd region
    assert np.array_equal(truth, expected) and {0, 1, 3, 80} == set(np.unique(truth).tolist())


def test_a_class_names_file_must_match_the_class_count(tmp_path):
    (tmp_path / "names.txt").write_text("road, street\nsidewalk\n")
    dataset = folder_dataset(shared_dataset("camvid"), ignore_index=11)
    with raises_worded("list 2 classes but camvid has 11"):
        dataset.with_classes(parse_class_names((tmp_path / "names.txt").read_text().splitlines(), "names"))
    names = parse_class_names([f"class {index}" for index in range(11)], "names")
    renamed = dataset.with_classes(names)
    assert renamed.classes == names and dataset.classes[0].name == "sky", "the data set itself keeps its classes"
    assert renamed.load(renamed.ids[0]).truth.shape == (360, 480)


def test_a_folder_without_the_layout_is_a_clear_error(tmp_path):
    with raises_worded("has no images"):
        folder_dataset(tmp_path)
    with raises_worded("is not a folder"):
        open_dataset("folder", tmp_path / "missing")


def test_an_rgb_label_image_is_refused(tmp_path):
    save_image(tmp_path / "images" / "a.png", 4, 4)
    save_image(tmp_path / "masks" / "a.png", 4, 4)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with raises_worded("labels must be single-channel or palette"):
        folder_dataset(tmp_path)[0]


def test_coarse_maps_never_predict_an_ignore_class_inside_the_class_range():
    truth = np.zeros((56, 56), dtype=np.uint8)
    truth[:, 28:] = 2
    probabilities = coarse_probabilities(truth, classes=3, ignore_index=0, noise_std=0.3)
    assert np.all(probabilities[0] == 0) and np.allclose(probabilities.sum(0), 1.0, atol=1e-5)
    assert set(np.unique(probabilities.argmax(0))) <= {1, 2}
