"""`wildseg eval`: protocols, synonym scoring, accumulation, saved predictions, reports, end to end."""

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_MODEL, raises_worded, shared_dataset, tiny_cli_args, tiny_segmenter
from PIL import Image
from test_datasets import save_image, voc_tree

from wildseg.cli import main
from wildseg.datasets import folder_dataset, open_dataset
from wildseg.datasets.base import PairedFiles
from wildseg.datasets.classes import parse_class_names
from wildseg.evaluation import (
    PredictionStore,
    Query,
    build_query,
    candidate_classes,
    check_dataset,
    class_prediction,
    dense_class_prediction,
    dense_protocol,
    evaluate,
    load_ids,
    padding_deviations,
)
from wildseg.evaluation.report import scored_confusion, summary_metrics
from wildseg.metrics import confusion_matrix


def small_dataset(tmp_path, lines, truths, ignore_index=255):
    """A PairedFiles data set of random images with the given ground truths."""
    images, masks = {}, {}
    (tmp_path / "masks").mkdir(exist_ok=True)
    for index, truth in enumerate(truths):
        image_id = f"im{index}"
        images[image_id] = tmp_path / "images" / f"{image_id}.png"
        masks[image_id] = tmp_path / "masks" / f"{image_id}.png"
        save_image(images[image_id], *np.shape(truth), seed=index)
        Image.fromarray(np.asarray(truth, dtype=np.uint8)).save(masks[image_id])
    return PairedFiles("small", parse_class_names(lines, "test"), images, masks, ignore_index)


class OracleSegmenter:
    """Answers each image with its ground truth: probability 1 on the first prompt of the true class.

    It records the labels it is asked for, and shifts its answer by `error_shift` columns to make mistakes.
    """

    config = SimpleNamespace(method="relevance", background_threshold=0.4)

    def __init__(self, dataset, error_shift=0):
        self.dataset, self.error_shift, self.calls = dataset, error_shift, []
        self.truth_of = {sample.image.tobytes(): sample.truth for sample in dataset}

    def segment(self, image, labels):
        self.calls.append(list(labels))
        truth = np.roll(self.truth_of[image.tobytes()], self.error_shift, axis=1)
        scores = np.zeros((1 + len(labels), *truth.shape), dtype=np.float32)
        scores[0] = 0.5 if self.dataset.background_class is not None else 0.0
        for index, name in enumerate(self.dataset.classes):
            if name.prompts and name.prompts[0] in labels:
                row = 1 + labels.index(name.prompts[0])
                scores[row][truth == index] = 1.0
        return SimpleNamespace(scores=scores, timings={"maps_s": 0.0})

    def segment_many(self, images, labels, decode_workers, read):
        for key in images:
            yield SimpleNamespace(source=key, result=self.segment(read(key), labels(key)), error=None)

    def settings(self):
        return {"oracle": self.error_shift}


def test_queries_flatten_synonyms_and_give_background_row_0_and_its_stuff_words(tmp_path):
    dataset = small_dataset(tmp_path, ["background, sky, wall", "cat, kitty", "dog"], [[[0, 1]]])
    open_query = build_query(dataset, [1, 2], "open")
    assert open_query.labels == ["cat", "kitty", "dog", "sky", "wall"]
    assert open_query.classes == [1, 2, 0] and open_query.rows == [[1, 2], [3], [0, 4, 5]]
    given_query = build_query(dataset, [1], "given")
    assert given_query.labels == ["cat", "kitty"] and given_query.rows == [[1, 2], [0]]


def test_a_class_scores_the_max_over_its_synonyms(tmp_path):
    dataset = small_dataset(tmp_path, ["background, sky", "cat, kitty", "dog"], [[[0, 1]]])
    query = build_query(dataset, [1, 2], "open")  # rows: cat 1,2; dog 3; background 0,4
    scores = np.array([
        [[0.30, 0.10, 0.10, 0.10]],  # threshold background
        [[0.20, 0.40, 0.10, 0.00]],  # cat
        [[0.10, 0.10, 0.50, 0.00]],  # kitty
        [[0.25, 0.45, 0.20, 0.20]],  # dog
        [[0.15, 0.05, 0.10, 0.70]],  # sky
    ])
    assert class_prediction(scores, query, (1, 4)).tolist() == [[0, 2, 1, 0]]
    # x2 bilinear (half-pixel centres) of the class scores cat, dog, background, e.g. at x = 1 (source 0.25):
    # cat 0.25, dog 0.30, background 0.25 -> dog; at x = 5 (source 2.25): cat 0.375, dog 0.2, background 0.25
    assert class_prediction(scores, query, (2, 8)).tolist() == [[0, 2, 2, 1, 1, 1, 0, 0]] * 2


