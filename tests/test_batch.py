"""Batch segmentation: inputs and output mirroring, label files, a folder with every kind of file, resuming."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_MODEL, raises_worded, record_count, tiny_cli_args, tiny_segmenter
from PIL import Image

from wildseg import errors, pipeline, streaming
from wildseg.cli import main
from wildseg.inputs import expand_inputs, read_labels_file
from wildseg.outputs import BackgroundWriter
from wildseg.refinement.crf import mean_field_crf
from wildseg.resolution import upsample_argmax
from wildseg.tta import View, ViewStream

CONFIG = Path(__file__).parent / "configs" / f"{TINY_MODEL}.json"


def picture(path: Path, size=(40, 30), seed=0, mode="RGB", **save_options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, **save_options)
    return path


def tiny_args(checkpoint):
    return [*tiny_cli_args(checkpoint), "--tta", "none", "--crf-iters", 1, "--max-side", 64]


def test_outputs_mirror_where_images_were_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a/x.jpg", "a/sub/x.JPG", "a/notes.txt", "b/x.png", "c/y.webp", "out/old.png"):
        picture(tmp_path / name) if not name.endswith(".txt") else (tmp_path / name).write_text("no")
    (tmp_path / "list.txt").write_text("c/y.webp\n# a comment\nb/x.png\n")
    found = expand_inputs(["a", "@list.txt", "a/x.jpg"], recursive=True, exclude=Path("out"))
    assert [(str(image.path), str(image.stem)) for image in found] == [
        ("a/sub/x.JPG", "sub/x"), ("a/x.jpg", "x"), ("c/y.webp", "c/y"), ("b/x.png", "b/x")]
    flat = expand_inputs(["a"], recursive=False)
    assert [str(image.stem) for image in flat] == ["x"], "without --recursive sub-folders are not searched"
    assert [str(image.stem) for image in expand_inputs(["*/x.*"])] == ["a/x", "b/x"]
    assert expand_inputs(["."], recursive=True, exclude=Path("out"))[-1].path == Path("c/y.webp")
    with raises_worded("would write the same outputs x"):
        expand_inputs(["a", "b"])
    with raises_worded("image not found: missing.jpg"):
        expand_inputs(["missing.jpg"])
    with raises_worded("matches no image"):
        expand_inputs(["zzz*.jpg"])


def test_labels_files_in_csv_and_json(tmp_path):
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text('image,labels\nphotos/a.jpg,"cat, sofa"\nphotos/b.jpg,dog,ball\n')
    assert read_labels_file(csv_file) == {
        (tmp_path / "photos/a.jpg").absolute(): ["cat", "sofa"],
        (tmp_path / "photos/b.jpg").absolute(): ["dog", "ball"]}
    json_file = tmp_path / "labels.json"
    json_file.write_text(json.dumps({"a.jpg": ["cat", "sofa"], "/abs/b.png": "dog,ball"}))
    assert read_labels_file(json_file) == {(tmp_path / "a.jpg").absolute(): ["cat", "sofa"],
                                           Path("/abs/b.png"): ["dog", "ball"]}
    json_file.write_text(json.dumps({"a.jpg": 3}))
    with raises_worded("must be a string or a list of strings"):
        read_labels_file(json_file)
    json_file.write_text("[1, 2]")
    with raises_worded("must hold a JSON object"):
        read_labels_file(json_file)


@pytest.fixture
def mixed_folder(tmp_path):
    """52 images in three folders, with every awkward kind of file the batch must survive or handle."""
    root = tmp_path / "photos"
    for index in range(38):
        picture(root / ("trip" if index % 2 else "home") / f"img{index:02d}.jpg", seed=index)
    special = {
        "grey.png": picture(root / "grey.png", mode="L"),
        "rgba.png": picture(root / "rgba.png", mode="RGBA"),
        "cmyk.jpg": picture(root / "cmyk.jpg", mode="CMYK"),
        "upper.JPEG": picture(root / "upper.JPEG"),
        "bitmap.bmp": picture(root / "bitmap.bmp"),
        "scan.tiff": picture(root / "scan.tiff"),
    }
    palette = Image.new("P", (40, 30))
    palette.putpalette([index % 256 for index in range(768)])
    palette.info["transparency"] = 0
    palette.save(root / "palette.png", transparency=0)
    Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)).save(root / "deep16.png")
    rotated = Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(root / "rotated.jpg", exif=exif)
    picture(root / "large.jpg", size=(3000, 2000), quality=70)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a picture")
    (root / "truncated.jpg").write_bytes(picture(tmp_path / "whole.jpg").read_bytes()[:300])
    (root / "album.png").mkdir()
    locked = picture(root / "locked.png")
    locked.chmod(0)
    return root, special


def test_a_folder_with_every_case_completes_and_counts_failures(mixed_folder, tmp_path, tiny_checkpoint):
    root, _ = mixed_folder
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    result = CliRunner().invoke(main, [str(arg) for arg in [
        "segment", root, "-r", "-l", "cat,sofa", "-o", out, "--summary", summary, *tiny_args(tiny_checkpoint)]])
    assert result.exit_code == 1, result.output
    record = json.loads(summary.read_text())
    failed = {Path(failure["image"]).name for failure in record["failures"]}
    unreadable = {"locked.png"} if os.geteuid() != 0 else set()  # root reads any file, permissions or not
    assert failed == {"empty.jpg", "text.jpg", "truncated.jpg"} | unreadable
    assert record["images"] == 52 and record["done"] == 49 - len(unreadable) and record["skipped"] == 0
    assert set(record["stages_s"]) == {"model_load_s", "label_embeddings_s", "segmenting_s"}
    assert sum(record["stages_s"].values()) <= record["seconds"]
    assert f"; segmenting {record['stages_s']['segmenting_s']:.1f} s)" in result.stdout
    assert sorted(line.split(": ")[2].rsplit("/", 1)[-1] for line in result.stderr.splitlines()
                  if line.startswith("wildseg: failed:")) == sorted(failed)
    for name in ("empty", "text", "truncated", *(path.split(".")[0] for path in unreadable)):
        assert not list(out.glob(f"{name}*")), "a failed image leaves no output"
    assert (out / "trip" / "img01.png").is_file() and (out / "home" / "img00.json").is_file()
    assert Image.open(out / "rotated.png").size == (30, 40), "the mask follows the EXIF-rotated image"
    assert Image.open(out / "large.png").size == (3000, 2000) and Image.open(out / "large_overlay.jpg").size == (64, 43)
    for name in ("grey", "rgba", "palette", "deep16", "cmyk", "upper", "bitmap", "scan"):
        assert json.loads((out / f"{name}.json").read_text())["image_size"] == {"width": 40, "height": 30}
    assert not list(out.rglob("*.part"))

    flat = CliRunner().invoke(main, [str(arg) for arg in ["segment", root, "-l", "cat", "-o", tmp_path / "flat", "-q",
                                                          *tiny_args(tiny_checkpoint)]])
    assert "album.png is a folder" in flat.stderr and flat.exit_code == 1


def test_large_images_are_segmented_at_the_working_resolution(tiny_checkpoint):
    segmenter = tiny_segmenter(tiny_checkpoint, refine="none", max_side=100)
    image = np.random.default_rng(0).integers(0, 255, (1000, 1500, 3), dtype=np.uint8)
    result = segmenter.segment(image, "cat,sofa")
    assert result.mask.shape == (1000, 1500) and result.scores.shape == (3, 67, 100)
    assert np.array_equal(result.mask, upsample_argmax(result.scores, 1000, 1500))
    preview_image, preview_mask = result.preview()
    assert preview_image.shape == (67, 100, 3) and np.array_equal(preview_mask, result.scores.argmax(0))


@pytest.mark.parametrize("crf_backend, refine_workers", [("pydensecrf", 1), ("torch", 0)])
def test_segment_many_gives_what_segment_gives(crf_backend, refine_workers, tiny_checkpoint, tmp_path, monkeypatch):
    """pydensecrf in a worker process; the torch CRF over the images a model step finishes, in batches of at
    most two of these images' pixels x classes."""
    monkeypatch.setattr(pipeline, "CRF_BATCH_VALUES", 2 * 64 * 40 * 3)
    segmenter = tiny_segmenter(tiny_checkpoint, view_batch=5, crf_iterations=2, crf_backend=crf_backend)
    assert segmenter.settings()["crf"]["backend"] == crf_backend
    paths = [picture(tmp_path / f"{index}.png", size=(48 + 8 * index, 40), seed=index) for index in range(4)]
    labels = {paths[0]: "cat", paths[1]: "cat", paths[2]: "dog,ball", paths[3]: "dog,ball"}
    items = list(segmenter.segment_many(paths + [tmp_path / "missing.png"], lambda path: labels.get(path, "cat"),
                                        refine_workers=refine_workers))
    failures = [item for item in items if item.error]
    assert len(failures) == 1 and "image not found" in failures[0].error
    by_path = {item.source: item.result for item in items if item.result is not None}
    for path in paths:
        alone = segmenter.segment(path, labels[path])
        assert by_path[path].labels == alone.labels
        assert np.allclose(by_path[path].scores, alone.scores, atol=1e-5)
        assert np.array_equal(by_path[path].mask, alone.mask)


