"""Automatic labels: vocabularies, the keep rule on hand-made scores, and `--labels auto` end to end."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import raises_worded, shared_dataset, tiny_cli_args, tiny_segmenter

from wildseg.autolabels import (
    AutoLabelRule,
    auto_label_record,
    candidates_from_scores,
    find_labels,
    found_labels,
    load_vocabulary,
    segment_with_found_labels,
)
from wildseg.choices import AUTO_MIN_SCORES
from wildseg.cli import main
from wildseg.datasets.classes import parse_class_names


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_built_in_vocabularies_and_files(tmp_path):
    assert [len(load_vocabulary(name)) for name in ("voc", "coco", "ade")] == [20, 80, 150]
    assert load_vocabulary("coco")[0].name == "person"
    listed = tmp_path / "mine.txt"
    listed.write_text("background, sky\ncat, kitty\nsofa\n")
    assert [(entry.name, entry.prompts) for entry in load_vocabulary(str(listed))] == [
        ("cat", ("cat", "kitty")), ("sofa", ("sofa",))]


def test_an_unknown_vocabulary_is_a_clear_error():
    with raises_worded("unknown vocabulary 'pets': use voc, coco, ade or the path"):
        load_vocabulary("pets")


def test_the_rule_on_hand_made_scores():
    vocabulary = parse_class_names(["cat, kitty", "dog", "sofa"], "test")
    scores = np.zeros((5, 10, 10), dtype=np.float32)  # rows: background, cat, kitty, dog, sofa
    scores[0] = 0.4
    scores[1, :5] = 0.5          # cat wins rows 0-4 with 0.5 ...
    scores[2, :2] = 0.9          # ... except rows 0-1, where its synonym kitty scores 0.9
    scores[3, 5:, :1] = 0.45     # dog: 10 pixels at 0.45
    scores[4, 9, 9] = 1.0        # sofa: one pixel
    candidates = candidates_from_scores(scores, vocabulary, AutoLabelRule(min_area=0.05, min_score=0.5))
    summary = [(c.label, c.pixel_fraction, round(c.mean_score, 4), c.found) for c in candidates]
    assert summary == [("cat", 0.5, round((20 * 0.9 + 30 * 0.5) / 50, 4), True),
                       ("dog", 0.05, 0.45, False), ("sofa", 0.01, 1.0, False)]
    assert found_labels(candidates, AutoLabelRule()) == ["cat"]
    with raises_worded(r"best: 'dog' on 5.0% of the pixels, score 0.45"):
        found_labels(candidates[1:], AutoLabelRule(min_area=0.05, min_score=0.5))


def test_find_labels_fills_in_the_methods_score_threshold(tiny_checkpoint):
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    segmenter = tiny_segmenter(tiny_checkpoint, tta="none")
    vocabulary = load_vocabulary("voc")
    scores = segmenter.label_scores(image, [prompt for entry in vocabulary for prompt in entry.prompts])
    rule = AutoLabelRule(min_area=0.01, min_score=AUTO_MIN_SCORES["relevance"])
    found = find_labels(segmenter, image, vocabulary, AutoLabelRule(min_area=0.01))
    assert found == candidates_from_scores(scores, vocabulary, rule) and found


@pytest.mark.parametrize("method", ["relevance", "dense"])
def test_two_passes_over_a_batch_give_what_each_image_alone_gives(tiny_checkpoint, monkeypatch, method):
    """Real CamVid and NYUv2 images, more than one chunk: each image is read once, its labels are those `find_labels`
    finds in it alone, and its mask is the one `segment` gives it with those labels; an image where nothing is found
    fails with the reason and its record. Views batched across images change the scores by float rounding only
    (1e-5), by which a few near-tie pixels change owner: shares and mean scores agree within 1e-3."""
    import wildseg.autolabels

    monkeypatch.setattr(wildseg.autolabels, "CHUNK", 2)
    images = [*sorted((shared_dataset("camvid") / "images").iterdir())[:3],
              *sorted((shared_dataset("nyuv2") / "images").iterdir())[:2]]
    dense = {"window": 32, "short_side": 48} if method == "dense" else {}
    segmenter = tiny_segmenter(tiny_checkpoint, method=method, tta="none", max_side=96, **dense)
    vocabulary = load_vocabulary("voc")
    rule = AutoLabelRule(min_area=0.05, min_score=0.0)
    reads = []
    items = list(segment_with_found_labels(segmenter, images, "voc", vocabulary, rule,
                                           read=lambda path: reads.append(path) or path))
    assert sorted(reads) == sorted(images), "each image is read once for both passes"
    assert sorted(item.source for item in items) == sorted(images)
    found_some = 0
    for item in items:
        candidates = find_labels(segmenter, item.source, vocabulary, rule)
        expected = auto_label_record("voc", rule, candidates)
        assert {**item.auto_labels, "candidates": None} == {**expected, "candidates": None}
        for batched, single in zip(item.auto_labels["candidates"], expected["candidates"], strict=True):
            assert (batched["label"], batched["found"]) == (single["label"], single["found"])
            assert batched["pixel_fraction"] == pytest.approx(single["pixel_fraction"], abs=1e-3), "near-tie pixels"
            assert batched["mean_score"] == pytest.approx(single["mean_score"], abs=1e-3), "near-tie pixels"
        names = [candidate.label for candidate in candidates if candidate.found]
        if not names:
            assert item.error.startswith("no class of the vocabulary covers 5.0% of the image")
            continue
        found_some += 1
        alone = segmenter.segment(item.source, names)
        assert item.result.labels == ["background", *names]
        assert np.array_equal(item.result.mask, alone.mask)
    assert found_some >= 1


def test_labels_auto_segments_with_vocabulary_entries_only(tmp_path, tiny_checkpoint):
    image = next((shared_dataset("voc2012") / "JPEGImages").glob("*.jpg"))
    out = tmp_path / "out"
    result = run("segment", image, "--labels", "auto", "--vocab", "voc", "--auto-min-score", 0, "--out", out,
                 *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / f"{image.stem}.json").read_text())
    vocabulary = {entry.name for entry in load_vocabulary("voc")}
    auto = record["auto_labels"]
    found = [candidate["label"] for candidate in auto["candidates"] if candidate["found"]]
    assert auto["vocabulary"] == "voc" and auto["rule"] == {"min_area": 0.01, "min_score": 0.0}
    assert found and set(found) <= vocabulary and record["labels"] == ["background", *found]
    assert all(candidate["pixel_fraction"] >= 0.01 for candidate in auto["candidates"] if candidate["found"])
    assert all(candidate["pixel_fraction"] < 0.01 for candidate in auto["candidates"] if not candidate["found"])


def test_labels_auto_usage_errors_and_nothing_found(tmp_path, tiny_checkpoint):
    image = next((shared_dataset("voc2012") / "JPEGImages").glob("*.jpg"))
    unknown = run("segment", image, "--labels", "auto", "--vocab", "pets", "--out", tmp_path / "a",
                  *tiny_cli_args(tiny_checkpoint))
    assert unknown.exit_code == 2 and "unknown vocabulary 'pets'" in unknown.stderr
    misplaced = run("segment", image, "--labels", "cat", "--vocab", "voc", "--out", tmp_path / "b",
                    *tiny_cli_args(tiny_checkpoint))
    assert misplaced.exit_code == 2 and "--vocab is for --labels auto" in misplaced.stderr
    nothing = run("segment", image, "--labels", "auto", "--vocab", "voc", "--auto-min-area", 1.0, "--out",
                  tmp_path / "c", "--summary", tmp_path / "summary.json", *tiny_cli_args(tiny_checkpoint))
    assert nothing.exit_code == 1 and "no class of the vocabulary covers 100.0% of the image" in nothing.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == 1
    assert not any((tmp_path / "c").glob("*.json"))