def test_given_labels_asks_for_exactly_each_images_ground_truth_classes(tmp_path):
    truths = [[[0, 1, 1], [2, 255, 0]], [[0, 0, 0], [0, 0, 255]], [[3, 3, 1], [1, 0, 0]]]
    dataset = small_dataset(tmp_path, ["background, sky", "cat, kitty", "dog", "bird"], truths)
    oracle = OracleSegmenter(dataset)
    evaluation = evaluate(oracle, dataset, dataset.ids, "given")
    assert oracle.calls == [["cat", "kitty", "dog"], ["cat", "kitty", "bird"]], "image 1 has only background"
    assert evaluation.evaluated == 3 and np.trace(evaluation.confusion.numpy()) == evaluation.confusion.sum() == 16

    oracle.calls.clear()
    evaluate(oracle, dataset, dataset.ids, "open")
    assert oracle.calls == [["cat", "kitty", "dog", "bird", "sky"]] * 3


def test_given_labels_on_the_real_voc_image_asks_for_train(tmp_path):
    (tmp_path / "VOCdevkit").mkdir()
    (tmp_path / "VOCdevkit" / "VOC2012").symlink_to(shared_dataset("voc2012"))
    dataset = open_dataset("voc", tmp_path)
    oracle = OracleSegmenter(dataset)
    evaluation = evaluate(oracle, dataset, dataset.ids, "given")
    assert oracle.calls == [["train"]]
    assert evaluation.confusion[0, 0] == 109174 and evaluation.confusion[19, 19] == 73727
    assert evaluation.confusion.sum() == 109174 + 73727, "the 255 borders are not counted"


def test_metrics_over_camvid_match_an_independent_count(tmp_path):
    """An oracle shifted by 7 columns makes mistakes at class borders; IoU is recounted pixel by pixel.

    Where the shifted answer is void the oracle scores no class, and the tie goes to the first class, sky.
    """
    dataset = folder_dataset(shared_dataset("camvid"), ignore_index=11)
    ids = dataset.ids[:3]
    dataset.ids = ids
    oracle = OracleSegmenter(dataset, error_shift=7)
    evaluation = evaluate(oracle, dataset, ids, "open")
    intersections, unions = np.zeros(11), np.zeros(11)
    for sample in dataset:
        predicted, valid = np.roll(sample.truth, 7, axis=1), sample.truth != 11
        predicted[predicted == 11] = 0
        for index in range(11):
            intersections[index] += np.sum((predicted == index) & (sample.truth == index) & valid)
            unions[index] += np.sum(((predicted == index) | (sample.truth == index)) & valid)
    rows = evaluate_rows(dataset, evaluation)
    present = unions > 0
    assert np.allclose([rows[index]["iou"] for index in np.flatnonzero(present)],
                       (intersections / np.maximum(unions, 1))[present])
    assert 0.5 < np.mean((intersections / np.maximum(unions, 1))[present]) < 1.0


def evaluate_rows(dataset, evaluation):
    from wildseg.evaluation.report import per_class_rows

    return {row["class"]: row for row in per_class_rows(dataset, evaluation.confusion)}