def test_any_error_of_one_image_fails_that_image_only(tiny_checkpoint, tmp_path, monkeypatch):
    """A labels function's own error, out of GPU memory in PAMR, an error of the CRF: each fails its image. An error
    that is no user's mistake (a KeyError, a RuntimeError) says that it is a bug and leaves its traceback in the log;
    the batch goes on."""
    paths = [picture(tmp_path / f"{index}.png", size=(48 + 8 * index, 40), seed=index) for index in range(4)]
    segmenter = tiny_segmenter(tiny_checkpoint, view_batch=1000, refine="pamr+crf", crf_iterations=2,
                               crf_backend="pydensecrf")
    expected = segmenter.segment(paths[3], "cat,dog")

    def labels_of(path):
        if path == paths[0]:
            raise KeyError("no entry for 0.png")
        return "cat,dog"

    def pamr_out_of_memory_at_width_56(pixels, probabilities, settings):
        if pixels.shape[-1] == 56:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_pamr(pixels, probabilities, settings)

    def crf_failing_at_width_64(working, probabilities, crf, full_size, majority=None):
        if working.shape[1] == 64:
            raise RuntimeError("the CRF failed")
        return real_finish(working, probabilities, crf, full_size, majority)

    real_pamr, real_finish = pipeline.pamr, streaming.finish_segmentation
    monkeypatch.setattr(pipeline, "pamr", pamr_out_of_memory_at_width_56)
    monkeypatch.setattr(streaming, "finish_segmentation", crf_failing_at_width_64)
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    monkeypatch.setattr(errors.LOG, "handlers", [handler])
    items = {item.source: item for item in segmenter.segment_many(paths, labels_of, refine_workers=0)}
    bug = "(a bug in wildseg: the traceback is logged)"
    assert items[paths[0]].error == f"unexpected KeyError: 'no entry for 0.png' {bug}"
    assert items[paths[1]].error == "out of GPU memory making its probabilities: lower max_side (--max-side)"
    assert items[paths[2]].error == f"unexpected RuntimeError: the CRF failed {bug}"
    assert items[paths[3]].error is None and np.array_equal(items[paths[3]].result.mask, expected.mask)
    assert [record.exc_info[0] for record in logged] == [KeyError, RuntimeError]
    assert [record.args[0] for record in logged] == [paths[0], paths[2]]


