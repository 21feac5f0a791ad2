"""The `wildseg segment` command and the Segmenter API end to end, on a tiny random model."""

import json
import re
from importlib import resources

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_MODEL, as_command_line_says, raises_worded, tiny_cli_args, tiny_segmenter
from PIL import Image
from rich.progress import Progress

from wildseg import SegmenterConfig
from wildseg.cli import main
from wildseg.cli.progress import RateColumn, TimeLeftColumn, advance, image_rate
from wildseg.files import write_json
from wildseg.outputs import label_palette
from wildseg.pseudolabels import label_scores, scores_to_probabilities
from wildseg.tta import merge_views, plan_views


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint):
    return tiny_segmenter(tiny_checkpoint, refine="none")


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.zeros((48, 80, 3), dtype=np.uint8)
    pixels[:, :40] = (220, 60, 40)
    pixels[:, 40:] = (30, 90, 200)
    pixels = np.clip(pixels + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    image.save(path, exif=exif)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_segment_writes_mask_overlay_and_record(photo, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    result = run("segment", photo, "--labels", "cat, sofa", "--out", out, "--crf-iters", 2,
                 *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["photo.json", "photo.png", "photo_overlay.jpg"]
    mask_image = Image.open(out / "photo.png")
    assert mask_image.mode == "P" and mask_image.size == (48, 80), "mask follows the EXIF-rotated (displayed) image"
    assert mask_image.getpalette()[:9] == label_palette(3).flatten().tolist()
    mask = np.array(mask_image)
    assert set(np.unique(mask)) <= {0, 1, 2}
    assert Image.open(out / "photo_overlay.jpg").size == (48, 80)
    record = json.loads((out / "photo.json").read_text())
    assert record["labels"] == ["background", "cat", "sofa"]
    assert record["image_size"] == {"width": 48, "height": 80}
    assert record["palette"] == label_palette(3).tolist()
    fractions = [row["pixel_fraction"] for row in record["classes"]]
    assert fractions == pytest.approx([np.mean(mask == index) for index in range(3)])
    assert record["settings"]["model"] == TINY_MODEL and record["settings"]["refine"] == "crf"
    assert record["settings"]["crf"]["iterations"] == 2 and record["settings"]["tta"] == "default"
    assert record["settings"]["crf"]["backend"] == "pydensecrf", "auto is pydensecrf on the CPU"
    assert record["settings"]["activation"] == "gelu" and record["settings"]["activation_source"] == "given"
    assert set(record["timings_s"]) == {"decode_s", "text_s", "maps_s", "crf_s", "write_s"}, "the stages that ran"
    assert all(seconds > 0 for seconds in record["timings_s"].values())
    assert "background" in result.stdout and "photo.png" in result.stdout
    assert not list(out.glob(".*")), "no temporary files are left"


def test_quiet_prints_nothing(photo, tmp_path, tiny_checkpoint):
    result = run("segment", photo, "-l", "cat", "-o", tmp_path / "q", "-q", "--tta", "none",
                 *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""


def test_api_result_is_consistent(segmenter, photo):
    with pytest.warns(UserWarning, match="duplicate label"):
        result = segmenter.segment(Image.open(photo), ["cat", "sofa", "Cat"])
    assert result.labels == ["background", "cat", "sofa"]
    assert result.mask.shape == (80, 48) and result.scores.shape == (3, 80, 48)
    assert np.allclose(result.scores.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(result.mask, result.scores.argmax(0))


def test_api_pipeline_matches_its_stages(segmenter):
    """Wiring: without refinement, the result is the background rule applied to the TTA-merged relevance."""
    pixels = np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    backbone, pipeline = segmenter.backbone, segmenter.pipeline
    text = backbone.embed_labels(["cat", "sofa"], "photo")
    views = plan_views(40, 56, backbone.image_size, segmenter.config.tta)
    merged = merge_views(pipeline.normalized(pixels), views, pipeline.view_mapper(text), batch_size=3)
    expected = scores_to_probabilities(label_scores(merged, 0.4), 0.1).numpy()
    result = segmenter.segment(pixels, "cat,sofa")
    assert np.allclose(result.scores, expected, atol=1e-6)
    assert merged.shape == (2, 40, 56)


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing image", "image not found"),
        ("empty labels", "no label names given"),
        ("blank labels", "no label names given"),
        ("unknown model", "unknown model 'ViT-Q-99'"),
        ("corrupt checkpoint", "cannot read checkpoint"),
        ("no labels option", "give --labels"),
        ("bad tta", "Invalid value for '--tta'"),
        ("too many labels", "256 labels given, at most 255 fit in one mask"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_outputs(case, message, photo, tmp_path, tiny_checkpoint):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    image = {"missing image": tmp_path / "nope.jpg"}.get(case, photo)
    labels = {"empty labels": "", "blank labels": "  ,  ",
              "too many labels": ",".join(f"thing {index}" for index in range(256))}.get(case, "cat")
    args = ["segment", image, "--out", tmp_path / "out", *tiny_cli_args(tiny_checkpoint)]
    args += {
        "unknown model": ["--model", "ViT-Q-99"],
        "corrupt checkpoint": ["--checkpoint", corrupt],
        "bad tta": ["--tta", "lots"],
    }.get(case, [])
    if case != "no labels option":
        args += ["--labels", labels]
    result = run(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wildseg: error:") and message in lines[0], result.stderr
    assert isinstance(result.exception, SystemExit), "no exception other than the exit escapes"
    assert not (tmp_path / "out").exists()


def test_duplicate_labels_are_merged_with_a_warning(photo, tmp_path, tiny_checkpoint):
    result = run("segment", photo, "-l", "cat,CAT", "-o", tmp_path / "o", "--tta", "none",
                 *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 0
    assert "wildseg: warning: duplicate label 'CAT' merged with 'cat'" in result.stderr
    assert json.loads((tmp_path / "o" / "photo.json").read_text())["labels"] == ["background", "cat"]


def test_outputs_never_overwrite_the_input(tmp_path, tiny_checkpoint):
    image = tmp_path / "picture.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
    before = image.read_bytes()
    result = run("segment", image, "-l", "cat", "-o", tmp_path, *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 2 and "would overwrite the input" in result.stderr
    assert image.read_bytes() == before


def test_a_dry_run_plans_and_touches_nothing(tmp_path, tiny_checkpoint):
    """Three images, one done (its record and mask), one with a temporary file a killed run left: the dry run says
    it would segment two and skip one, exits 0, and leaves the output folder as it was (the leftover too)."""
    for name in ("a", "b", "c"):
        Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    done = run("segment", tmp_path / "a.png", "-l", "cat", "-o", out, *tiny_cli_args(tiny_checkpoint))
    assert done.exit_code == 0
    leftover = out / ".b.png.x1y2z3.part"
    leftover.write_bytes(b"cut off")
    before = sorted(path.name for path in out.iterdir())
    result = run("segment", tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png", "-l", "cat", "-o", out,
                 "--dry-run", *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "would segment 2 images: 1 skipped (done before), of 3 images"
    assert sorted(path.name for path in out.iterdir()) == before and leftover.read_bytes() == b"cut off"


def test_an_input_folder_that_is_the_output_folder_is_named_as_the_cause(tmp_path, tiny_checkpoint):
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(folder / "road.png")
    result = run("segment", folder, "-l", "road", "-o", folder, *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"the input folder {folder} lies in the output folder {folder}" in result.stderr
    assert "give another --out (for example pngs_masks)" in result.stderr


def test_invalid_settings_are_refused(tiny_checkpoint):
    with raises_worded("--start-block 5 is outside the model's 3 blocks: use -3..2"):
        tiny_segmenter(tiny_checkpoint, start_block=5)
    with raises_worded("unknown --refine 'magic': use one of crf, pamr, pamr\\+crf, regions, pamr\\+regions, "
                       "regions\\+crf, pamr\\+regions\\+crf, none"):
        SegmenterConfig(refine="magic")


def test_unwritable_outputs_fail_before_any_work(photo, tmp_path, tiny_checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = run("segment", photo, "-l", "cat", "-o", blocker / "sub", *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr
    assert blocker.read_text() == "keep me"
    (tmp_path / "out" / "photo.png").mkdir(parents=True)
    result = run("segment", photo, "-l", "cat", "-o", tmp_path / "out", *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 2 and "is a folder" in result.stderr and len(result.stderr.splitlines()) == 1
    result = run("segment", photo, "-l", "cat", "-o", tmp_path / "other", "--summary", tmp_path / "out",
                 *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 2 and "is a folder: move it away or choose another --summary" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "other").exists()


def test_json_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    with raises_worded(f"^cannot write the report {re.escape(str(blocker / 'r.json'))}: ") as error:
        write_json(blocker / "r.json", {"miou": 0.5}, "the report")
    assert "\n" not in as_command_line_says(error.value)
    assert blocker.read_text() == "keep me"
    write_json(tmp_path / "report.json", {"miou": 0.5}, "the report")
    assert json.loads((tmp_path / "report.json").read_text()) == {"miou": 0.5}


def test_a_run_removes_its_own_leftover_temporaries_and_no_one_elses(photo, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    ours, theirs = out / ".photo.png.k3j2.part", out / ".other.png.x9q1.part"
    ours.write_bytes(b"half a png")
    theirs.write_bytes(b"another run's png in progress")
    result = run("segment", photo, "-l", "cat", "-o", out, "--tta", "none", *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 0, result.stderr
    assert not ours.exists() and theirs.read_bytes() == b"another run's png in progress"


def test_a_file_that_is_not_an_image_fails_in_one_line_with_exit_1(tmp_path, tiny_checkpoint):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    result = run("segment", text, "-l", "cat", "-o", tmp_path / "out", "-q", *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"wildseg: failed: {text}: {text} is not an image file Pillow can "
                                                  "read (JPEG, PNG, BMP, TIFF, WebP, ...)"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_rerun_skips_done_images_and_overwrite_drops_the_old_record_first(photo, tmp_path, tiny_checkpoint,
                                                                         monkeypatch):
    out = tmp_path / "out"
    first = run("segment", photo, "-l", "cat", "-o", out, "--tta", "none", *tiny_cli_args(tiny_checkpoint))
    assert first.exit_code == 0
    import wildseg.cli.segment
    import wildseg.outputs

    with monkeypatch.context() as patch:
        patch.setattr(wildseg.cli.segment, "build_segmenter",
                      lambda *args, **kwargs: pytest.fail("nothing to do: no model"))
        again = run("segment", photo, "-l", "cat", "-o", out, "--tta", "none", *tiny_cli_args(tiny_checkpoint))
        other = run("segment", photo, "-l", "dog", "-o", out, "--tta", "none", *tiny_cli_args(tiny_checkpoint))
    assert again.exit_code == 0 and "0 done, 1 skipped" in again.stdout
    assert other.exit_code == 2 and "made with other settings (--labels for 1)" in other.stderr
    assert json.loads((out / "photo.json").read_text())["labels"] == ["background", "cat"]

    def failing_overlay(*args):
        raise OSError("disk full")

    monkeypatch.setattr(wildseg.outputs, "overlay_image", failing_overlay)
    result = run("segment", photo, "-l", "dog", "-o", out, "--tta", "none", "--overwrite",
                 *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 1 and "cannot write the outputs" in result.stderr and "disk full" in result.stderr
    assert not (out / "photo.json").exists(), "no record marks the half-replaced outputs as done"
    assert not list(out.glob(".*"))


def test_bare_command_prints_help():
    result = run()
    assert result.exit_code == 0 and "segment" in result.stdout


def test_segment_with_the_dense_method_and_pamr_records_its_settings(photo, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    result = run("segment", photo, "--labels", "cat, sofa", "--out", out, "--method", "dense", "--attention",
                 "clearclip", "--window", 32, "--short-side", 64, "--refine", "pamr", "--pamr-iters", 3,
                 *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / "photo.json").read_text())
    settings = record["settings"]
    assert settings["method"] == "dense" and settings["start_block"] is None and settings["crf"] is None
    voc_background = (resources.files("wildseg.datasets") / "classnames" / "voc21.txt").read_text().splitlines()[0]
    assert settings["dense"] == {"attention": "clearclip", "window": 32, "stride": 16, "short_side": 64,
                                 "long_side": 2048, "logit_scale": 40.0, "patch_size": 8,
                                 "normalization": {"source": "official", "mean": [122.771, 116.746, 104.094],
                                                   "std": [68.501, 66.632, 70.323]},
                                 "background_words": [word.strip() for word in voc_background.split(",")[1:]]}
    assert settings["dense"]["background_words"][:3] == ["sky", "wall", "tree"]
    assert settings["pamr"]["iterations"] == 3 and settings["bg_threshold"] == 0.1
    assert np.array(Image.open(out / "photo.png")).shape == (80, 48)


@pytest.mark.parametrize("arguments, message", [
    (["--window", "64"], "--window is an option of --method dense"),
    (["--method", "dense", "--start-block", "0"], "--start-block is an option of --method relevance"),
    (["--pamr-iters", "3"], "--pamr-iters is an option of --refine pamr or pamr+crf"),
    (["--refine", "pamr", "--crf-iters", "3"], "--crf-iters is an option of --refine crf or pamr+crf"),
    (["--refine", "none", "--crf-backend", "torch"], "--crf-backend is an option of --refine crf or pamr+crf"),
    (["--crf-backend", "cuda"], "Invalid value for '--crf-backend'"),
    (["--crf-backend", "torch", "--refine-workers", "1"], "--refine-workers is an option of pydensecrf's CRF"),
    (["--refine", "pamr", "--refine-workers", "1"], "--refine-workers is an option of pydensecrf's CRF"),
    (["--method", "dense", "--attention", "qk"], "Invalid value for '--attention'"),
    (["--method", "dense", "--window", "8"], "--window must be 0 (the whole image) or at least 16 pixels"),
])
def test_dense_usage_errors_are_one_line(photo, tmp_path, tiny_checkpoint, arguments, message):
    result = run("segment", photo, "--labels", "cat", "--out", tmp_path / "out", *arguments,
                 *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_scores_and_heatmaps_are_written_and_asked_for_again_on_rerun(photo, tmp_path, tiny_checkpoint):
    """The npz holds the probabilities the record's mean scores come from; a rerun that asks for scores an
    earlier run did not write segments the image again."""
    out = tmp_path / "out"
    plain = run("segment", photo, "-l", "cat,sofa", "-o", out, "--tta", "none", *tiny_cli_args(tiny_checkpoint))
    assert plain.exit_code == 0 and not list(out.glob("*_scores.npz"))
    result = run("segment", photo, "-l", "cat,sofa", "-o", out, "--tta", "none", "--save-scores", "--heatmaps",
                 *tiny_cli_args(tiny_checkpoint))
    assert result.exit_code == 0 and "1 done, 0 skipped" in result.stdout
    saved = np.load(out / "photo_scores.npz")
    record = json.loads((out / "photo.json").read_text())
    assert saved["labels"].tolist() == ["background", "cat", "sofa"] and saved["image_size"].tolist() == [80, 48]
    scores = saved["scores"].astype(np.float32)
    mask = np.array(Image.open(out / "photo.png"))
    for index, row in enumerate(record["classes"]):
        if row["pixel_fraction"]:
            assert scores[index][mask == index].mean() == pytest.approx(row["mean_score"], abs=1e-3)
    assert sorted(path.name for path in out.glob("photo_heatmap_*")) == ["photo_heatmap_1_cat.jpg",
                                                                        "photo_heatmap_2_sofa.jpg"]
    assert Image.open(out / "photo_heatmap_1_cat.jpg").size == (48, 80)
    again = run("segment", photo, "-l", "cat,sofa", "-o", out, "--tta", "none", "--save-scores", "--heatmaps",
                *tiny_cli_args(tiny_checkpoint))
    assert "0 done, 1 skipped" in again.stdout


def test_models_lists_what_both_methods_work_with_and_why_not_the_rest():
    wide = {"COLUMNS": "200"}
    listed = CliRunner().invoke(main, ["models"], env=wide)
    assert listed.exit_code == 0
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in listed.stdout.splitlines()
            if line.count("│") == 3}
    assert "openai" in rows["ViT-B-16"] and "RN50" not in rows and "coca_ViT-B-32" not in rows
    assert "`wildseg models --all` lists them" in listed.stdout
    everything = CliRunner().invoke(main, ["models", "--all"], env=wide)
    assert "ResNet vision tower" in everything.stdout and "attentional pooling (CoCa)" in everything.stdout


def test_the_rate_is_images_finished_over_the_time_since_the_first_began():
    """Three images that one model batch finishes 20 s after the first began, a tenth of a millisecond apart, are
    0.15 images/s, not the 2946 images/s between two of them; before the first is done there is no rate."""
    now = [0.0]
    progress = Progress(RateColumn(), TimeLeftColumn(), get_time=lambda: now[0], disable=True)
    task = progress.add_task("segmenting", total=10)
    now[0] = 10.0
    assert image_rate(progress.tasks[task]) is None and str(RateColumn().render(progress.tasks[task])) == "- img/s"
    assert str(TimeLeftColumn().render(progress.tasks[task])) == "-:--:-- left"
    for moment in (20.0, 20.0001, 20.0002):
        now[0] = moment
        advance(progress, task)
    assert image_rate(progress.tasks[task]) == pytest.approx(3 / 20.0002)
    assert str(RateColumn().render(progress.tasks[task])) == "0.15 img/s"
    assert str(TimeLeftColumn().render(progress.tasks[task])) == "0:00:47 left", "7 images at 3 per 20 s"


def test_shards_of_a_folder_segment_every_image_once(tmp_path, tiny_checkpoint):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(7):
        Image.new("RGB", (32, 24), (30 * index, 100, 50)).save(folder / f"p{index}.jpg")
    outs = []
    for index in (1, 2, 3):
        out = tmp_path / f"out{index}"
        result = run("segment", folder, "-l", "cat", "-o", out, "--shard", f"{index}/3", "--tta", "none",
                     *tiny_cli_args(tiny_checkpoint))
        assert result.exit_code == 0, result.stderr
        outs.append(sorted(path.stem for path in out.glob("*.json")))
    assert sorted(name for names in outs for name in names) == [f"p{index}" for index in range(7)]
    again = run("segment", folder, "-l", "cat", "-o", tmp_path / "out2", "--shard", "2/3", "--tta", "none",
                *tiny_cli_args(tiny_checkpoint))
    assert f"0 done, {len(outs[1])} skipped" in again.stdout