def test_saved_predictions_are_reused_and_other_settings_are_refused(tmp_path):
    truths = [[[0, 1], [1, 1]], [[2, 2], [0, 255]]]
    dataset = small_dataset(tmp_path, ["background", "cat", "dog"], truths)
    folder = tmp_path / "predictions"
    oracle = OracleSegmenter(dataset)
    first = evaluate(oracle, dataset, dataset.ids, "given", PredictionStore(folder, {"a": 1}, 3))
    assert first.reused == 0 and len(oracle.calls) == 2
    assert np.array(Image.open(folder / "im0.png")).tolist() == [[0, 1], [1, 1]]

    (folder / "im1.png").write_bytes(b"not a png")
    again = evaluate(oracle, dataset, dataset.ids, "given", PredictionStore(folder, {"a": 1}, 3))
    assert again.reused == 1 and len(oracle.calls) == 3, "the unreadable prediction is made again"
    assert np.array_equal(again.confusion, first.confusion)

    Image.fromarray(np.array([[0, 1], [3, 1]], dtype=np.uint8)).save(folder / "im0.png")
    third = evaluate(oracle, dataset, dataset.ids, "given", PredictionStore(folder, {"a": 1}, 3))
    assert third.reused == 1 and len(oracle.calls) == 4, "a prediction with a value that is no class is made again"
    assert np.array_equal(third.confusion, first.confusion)

    with raises_worded(r"other settings \(a, b differ\)"):
        PredictionStore(folder, {"a": 2, "b": 0}, 3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    Image.new("L", (2, 2)).save(foreign / "photo.png")
    with raises_worded("did not write"):
        PredictionStore(foreign, {"a": 1}, 3)


def test_an_unreadable_image_is_reported_and_the_rest_evaluated(tmp_path):
    dataset = small_dataset(tmp_path, ["background", "cat"], [[[0, 1]], [[1, 1]]])
    oracle = OracleSegmenter(dataset)
    (tmp_path / "images" / "im0.png").write_bytes(b"\x89PNG broken")
    evaluation = evaluate(oracle, dataset, dataset.ids, "open")
    assert evaluation.evaluated == 1 and evaluation.failed[0]["id"] == "im0"
    assert "\n" not in evaluation.failed[0]["reason"] and evaluation.confusion[1, 1] == 2


@pytest.fixture
def synthetic_voc(tmp_path):
    """Three VOC images: cat (8) on background, dog (12) beside a person (15), each with 255 borders."""
    first = np.zeros((40, 56), dtype=np.uint8)
    first[8:30, 10:40], first[7, 10:40] = 8, 255
    second = np.zeros((48, 40), dtype=np.uint8)
    second[:, :20], second[10:40, 24:36], second[:, 20] = 12, 15, 255
    third = np.full((32, 32), 15, dtype=np.uint8)
    third[:4] = 0
    return voc_tree(tmp_path / "voc", {"2009_000001": first, "2009_000002": second, "2009_000003": third})


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def tiny_args(checkpoint):
    return [*tiny_cli_args(checkpoint), "--tta", "none", "--crf-iters", 1, "--max-side", 40]


def test_eval_on_a_voc_tree_reports_reuses_and_refuses_mixed_settings(synthetic_voc, tmp_path, tiny_checkpoint):
    report, predictions = tmp_path / "report.json", tmp_path / "predictions"
    result = run("eval", "--dataset", "voc", "--root", synthetic_voc, "--report", report,
                 "--save-predictions", predictions, *tiny_args(tiny_checkpoint))
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.stdout and "dining table" in result.stdout
    record = json.loads(report.read_text())
    assert record["dataset"] == "voc21" and record["split"] == "val" and record["protocol"] == "open"
    assert record["segmenter"]["model"] == TINY_MODEL and record["segmenter"]["bg_threshold"] == 0.4
    assert record["images"] == {"evaluated": 3, "reused": 0, "failed": 0, "failures": []}
    assert record["classes"][0][:3] == ["background", "sky", "wall"] and len(record["per_class"]) == 21
    timings = record["timings_s"]
    assert {"total_s", "maps_s", "crf_s", "read_s", "text_s", "decode_s"} <= set(timings)
    assert "pamr_s" not in timings, "PAMR did not run (--refine crf)"
    assert timings["model_load_s"] > 0 and timings["label_embeddings_s"] > 0
    assert timings["maps_s"] < timings["predict_s"] < timings["total_s"]
    assert timings["per_segmented_image_s"] == pytest.approx(timings["predict_s"] / 3)

    confusion = np.zeros((21, 21), dtype=np.int64)
    for image_id in ("2009_000001", "2009_000002", "2009_000003"):
        truth = np.array(Image.open(synthetic_voc / "SegmentationClass" / f"{image_id}.png"))
        predicted = np.array(Image.open(predictions / f"{image_id}.png"))
        assert predicted.shape == truth.shape and predicted.max() <= 20
        valid = truth != 255
        np.add.at(confusion, (truth[valid], predicted[valid]), 1)
    assert record["confusion"] == confusion.tolist()
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    assert record["metrics"]["miou"] == pytest.approx(np.mean(np.diag(confusion)[union > 0] / union[union > 0]))
    assert record["metrics"]["pixel_accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert (f"mIoU {100 * record['metrics']['miou']:.1f}%, pixel accuracy "
            f"{100 * record['metrics']['pixel_accuracy']:.1f}%") in result.stdout, "the report holds fractions"

    again = run("eval", "--dataset", "voc", "--root", synthetic_voc, "--report", report, "--save-predictions",
                predictions, *tiny_args(tiny_checkpoint))
    assert again.exit_code == 0 and json.loads(report.read_text())["images"]["reused"] == 3
    assert json.loads(report.read_text())["confusion"] == record["confusion"]

    mixed = run("eval", "--dataset", "voc", "--root", synthetic_voc, "--save-predictions", predictions,
                "--given-labels", *tiny_args(tiny_checkpoint))
    assert mixed.exit_code == 2 and mixed.stderr.count("\n") == 1 and "protocol differ" in mixed.stderr
    for other in (["--tta", "default"], ["--max-side", 48], ["--templates", "imagenet80"]):
        refused = run("eval", "--dataset", "voc", "--root", synthetic_voc, "--save-predictions", predictions,
                      *tiny_args(tiny_checkpoint), *other)
        assert refused.exit_code == 2 and "(segmenter differ)" in refused.stderr, other


def test_eval_subsets_with_ids_and_limit_and_counts_failures(synthetic_voc, tmp_path, tiny_checkpoint):
    ids = tmp_path / "ids.txt"
    ids.write_text("2009_000003\n2009_000001\n2009_000002\n")
    (synthetic_voc / "JPEGImages" / "2009_000001.jpg").write_bytes(b"\xff\xd8\xff truncated")
    report = tmp_path / "report.json"
    result = run("eval", "-d", "voc20", "--root", synthetic_voc, "--ids", ids, "--limit", 2, "--report", report,
                 "--given-labels", *tiny_args(tiny_checkpoint))
    assert result.exit_code == 1, "an image failed"
    assert "wildseg: failed: 2009_000001:" in result.stderr
    record = json.loads(report.read_text())
    assert record["selection"]["images"] == 2 and record["images"]["evaluated"] == 1
    assert record["images"]["failures"][0]["id"] == "2009_000001"
    assert len(record["per_class"]) == 20 and record["segmenter"]["bg_threshold"] == 0.0
    assert sum(row["truth_pixels"] for row in record["per_class"]) == 28 * 32, "VOC20 ignores background"

    ids.write_text("2009_000003\nnot_an_id\n")
    unknown = run("eval", "-d", "voc20", "--root", synthetic_voc, "--ids", ids, *tiny_args(tiny_checkpoint))
    assert unknown.exit_code == 2 and "1 id(s) in" in unknown.stderr and "not_an_id" in unknown.stderr


def test_eval_runs_on_the_real_camvid_folder(tmp_path, tiny_checkpoint):
    report, predictions = tmp_path / "camvid.json", tmp_path / "predictions"
    result = run("eval", "--dataset", "folder", "--root", shared_dataset("camvid"), "--ignore-index", 11,
                 "--limit", 2, "--report", report, "--save-predictions", predictions, "-q",
                 *tiny_args(tiny_checkpoint))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    record = json.loads(report.read_text())
    assert record["dataset"] == "camvid" and record["split"] is None and record["ignore_index"] == 11
    assert [row["name"] for row in record["per_class"]][:3] == ["sky", "building", "pole"]
    assert record["images"]["evaluated"] == 2
    ids = sorted(path.stem for path in (shared_dataset("camvid") / "masks").iterdir())[:2]
    truth = [np.array(Image.open(shared_dataset("camvid") / "masks" / f"{image_id}.png")) for image_id in ids]
    predicted = [np.array(Image.open(predictions / f"{image_id}.png")) for image_id in ids]
    assert sum(row["truth_pixels"] for row in record["per_class"]) == sum(int(np.sum(mask != 11)) for mask in truth)
    ious = []
    for index in range(11):
        hits = [((answer == index) & (mask == index)).sum() for answer, mask in zip(predicted, truth)]
        union = [(((answer == index) | (mask == index)) & (mask != 11)).sum() for answer, mask in zip(predicted, truth)]
        if sum(union):
            ious.append(sum(hits) / sum(union))
    assert record["metrics"]["miou"] == pytest.approx(np.mean(ious))


def test_eval_usage_errors_are_one_line(tmp_path, tiny_checkpoint):
    for args, message in [
        (["-d", "voc"], "--dataset voc needs --root: the VOCdevkit/VOC2012 folder"),
        (["-d", "folder", "--limit", "5"], "--dataset folder needs --root: a folder holding images/, masks/ and "
                                          "classes.txt"),
        (["-d", "ade20k", "--root", tmp_path], "ADE20K: folder"),
        (["-d", "folder", "--root", tmp_path, "--split", "val"], "has no splits"),
        (["-d", "nope"], "Invalid value for '--dataset'"),
    ]:
        result = run("eval", *args, *tiny_args(tiny_checkpoint))
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_background_class_at_the_ignore_index_is_neither_predicted_nor_averaged(tmp_path):
    dataset = small_dataset(tmp_path, ["background", "cat", "dog"], [[[0, 1, 2, 2]]], ignore_index=0)
    assert dataset.background_class is None and dataset.scored_classes == [1, 2]
    oracle = OracleSegmenter(dataset, error_shift=1)  # predicts [dog, ?, cat, dog]; ? = tie -> first class, cat
    evaluation = evaluate(oracle, dataset, dataset.ids, "open")
    metrics = summary_metrics(scored_confusion(dataset, evaluation.confusion))
    # truth cat, dog, dog against cat, cat, dog: cat IoU 1/2, dog IoU 1/2
    assert metrics["miou"] == pytest.approx(0.5) and metrics["pixel_accuracy"] == pytest.approx(2 / 3)


def test_an_image_without_a_scored_class_is_counted_with_any_ignore_index(tmp_path):
    dataset = small_dataset(tmp_path, ["cat", "dog"], [[[5, 5]], [[0, 1]]], ignore_index=300)
    oracle = OracleSegmenter(dataset)
    evaluation = evaluate(oracle, dataset, dataset.ids, "given")
    assert evaluation.failed == [] and evaluation.evaluated == 2 and oracle.calls == [["cat", "dog"]]
    assert evaluation.confusion.tolist() == [[1, 0], [0, 1]]


def test_what_no_image_could_pass_is_refused_up_front(tmp_path):
    many = small_dataset(tmp_path, [f"class {index}, synonym {index}" for index in range(130)], [[[0]]])
    with raises_worded("260 class names and synonyms"):
        check_dataset(many, "open")
    check_dataset(many, "given")
    store = tmp_path / "store"
    store.mkdir()
    (store / "settings.json").write_text("{broken")
    with raises_worded("cannot read .*settings.json"):
        PredictionStore(store, {"a": 1}, 3)
    (tmp_path / "empty.txt").write_text("\n")
    with raises_worded("lists no image id"):
        load_ids(tmp_path / "empty.txt", many)


def test_saved_predictions_of_another_ignore_index_are_not_reused(tmp_path, tiny_checkpoint):
    root = tmp_path / "data"
    truths = [[[0, 1], [2, 2]], [[1, 1], [2, 0]]]
    for index, truth in enumerate(truths):
        save_image(root / "images" / f"im{index}.png", 2, 2, seed=index)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.asarray(truth, dtype=np.uint8)).save(root / "masks" / f"im{index}.png")
    (root / "classes.txt").write_text("unlabeled\ncat\ndog\n")
    args = ["eval", "-d", "folder", "--root", root, "--save-predictions", tmp_path / "p", *tiny_args(tiny_checkpoint)]
    assert run(*args, "--ignore-index", 0).exit_code == 0
    other = run(*args)
    assert other.exit_code == 2 and "ignore_index" in other.stderr