def test_a_crf_batch_out_of_gpu_memory_is_halved_and_an_image_that_never_fits_goes_to_pydensecrf(
        tiny_checkpoint, tmp_path, monkeypatch):
    calls = []

    def crf_with_little_memory(images, probabilities, settings):
        calls.append([image.shape[1] for image in images])
        if len(images) > 1 or images[0].shape[1] == 72:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return mean_field_crf(images, probabilities, settings)

    paths = [picture(tmp_path / f"{index}.png", size=(48 + 8 * index, 40), seed=index) for index in range(4)]
    expected = {item.source: item.result for item in tiny_segmenter(
        tiny_checkpoint, view_batch=1000, crf_iterations=2, crf_backend="pydensecrf").segment_many(paths, "cat,dog")}
    monkeypatch.setattr(pipeline, "mean_field_crf", crf_with_little_memory)
    segmenter = tiny_segmenter(tiny_checkpoint, view_batch=1000, crf_iterations=2, crf_backend="torch")
    items = list(segmenter.segment_many(paths, "cat,dog"))
    assert calls[0] == [48, 56, 64, 72], "the images of one model step are refined in one batch"
    assert calls[1:] == [[48, 56], [48], [56], [64, 72], [64], [72]]
    for item in items:
        assert item.error is None
        assert np.array_equal(item.result.mask, expected[item.source].mask)
        assert np.allclose(item.result.scores, expected[item.source].scores, atol=1e-5)


def test_a_view_batch_out_of_gpu_memory_is_split_and_retried():
    sizes, failed_attempts = [], []

    def map_views(batch):
        sizes.append(len(batch))
        assert all(attempt() is None for attempt in failed_attempts), "a failed attempt's tensors are freed first"
        activations = batch * 3
        if len(batch) > 2:
            failed_attempts.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return activations[:, :1, ::8, ::8] * 2 / 3

    image = torch.rand(3, 32, 48)
    views = [View((0, 0, 48, 32), False, (32, 32)), View((0, 0, 32, 32), False, (32, 32)),
             View((16, 0, 48, 32), True, (32, 32))]
    stream = ViewStream(map_views, batch_size=8)
    finished = stream.add("a", image, views) + stream.add("b", image, views) + stream.flush()
    assert [key for key, _ in finished] == ["a", "b"] and stream.batch_size == 1
    assert sizes[:2] == [6, 3] and set(sizes[2:]) == {1} and len(sizes) == 2 + 6, "halved until it fits"
    reference = ViewStream(map_views, batch_size=1)
    expected = reference.add("a", image, views) + reference.flush()
    assert torch.allclose(finished[0][1], expected[0][1])


