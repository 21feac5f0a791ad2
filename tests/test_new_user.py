"""What a new user meets: an output folder done with other settings, an --out that cannot be written, label options
given wrongly, a labels file that misses images, what a run says it wrote, an offline first run, and why a test was
skipped. The mistakes that need no model run the command line in a subprocess, and show that it answered before the
model libraries were imported (torch, open_clip): before any model load."""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_MODEL, tiny_cli_args, wildseg_in_subprocess
from PIL import Image

from wildseg.cli import main

TESTS = Path(__file__).parent

def before_loading(*arguments, cwd: Path, env: dict = None) -> tuple[int, list[str], list[str]]:
    """`wildseg ...` in a subprocess: its exit code, stderr lines and which of torch and open_clip it imported."""
    result = wildseg_in_subprocess(*arguments, cwd=cwd, env=env, libraries=("torch", "open_clip"))
    return result.code, result.lines, result.imported


def run(*arguments):
    return CliRunner().invoke(main, [str(argument) for argument in arguments])


@pytest.fixture
def photos(tmp_path) -> Path:
    """Two small photos in a folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(2):
        Image.new("RGB", (40, 30), (60 * index, 120, 40)).save(folder / f"p{index}.png")
    return folder


def test_a_folder_done_with_other_settings_is_refused_before_the_model_loads_and_overwrite_redoes_it(
        photos, tmp_path, tiny_checkpoint):
    """Each setting that decides the masks, changed in turn, is named in one line with the number of images it
    concerns, exit 2, before torch is imported; settings that do not change a mask are a plain resume; --overwrite
    segments exactly the done images again, with the new settings recorded."""
    out = tmp_path / "out"
    given = ["segment", photos, "--labels", "cat,sofa", "--out", out, "--tta", "none", *tiny_cli_args(tiny_checkpoint)]
    first = run(*given)
    assert first.exit_code == 0, first.output
    recorded = {path.name: path.read_bytes() for path in out.iterdir()}
    other_weights = tmp_path / "other.pt"
    shutil.copyfile(tiny_checkpoint, other_weights)
    templates = tmp_path / "templates.txt"
    templates.write_text("a picture of a {}.\n")
    changes = {
        "--labels": ["--labels", "car,road,sky"],
        "--method": ["--method", "dense"],
        "--model": ["--model", "ViT-B-16"],
        "--checkpoint": ["--checkpoint", other_weights],
        "--tta": ["--tta", "default"],
        "--refine": ["--refine", "pamr"],
        "--templates": ["--templates", templates],
        "--bg-threshold": ["--bg-threshold", "0.6"],
        "--max-side": ["--max-side", "96"],
        "--crf-iters": ["--crf-iters", "2"],
    }
    for name, change in changes.items():
        code, lines, imported = before_loading(*given, *change, cwd=tmp_path)
        assert code == 2 and imported == [], (name, lines)
        assert len(lines) == 1 and lines[0].startswith(f"wildseg: error: 2 of the 2 images done before in {out} "
                                                       "were made with other settings ("), lines
        assert f"{name} for 2" in lines[0] and lines[0].endswith(
            "give --overwrite to segment them again with these, or choose another --out"), lines
    assert {path.name: path.read_bytes() for path in out.iterdir()} == recorded, "the user's files are untouched"
    code, lines, imported = before_loading(*given, "--workers", 1, "--summary", tmp_path / "summary.json",
                                           "--device", "cpu", "--no-text-cache", cwd=tmp_path)
    assert code == 0 and imported == [] and lines == [], "nothing to do: the model is not even imported"
    assert json.loads((tmp_path / "summary.json").read_text())["skipped"] == 2

    redo = run(*given[:3], "car,road,sky", *given[4:], "--overwrite")
    assert redo.exit_code == 0 and "2 done, 0 skipped (done before)" in redo.stdout, redo.output
    for photo in ("p0", "p1"):
        record = json.loads((out / f"{photo}.json").read_text())
        assert record["labels"] == ["background", "car", "road", "sky"]
        assert record["request"]["labels"] == ["car", "road", "sky"] and record["request"]["model"] == TINY_MODEL
    resumed = run(*given[:3], "car,road,sky", *given[4:])
    assert resumed.exit_code == 0 and "0 done, 2 skipped (done before)" in resumed.stdout


def test_equal_settings_written_otherwise_are_a_plain_resume(photos, tmp_path, tiny_checkpoint):
    """A vocabulary file named relatively then absolutely, a default given explicitly, a labels file entry reached
    through `..`: the same masks, so the images are skipped, not refused; a changed vocabulary or rule is named."""
    vocabulary = tmp_path / "things.txt"
    vocabulary.write_text("cat\nsofa\nwindow\n")
    out = tmp_path / "out"
    given = ["segment", photos, "--labels", "auto", "--vocab", "things.txt", "--out", out, "--tta", "none",
             *tiny_cli_args(tiny_checkpoint)]
    with contextlib.chdir(tmp_path):
        first = run(*given, "--auto-min-area", 0, "--auto-min-score", 0)
    assert first.exit_code == 0, first.output
    again = [*given[:5], vocabulary, *given[6:], "--auto-min-area", 0, "--auto-min-score", 0]
    code, lines, imported = before_loading(*again, cwd=photos)
    assert code == 0 and imported == [], lines
    code, lines, _ = before_loading(*again[:-1], "0.2", cwd=photos)
    assert code == 2 and "(--auto-min-score for 2)" in lines[0], lines
    vocabulary.write_text("cat\nsofa\n")
    code, lines, _ = before_loading(*again, cwd=photos)
    assert code == 2 and "(--vocab for 2)" in lines[0], lines

    listed = tmp_path / "lists" / "labels.csv"
    listed.parent.mkdir()
    listed.write_text("../photos/p0.png,cat\n../photos/p1.png,sofa\n")
    code, lines, _ = before_loading("segment", photos, "--labels-file", listed, "--out", tmp_path / "listed",
                                    "--pretrained", "no-such-tag", cwd=tmp_path)
    assert not any("no entry" in line for line in lines), "entries through .. are the images' own"


def test_a_record_without_its_settings_is_not_taken_as_done_with_these(photos, tmp_path, tiny_checkpoint):
    """A record of a wildseg that did not write its request (nor its digest) cannot be compared: it is refused, not
    resumed."""
    out = tmp_path / "out"
    given = ["segment", photos / "p0.png", "--labels", "cat", "--out", out, "--tta", "none",
             *tiny_cli_args(tiny_checkpoint)]
    assert run(*given).exit_code == 0
    record = json.loads((out / "p0.json").read_text())
    del record["request"], record["request_digest"]
    (out / "p0.json").write_text(json.dumps(record))
    code, lines, imported = before_loading(*given, cwd=tmp_path)
    assert code == 2 and imported == [] and "(settings unrecorded for 1)" in lines[0], lines


def test_a_rerun_finds_a_record_done_by_its_request_digest_and_compares_one_without_it(photos, tmp_path,
                                                                                        tiny_checkpoint):
    """A record's `request_digest` is the SHA-256 of its request as JSON with sorted keys and no spaces (computed
    here with hashlib). A rerun looks for that digest in the record's text: a record holding it is done with these
    settings without being parsed (so even its request, altered here, is not read); one without it, or with
    another, has its request compared setting by setting."""
    out = tmp_path / "out"
    given = ["segment", photos / "p0.png", "--labels", "cat", "--out", out, "--tta", "none",
             *tiny_cli_args(tiny_checkpoint)]
    assert run(*given).exit_code == 0
    record = json.loads((out / "p0.json").read_text())
    canonical = json.dumps(record["request"], sort_keys=True, separators=(",", ":")).encode()
    assert record["request_digest"] == hashlib.sha256(canonical).hexdigest()

    altered = {**record, "request": {**record["request"], "tta": "heavy"}}
    cases = {"digest kept": (altered, 0, ""),
             "digest removed": ({**altered, "request_digest": None}, 2, "(--tta for 1)"),
             "another digest, the same request": ({**record, "request_digest": "0" * 64}, 0, "")}
    for case, (written, code_expected, said) in cases.items():
        (out / "p0.json").write_text(json.dumps(written, indent=2))
        code, lines, imported = before_loading(*given, cwd=tmp_path)
        assert code == code_expected and imported == [] and said in "".join(lines), (case, lines)


def test_an_out_folder_that_cannot_be_created_is_a_usage_error_before_the_model_loads(photos, tmp_path):
    code, lines, imported = before_loading("segment", photos, "--labels", "cat", "--out", "/proc/wildseg_out",
                                           cwd=tmp_path)
    assert code == 2 and imported == []
    assert lines == ["wildseg: error: cannot write into /proc/wildseg_out (No such file or directory): choose a "
                     "--out you can write to"]
    code, lines, _ = before_loading("segment", photos, "--labels", "cat", "--out", tmp_path / "new" / "deeper",
                                    "--pretrained", "no-such-tag", "--model", "no-such-model", cwd=tmp_path)
    assert code == 2 and not (tmp_path / "new").exists(), "the probe's folders are removed again"


def test_labels_given_twice_or_spread_over_arguments_or_by_other_separators_are_named(photos, tmp_path):
    listed = tmp_path / "labels.csv"
    listed.write_text("photos/p0.png,cat\n")
    code, lines, imported = before_loading("segment", photos, "--labels", "cat", "--labels-file", listed, cwd=tmp_path)
    assert code == 2 and imported == [] and lines == [
        "wildseg: error: both --labels and --labels-file were given: keep --labels for the same labels in every "
        "image, or --labels-file for each image's own"]
    code, lines, imported = before_loading("segment", photos / "p0.png", "--labels", "dog", "horse", cwd=tmp_path)
    assert code == 2 and imported == [] and lines == [
        "wildseg: error: image not found: horse; if 'horse' is a label, several labels go in one quoted, "
        'comma-separated argument: --labels "dog,horse"']
    code, lines, _ = before_loading("segment", photos / "missing.png", "--labels", "cat;sofa", cwd=tmp_path)
    assert lines[0] == ("wildseg: warning: label 'cat;sofa' holds ';': it stays one label, as only commas separate "
                        "labels (write ';' as commas for several)")
    assert code == 2 and lines[1] == f"wildseg: error: image not found: {photos / 'missing.png'} (check the path)"


def test_images_a_labels_file_misses_are_a_usage_error_before_the_model_loads_or_skipped_on_request(
        photos, tmp_path, tiny_checkpoint):
    for index in range(2, 6):
        Image.new("RGB", (40, 30), (10, 20, 30 * index)).save(photos / f"p{index}.png")
    listed = tmp_path / "labels.csv"
    listed.write_text("photos/p1.png,cat\n")
    code, lines, imported = before_loading("segment", photos, "--labels-file", listed, "--out", tmp_path / "out",
                                           cwd=tmp_path)
    assert code == 2 and imported == [] and lines == [
        f"wildseg: error: 5 of the 6 images have no entry in --labels-file {listed} ({photos / 'p0.png'}, "
        f"{photos / 'p2.png'}, {photos / 'p3.png'} and 2 more): add their rows, or give --skip-unlisted to segment "
        "only the images it lists"]
    skipping = run("segment", photos, "--labels-file", listed, "--skip-unlisted", "--out", tmp_path / "out",
                   "--tta", "none", *tiny_cli_args(tiny_checkpoint))
    assert skipping.exit_code == 0, skipping.output
    assert f"skipping 5 of the 6 images: {listed} does not list them" in skipping.stderr
    assert ("1 done, 0 skipped (done before), 5 skipped (not in the labels file), 0 failed, of 6 images"
            in skipping.stdout)
    assert sorted(path.name for path in (tmp_path / "out").glob("*.json")) == ["p1.json"]


def test_a_run_says_every_file_it_wrote_and_no_rate_of_nothing_and_names_an_empty_file(photos, tmp_path,
                                                                                        tiny_checkpoint):
    out = tmp_path / "out"
    given = ["segment", photos / "p0.png", "--labels", "cat,sofa", "--out", out, "--tta", "none", "--save-scores",
             "--heatmaps", *tiny_cli_args(tiny_checkpoint)]
    one = run(*given)
    assert one.exit_code == 0, one.output
    assert (f"wrote {out / 'p0.png'}, p0_overlay.jpg, p0_scores.npz, p0_heatmap_1_cat.jpg, p0_heatmap_2_sofa.jpg, "
            "p0.json") in " ".join(one.stdout.split())
    assert all((out / name).is_file() for name in ("p0_scores.npz", "p0_heatmap_1_cat.jpg", "p0_heatmap_2_sofa.jpg"))
    again = run(*given)
    assert again.exit_code == 0 and "0 done, 1 skipped (done before)" in again.stdout
    assert "images/s" not in again.stdout, "nothing was segmented: there is no rate"
    plain = run(*given[:8], *given[10:], "--overwrite")
    assert f"wrote {out / 'p0.png'}, p0_overlay.jpg, p0.json" in " ".join(plain.stdout.split()), (
        "the heat maps of the earlier run are not said to be written by this one")
    (photos / "empty.png").write_bytes(b"")
    batch = run("segment", photos, "--labels", "cat", "--out", tmp_path / "batch", "--tta", "none",
                *tiny_cli_args(tiny_checkpoint))
    assert batch.exit_code == 1
    assert f"failed: {photos / 'empty.png'}: {photos / 'empty.png'} is empty (0 bytes)" in batch.stderr
    assert "2 done" in batch.stdout and "images/s" in batch.stdout


def test_without_the_weights_a_download_is_said_at_once_and_its_failure_in_one_line(
        photos, tmp_path):
    """With HF_HUB_OFFLINE=1 set, the line advises neither setting it nor the network (offline on purpose)."""
    empty = {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    code, lines, _ = before_loading("segment", photos / "p0.png", "--labels", "cat", "--out", tmp_path / "out",
                                    cwd=tmp_path, env=empty)
    assert code == 2 and len(lines) == 1, "nothing is announced that offline mode forbids"
    assert lines[0] == ("wildseg: error: could not get the 'openai' weights of ViT-B-16: they are not in the download "
                        "cache, and HF_HUB_OFFLINE=1 forbids downloading them (unset it); point --cache-dir at a copy "
                        f"of the cache ({tmp_path / 'hf' / 'hub'} or ~/.cache/clip) or pass --checkpoint FILE")


def test_a_download_is_said_at_once_on_a_pipe_and_its_failure_in_one_line(photos, tmp_path, unreachable_hub):
    """An unreachable hub (its retries without their waits): first the line saying what is downloaded where, then
    the one-line error."""
    result = run("segment", photos / "p0.png", "--labels", "cat", "--out", tmp_path / "out", "--device", "cpu",
                 "--cache-dir", tmp_path / "cache")
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 2, result.stderr
    assert lines[0] == f"wildseg: downloading the openai weights of ViT-B-16 into {tmp_path / 'cache'} (once)"
    assert lines[1] == (f"wildseg: error: could not get the 'openai' weights of ViT-B-16: 127.0.0.1:9 could not be "
                        f"reached and they are not in the download cache; connect to the network, check that "
                        f"--cache-dir {tmp_path / 'cache'} holds them, or pass --checkpoint FILE")


def test_a_skipped_test_says_what_is_missing_and_what_it_would_test(tmp_path):
    """Run as a plain clone without the data beside it would: the reason names the data, where it was looked
    for and the variable to point at it, and no file a clone lacks."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("from conftest import shared_dataset\n\n\ndef test_real_camvid():\n"
                     "    shared_dataset('camvid')\n")
    environment = {key: value for key, value in os.environ.items() if key != "WILDSEG_NO_SKIPS"}
    environment["WILDSEG_TEST_DATA"] = str(tmp_path / "nothing")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(probe),
                             "--rootdir", str(tmp_path), "-o", f"pythonpath={TESTS} {TESTS.parent / 'benchmarks'}"],
                            capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300)
    skipped = next((line for line in result.stdout.splitlines() if line.startswith("SKIPPED")), result.stdout)
    assert "1 skipped" in result.stdout
    assert (f"needs real CamVid street frames with their masks (images/, masks/, classes.txt) in "
            f"{tmp_path / 'nothing' / 'camvid'}, which is absent: set WILDSEG_TEST_DATA") in skipped
    assert "README" not in skipped