def test_dense_eval_follows_the_published_protocol_of_the_data_set_and_records_it(synthetic_voc, tmp_path,
                                                                                   tiny_checkpoint):
    report, predictions = tmp_path / "report.json", tmp_path / "predictions"
    arguments = ["eval", "--dataset", "voc", "--root", synthetic_voc, "--report", report, "--method", "dense",
                 "--window", 32, "--short-side", 64, "--save-predictions", predictions, "--max-side", 40,
                 *tiny_cli_args(tiny_checkpoint)]
    result = run(*arguments)
    assert result.exit_code == 0, result.output
    resumed = run(*arguments)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(report.read_text())["images"]["reused"] == 3
    record = json.loads(report.read_text())
    segmenter, published = record["segmenter"], record["dense_protocol"]
    assert published["follows"] == "naclip" and published["config"] == "configs/cfg_voc21.py"
    assert published["options"]["window"] == 0 and published["options"]["short_side"] == 336
    assert published["options"]["bg_threshold"] == 0.1 and published["published_miou"] == 64.07
    assert published["deviations"] == ["window 32 instead of 0", "short_side 64 instead of 336",
                                       "max_side 40 instead of 2048", "templates photo instead of imagenet80"]
    assert "naclip: deviations from naclip's protocol: window 32 instead of 0; short_side 64" in result.stderr
    assert segmenter["bg_threshold"] == 0.1 and segmenter["tta"] == "none" and segmenter["refine"] == "pamr"
    assert segmenter["pamr"]["dilations"] == [8, 16] and segmenter["crf"] is None
    assert segmenter["dense"] == {"attention": "naclip", "window": 32, "stride": 16, "short_side": 64,
                                  "long_side": 2048, "logit_scale": 40.0, "background_words": [], "patch_size": 8,
                                  "normalization": {"source": "official", "mean": [122.771, 116.746, 104.094],
                                                    "std": [68.501, 66.632, 70.323]}}
    person = record["classes"][15]
    assert person[:3] == ["person", "person", "person in shirt"], "NACLIP's list, word for word"
    assert record["classes"][0][1:4] == ["sky", "wall", "tree"] and "sands" in record["classes"][0]