def test_background_writes_overlap_the_caller_are_bounded_and_report_each_outcome():
    release, started = threading.Event(), []

    def write(key):
        started.append(key)
        release.wait(timeout=10)
        if key == "bad":
            raise OSError("disk full")

    def submit_in_thread(writer, key):
        thread = threading.Thread(target=writer.submit, args=(key, lambda: write(key)))
        thread.start()
        thread.join(timeout=0.3)
        return thread

    with BackgroundWriter(threads=2) as writer:
        writer.submit("a", lambda: write("a"))
        writer.submit("bad", lambda: write("bad"))
        assert writer.finished() == [], "the caller goes on while writes are unfinished"
        blocked = submit_in_thread(writer, "c")
        assert blocked.is_alive(), "a third write waits while two (the threads) are unfinished"
        release.set()
        blocked.join(timeout=10)
        while any(not future.done() for future in writer.running):
            time.sleep(0.01)
        assert not submit_in_thread(writer, "d").is_alive(), "ended writes not yet collected do not count"
        outcomes = dict(writer.finished(wait_all=True))
    assert started[:2] == ["a", "bad"] and sorted(started) == ["a", "bad", "c", "d"]
    assert set(outcomes) == {"a", "bad", "c", "d"} and str(outcomes.pop("bad")) == "disk full"
    assert all(error is None for error in outcomes.values())


RUNNER = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "from wildseg.cli import main; main(sys.argv[2:])"
)


def start_run(folder, out, checkpoint, *extra):
    arguments = [sys.executable, "-c", RUNNER, str(CONFIG), "segment", str(folder), "-l", "cat,dog", "-o", str(out),
                 "-q", *map(str, tiny_args(checkpoint)), "--tta", "default", *extra]
    return subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_records(out: Path, count: int, process, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while record_count(out) < count:
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_second_stop_signal_while_outputs_finish_still_counts_them(tmp_path, tiny_checkpoint):
    folder, out, summary = tmp_path / "many", tmp_path / "out", tmp_path / "summary.json"
    for index in range(40):
        picture(folder / f"{index:02d}.png", size=(96, 72), seed=index)
    run = start_run(folder, out, tiny_checkpoint, "--summary", summary)
    wait_for_records(out, 3, run)
    run.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    _, errors = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in errors, errors
    counts = json.loads(summary.read_text())
    assert counts["interrupted"] and counts["done"] == len(list(out.glob("*.json"))) >= 3
    assert not list(out.glob(".*")), "no temporary file remains"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_run_resumes_and_processes_every_image_exactly_once(stop, tmp_path, tiny_checkpoint):
    folder, out = tmp_path / "many", tmp_path / "out"
    for index in range(60):
        picture(folder / f"{index:02d}.png", size=(96, 72), seed=index)
    first = start_run(folder, out, tiny_checkpoint)
    wait_for_records(out, 5, first)
    first.send_signal(stop)
    _, errors = first.communicate(timeout=60)
    assert first.returncode == (130 if stop == signal.SIGTERM else -signal.SIGKILL), errors
    assert "Traceback" not in errors
    done_first = {path.stem: path.stat().st_mtime_ns for path in out.glob("*.json")}
    assert 5 <= len(done_first) < 60
    if stop == signal.SIGTERM:
        assert not list(out.glob(".*")), "a stopped run leaves no temporary file"
    (out / ".05.png.leftover.part").write_bytes(b"half")

    second = start_run(folder, out, tiny_checkpoint, "--summary", tmp_path / "summary.json")
    _, errors = second.communicate(timeout=120)
    assert second.returncode == 0, errors
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped"] == len(done_first) and summary["done"] == 60 - len(done_first)
    for stem, modified in done_first.items():
        assert (out / f"{stem}.json").stat().st_mtime_ns == modified, "done images are not segmented again"
    for index in range(60):
        assert json.loads((out / f"{index:02d}.json").read_text())["labels"] == ["background", "cat", "dog"]
        assert Image.open(out / f"{index:02d}.png").size == (96, 72)
    assert not list(out.glob(".*")), "no temporary file remains"