@pytest.mark.parametrize("attention, dataset, expected", [
    ("naclip", "voc", {"window": 0, "short_side": 336, "logit_scale": 40.0, "bg_threshold": 0.1, "refine": "pamr"}),
    ("naclip", "cityscapes", {"window": 224, "short_side": 560, "bg_threshold": 0.0}),
    ("sclip", "voc", {"window": 224, "logit_scale": 65.0, "bg_threshold": 0.1, "refine": "none"}),
    ("sclip", "coco-stuff", {"short_side": 448, "logit_scale": 40.0, "bg_threshold": 0.0}),
    ("clearclip", "voc", {"window": 448, "short_side": 448, "logit_scale": 50.0, "bg_threshold": 0.5}),
    ("clearclip", "cityscapes", {"window": 224, "stride": 224, "short_side": 448}),
])
def test_dense_protocols_are_the_official_configs(attention, dataset, expected):
    """Rows checked by hand against each repository's configs/cfg_*.py (see dense_protocols.json's sources)."""
    background = DATASET_BACKGROUND[dataset]
    published = dense_protocol(attention, dataset, SimpleNamespace(background_class=background))
    assert {key: published["options"][key] for key in expected} == expected
    assert published["follows"] == attention


DATASET_BACKGROUND = {"voc": 0, "cityscapes": None, "coco-stuff": None}


def test_a_dense_run_names_a_normalisation_other_than_the_official_codes(synthetic_voc, tmp_path, tiny_checkpoint):
    """mmseg's constants are CLIP's rounded to three decimals: by default (auto) a model with CLIP's own constants
    is normalised with the official ones and no deviation is listed; `--normalization model` is one."""
    arguments = ["eval", "--dataset", "voc", "--root", synthetic_voc, "--method", "dense", "--attention", "clearclip",
                 "--short-side", 64, "--window", 64, *tiny_cli_args(tiny_checkpoint)]
    official = run(*arguments, "--report", tmp_path / "official.json")
    assert official.exit_code == 0, official.output
    record = json.loads((tmp_path / "official.json").read_text())
    assert record["segmenter"]["dense"]["normalization"]["source"] == "official"
    assert record["dense_protocol"]["normalization"] == {"mean": [122.771, 116.746, 104.094],
                                                         "std": [68.501, 66.632, 70.323]}
    assert not any("normalised" in line for line in record["dense_protocol"]["deviations"])
    model = run(*arguments, "--normalization", "model", "--report", tmp_path / "model.json")
    assert model.exit_code == 0, model.output
    deviation = [line for line in json.loads((tmp_path / "model.json").read_text())["dense_protocol"]["deviations"]
                 if "normalised" in line]
    assert deviation == ["pixels normalised with the model's own constants, mean (122.7709, 116.746, 104.0937) and "
                         "std (68.50053, 66.63216, 70.32316), instead of the official code's, mean (122.771, 116.746, "
                         "104.094) and std (68.501, 66.632, 70.323)"]
    assert "clearclip: deviations from clearclip's protocol:" in model.stderr
    assert not any("zero-pads" in line for line in record["dense_protocol"]["deviations"]), "no window was cut short"
    panorama = voc_tree(tmp_path / "panorama", {"2009_000004": np.zeros((10, 400), dtype=np.uint8)})
    cut = run(*arguments[:4], panorama, *arguments[5:], "--report", tmp_path / "panorama.json")
    assert cut.exit_code == 0, cut.output
    assert [line for line in json.loads((tmp_path / "panorama.json").read_text())["dense_protocol"]["deviations"]
            if "zero-pads" in line] == [
        "clearclip zero-pads a window whose side the image edge cuts to no multiple of the 8-pixel patches (1 image "
        "of this run); wildseg drops the remainder, as NACLIP and SCLIP do"], "10 x 400 becomes 51 x 2048"
    assert "zero-pads a window" in cut.stderr


def test_clearclips_zero_padding_is_a_deviation_only_where_a_window_was_cut_short():
    """ClearCLIP (window 448, short side 448, long side 2048) pads a window whose side the image edge cuts to no
    multiple of 16; NACLIP and SCLIP do not pad. A 375 x 500 image becomes 448 x 597: every window is 448 x 448. A
    100 x 2000 panorama becomes 102 x 2048 (the long side caps the scale): its windows are 102 pixels high."""
    published = dense_protocol("clearclip", "voc", SimpleNamespace(background_class=0))
    settings = {"dense": {"window": 448, "short_side": 448, "long_side": 2048, "patch_size": 16}}
    assert padding_deviations(published, settings, Counter({(375, 500): 3, (500, 333): 1})) == []
    assert padding_deviations(published, settings, Counter({(375, 500): 4, (100, 2000): 50, (2000, 100): 2})) == [
        "clearclip zero-pads a window whose side the image edge cuts to no multiple of the 16-pixel patches (52 "
        "images of this run); wildseg drops the remainder, as NACLIP and SCLIP do"], "images counted, not sizes"
    sclip = dense_protocol("sclip", "voc", SimpleNamespace(background_class=0))
    assert padding_deviations(sclip, settings, Counter({(100, 2000): 1})) == []
    assert published["deviations"] == [], "nothing is listed before a run shows it"


def test_only_sclip_voc_has_an_area_threshold_and_others_follow_naclip(tmp_path):
    with_background = SimpleNamespace(background_class=0)
    assert dense_protocol("sclip", "voc", with_background)["area_threshold"] == 0.1
    assert dense_protocol("naclip", "voc", with_background)["area_threshold"] is None
    maskclip = dense_protocol("maskclip", "voc", with_background)
    assert maskclip["follows"] == "naclip" and maskclip["published_miou"] is None
    assert "maskclip has no published evaluation protocol" in maskclip["deviations"][0]
    folder = dense_protocol("naclip", "folder", with_background)
    assert folder["options"]["bg_threshold"] == 0.1 and folder["class_list"] is None
    assert "naclip published no protocol for this data set" in folder["deviations"][0]


def test_dense_class_prediction_applies_sclips_area_rule_then_the_threshold_by_hand():
    """Queries: background word, cat, kitty (cat's synonym), dog; one row of 5 pixels.

    Class scores (max over queries): background .30 .20 .10 .05 .40 | cat .60 .70 .50 .30 .35 | dog .10 .10 .40 .65
    .25. Argmax: cat, cat, cat, dog, background: foreground areas cat 3, dog 1 of 4. With area threshold 0.3 dog
    (1 <= 1.2) is dropped, so pixel 3 goes to cat (.30 beats background .05); with background threshold 0.35
    the pixels whose best remaining score is below it (pixel 3: .30) become background."""
    probabilities = np.array([
        [0.30, 0.20, 0.10, 0.05, 0.40],
        [0.60, 0.30, 0.50, 0.30, 0.35],
        [0.10, 0.70, 0.20, 0.10, 0.10],
        [0.10, 0.10, 0.40, 0.65, 0.25],
    ], dtype=np.float32)[:, None, :]
    query = Query(["sky", "cat", "kitty", "dog"], [1, 2, 0], [[1, 2], [3], [0]])
    assert dense_class_prediction(probabilities, query, (1, 5), 0.0, None, 0).tolist() == [[1, 1, 1, 2, 0]]
    assert dense_class_prediction(probabilities, query, (1, 5), 0.0, 0.3, 0).tolist() == [[1, 1, 1, 1, 0]]
    assert dense_class_prediction(probabilities, query, (1, 5), 0.35, 0.3, 0).tolist() == [[1, 1, 1, 0, 0]]
    assert dense_class_prediction(probabilities, query, (1, 5), 0.0, 0.2, 0).tolist() == [[1, 1, 1, 2, 0]], \
        "1 of 4 foreground pixels is above a 0.2 share"


def test_clearclip_eval_asks_for_the_literal_background_query(synthetic_voc, tmp_path, tiny_checkpoint):
    """ClearCLIP's VOC21 list names background with the word itself, and its threshold is 0.5."""
    report = tmp_path / "report.json"
    result = run("eval", "--dataset", "voc", "--root", synthetic_voc, "--report", report, "--method", "dense",
                 "--attention", "clearclip", "--window", 32, "--short-side", 64, "--max-side", 40,
                 *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 0, result.output
    record = json.loads(report.read_text())
    assert record["classes"][0] == ["background", "background"] and record["classes"][15] == ["person", "person"]
    assert record["segmenter"]["bg_threshold"] == 0.5 and record["segmenter"]["dense"]["logit_scale"] == 50.0
    assert record["dense_protocol"]["follows"] == "clearclip" and record["segmenter"]["refine"] == "none"


def test_dense_eval_refuses_the_crf_in_one_line(synthetic_voc, tiny_checkpoint):
    result = run("eval", "--dataset", "voc", "--root", synthetic_voc, "--method", "dense", "--refine", "crf",
                 *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--refine pamr or none" in result.stderr


def test_compare_runs_each_method_under_its_own_protocol_and_tabulates_miou(synthetic_voc, tmp_path,
                                                                            tiny_checkpoint):
    """One model, three protocols: each run of the comparison is the single run of that method."""
    report, predictions = tmp_path / "report.json", tmp_path / "predictions"
    arguments = ["eval", "--dataset", "voc", "--root", synthetic_voc, *tiny_cli_args(tiny_checkpoint), "--tta", "none",
                 "--max-side", 40]
    result = run(*arguments, "--compare", "relevance,naclip,sclip", "--report", report,
                 "--save-predictions", predictions)
    assert result.exit_code == 0, result.output
    record = json.loads(report.read_text())
    assert [row["run"] for row in record["comparison"]] == ["relevance", "naclip", "sclip"]
    assert [row["follows"] for row in record["comparison"]] == [None, "naclip", "sclip"]
    assert record["comparison"][2]["published_miou"] == 59.63
    assert record["runs"]["sclip"]["dense_protocol"]["area_threshold"] == 0.1
    assert sorted(path.name for path in predictions.iterdir()) == ["naclip", "relevance", "sclip"]
    for name in ("relevance", "naclip"):
        method = ["--method", "dense", "--attention", name] if name != "relevance" else []
        single = tmp_path / f"{name}.json"
        assert run(*arguments, *method, "--report", single).exit_code == 0
        assert json.loads(single.read_text())["confusion"] == record["runs"][name]["confusion"]
        assert json.loads(single.read_text())["metrics"]["miou"] == record["comparison"][
            ["relevance", "naclip"].index(name)]["miou"]


@pytest.mark.parametrize("options, message", [
    (["--compare", "naclip,qk"], "--compare takes relevance, vanilla, maskclip, sclip, clearclip, naclip, scclip, "
                                 "rfclip, corrclip, comma-separated; got 'naclip,qk'"),
    (["--compare", "naclip", "--method", "dense"], "--compare names the methods itself"),
    (["--compare", "relevance,naclip", "--window", "32"], "--window is an option of --method dense"),
])
def test_compare_refuses_bad_lists_in_one_line(synthetic_voc, tiny_checkpoint, options, message):
    result = run("eval", "--dataset", "voc", "--root", synthetic_voc, *options, *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.parametrize("method, protocol", [("relevance", "open"), ("relevance", "given"), ("dense", "open")])
def test_batched_eval_gives_the_confusion_of_one_image_at_a_time(method, protocol, tiny_checkpoint):
    """`evaluate` reads ahead and segments in batches (`segment_many`, `query_probabilities_many`); the confusion
    matrix is the one of each image segmented alone (`segment`, `query_probabilities`) on real CamVid images."""
    dataset = folder_dataset(shared_dataset("camvid"), ignore_index=11)
    ids = dataset.ids[:5]
    refinement = {"refine": "pamr"} if method == "dense" else {"refine": "crf", "crf_iterations": 2}
    segmenter = tiny_segmenter(tiny_checkpoint, activation="gelu", method=method, max_side=96, **refinement)
    alone = torch.zeros(11, 11, dtype=torch.int64)
    for image_id in ids:
        sample = dataset.load(image_id)
        query = build_query(dataset, candidate_classes(dataset, sample.truth, protocol), protocol,
                            threshold_row=method == "relevance")
        if method == "dense":
            prediction = dense_class_prediction(segmenter.query_probabilities(sample.image, query.labels), query,
                                                sample.truth.shape, segmenter.config.background_threshold, None,
                                                None)
        else:
            prediction = class_prediction(segmenter.segment(sample.image, query.labels).scores, query,
                                          sample.truth.shape)
        alone += confusion_matrix(prediction, sample.truth, 11, ignore_index=11)
    batched = evaluate(segmenter, dataset, ids, protocol)
    assert batched.evaluated == 5 and not batched.failed
    assert torch.equal(batched.confusion, alone)
