"""`wildseg demo` on the tiny model: its HTTP API (gradio_client) gives Segmenter.segment's mask for the same
settings, mistakes come back as one line, requests run one at a time, and a real headless Chromium renders it."""

import importlib.util
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, raises_worded, shared_dataset, tiny_cli_args, tiny_segmenter
from PIL import Image

gradio = pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[dev,demo]'")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from rich.console import Console  # noqa: E402

from wildseg.autolabels import AutoLabelRule, find_labels, found_labels, load_vocabulary  # noqa: E402
from wildseg.demo import INSTALL_DEMO, DemoModels, DemoSession, launch, serve  # noqa: E402
from wildseg.errors import WildsegError  # noqa: E402
from wildseg.segmenter import Segmenter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # Gradio's own use of pandas
ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "tests" / "configs" / f"{TINY_MODEL}.json"
CHELSEA = ROOT / "examples" / "images" / "chelsea.jpg"
CAMVID_LABELS = "sky, building, road, tree, car"
CRF_ITERS = 2
BG_THRESHOLD = 0.2
BACKGROUND_WORDS = ("sidewalk",)
COMMAND = ("dense", "sclip", "pamr+crf")
"""The method, attention and refinement the demo is started with (`wildseg demo --method dense ...`)."""
SCREENSHOT_SCRIPT = ROOT / "examples" / "demo_screenshot.py"
_spec = importlib.util.spec_from_file_location("demo_screenshot", SCREENSHOT_SCRIPT)
demo_screenshot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_screenshot)


def demo_options(checkpoint) -> dict:
    """The keyword arguments of `build_segmenter` the demo is started with, as `wildseg demo` passes its options;
    a background threshold and background words under which the random tiny model finds several classes."""
    method, attention, refine = COMMAND
    return {"model": TINY_MODEL, "checkpoint": checkpoint, "activation": "gelu", "device": "cpu",
            "templates": "photo", "tta": "none", "method": method, "attention": attention, "refine": refine,
            "crf_iterations": CRF_ITERS, "bg_threshold": BG_THRESHOLD, "background_words": BACKGROUND_WORDS}


def reference_segmenter(checkpoint, method, attention="naclip", refine="crf") -> Segmenter:
    """A Segmenter of its own (the model loaded again) with the settings the demo uses for these page choices:
    the command's options that apply to them."""
    dense = dict(attention=attention, background_words=BACKGROUND_WORDS) if method == "dense" else {}
    crf = {"crf_iterations": CRF_ITERS} if "crf" in refine else {}
    return tiny_segmenter(checkpoint, activation="gelu", tta="none", method=method, refine=refine,
                          bg_threshold=BG_THRESHOLD, **dense, **crf)


@pytest.fixture(scope="module")
def demo(tiny_checkpoint):
    """The demo served on a free port of 127.0.0.1: (session, URL)."""
    session = DemoSession(DemoModels(demo_options(tiny_checkpoint), Console(quiet=True)))
    app = serve(session, "127.0.0.1", demo_screenshot.free_port())
    yield session, app.local_url
    app.close()
    session.close()


@pytest.fixture(scope="module")
def chromium() -> str:
    pytest.importorskip("playwright", reason="the browser tests need Playwright (dev extra): pip install -e '.[dev]'")
    if not Path(demo_screenshot.CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {demo_screenshot.CHROMIUM}: apt-get install chromium")
    return demo_screenshot.CHROMIUM


@pytest.fixture(scope="module")
def client(demo, tmp_path_factory):
    return Client(demo[1], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> Path:
    """A real CamVid street photo at half size (240 x 180)."""
    source = shared_dataset("camvid") / "images" / "0001TP_008550.png"
    path = tmp_path_factory.mktemp("street") / "street.png"
    Image.open(source).convert("RGB").resize((240, 180), Image.BILINEAR).save(path)
    return path


def request(client: Client, image, labels: str, method="relevance", attention="naclip", refine="crf",
            vocabulary="coco", min_area=0.01, min_score=None):
    """The page's segment request through the API: overlay, status, table, heat maps, files."""
    return client.predict(None if image is None else handle_file(str(image)), labels, vocabulary, method, attention,
                          refine, min_area, min_score, api_name="/segment")


@pytest.mark.parametrize("method, attention, refine", [
    COMMAND,                              # the command's own settings
    ("relevance", "naclip", "crf"),       # chosen in the page: another Segmenter on the same loaded model, without
])                                        # the dense method's background words
def test_the_api_returns_segment_s_mask_table_heat_maps_and_record(demo, client, street, tiny_checkpoint, method,
                                                                   attention, refine):
    overlay, status, table, heatmaps, files = request(client, street, CAMVID_LABELS, method, attention, refine)
    models = demo[0].models
    assert models.get(method, attention, refine).backbone is models.backbone, "the model is loaded once"
    segmenter = reference_segmenter(tiny_checkpoint, method, attention, refine)
    expected = segmenter.segment(street, CAMVID_LABELS)
    mask_path, record_path = map(Path, files)
    assert (mask_path.name, record_path.name) == ("street.png", "street.json")
    mask_png = Image.open(mask_path)
    assert mask_png.mode == "P"
    mask = np.array(mask_png)
    assert mask.shape == (180, 240) and np.array_equal(mask, expected.mask)
    assert len(np.unique(mask)) >= 3, "a mask with several classes, so that equality means something"
    record = json.loads(record_path.read_text())
    assert record["labels"] == expected.labels == ["background", "sky", "building", "road", "tree", "car"]
    assert record["settings"] == json.loads(json.dumps(segmenter.settings()))
    assert record["settings"]["crf"]["iterations"] == CRF_ITERS
    assert [row["pixel_fraction"] for row in record["classes"]] == pytest.approx(
        [row["pixel_fraction"] for row in expected.summary()], abs=1e-12)
    assert table["headers"] == ["class", "label", "share of image (%)", "mean score"]
    counts = np.bincount(mask.ravel(), minlength=6)
    assert [row[:3] for row in table["data"]] == [[index, label, round(100 * counts[index] / mask.size, 2)]
                                                  for index, label in enumerate(expected.labels)]
    assert [row[3] for row in table["data"]] == [round(row["mean_score"], 3) for row in expected.summary()]
    assert [item["caption"] for item in heatmaps] == expected.labels[1:]
    assert all(Image.open(item["image"]).size == (240, 180) for item in heatmaps)
    assert Image.open(overlay).size == (240, 180)
    assert status.startswith("**street.png** (240 x 180): sky, building, road, tree, car; " + method)


def test_auto_finds_the_labels_that_autolabels_finds(client, street, tiny_checkpoint):
    """`auto` in the page: the vocabulary's classes by the page's thresholds, then segmented like given labels."""
    _, status, table, _, files = request(client, street, " Auto ", vocabulary="voc", min_area=0.05, min_score=0.0)
    segmenter = reference_segmenter(tiny_checkpoint, "relevance")
    rule = AutoLabelRule(min_area=0.05, min_score=0.0)
    candidates = find_labels(segmenter, street, load_vocabulary("voc"), rule)
    names = found_labels(candidates, rule)
    assert 1 <= len(names) < len(candidates), "the area threshold keeps some candidates and drops others"
    record = json.loads(Path(files[1]).read_text())
    assert record["labels"] == ["background", *names]
    assert record["auto_labels"]["vocabulary"] == "voc"
    assert [item["label"] for item in record["auto_labels"]["candidates"]] == [item.label for item in candidates]
    assert np.array_equal(np.array(Image.open(files[0])), segmenter.segment(street, names).mask)
    assert [row[1] for row in table["data"]] == ["background", *names]
    assert f"Found in `voc` among {len(candidates)} candidates" in status


def test_mistakes_come_back_as_one_line_naming_the_fix(client, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("this is no photo")
    cases = [
        (dict(image=None, labels="cat"), "no image: upload or drop an image first"),
        (dict(image=CHELSEA, labels="  "), "no labels: type the names of what is in the image"),
        (dict(image=CHELSEA, labels="cat, Background"), "'background' is reserved for pixels that match no label"),
        (dict(image=broken, labels="cat"), "broken.jpg is not an image file Pillow can read"),
        (dict(image=CHELSEA, labels="auto", vocabulary="klingon"),
         "unknown vocabulary 'klingon': use one of voc, coco, ade"),
        (dict(image=CHELSEA, labels="auto", vocabulary="voc", min_area=2),
         "the least share of the image of automatic labels must lie in 0..1, got 2"),
        (dict(image=CHELSEA, labels="cat", method="fancy"), "unknown method 'fancy': use one of relevance, dense"),
        (dict(image=CHELSEA, labels="cat", method="dense", attention="psychic"), "unknown attention 'psychic'"),
    ]
    for arguments, expected in cases:
        with pytest.raises(AppError) as caught:
            request(client, **arguments)
        message = str(caught.value)
        assert message.startswith(expected), (arguments, message)
        assert "\n" not in message and "Traceback" not in message and "/gradio/" not in message


def test_duplicate_labels_are_merged_with_a_notice_and_segmented_once(client, monkeypatch):
    notices = []
    monkeypatch.setattr(gradio, "Warning", lambda message, **options: notices.append(message))
    _, status, table, heatmaps, _ = request(client, CHELSEA, "cat, sofa, Cat")
    assert notices == ["duplicate label 'Cat' merged with 'cat'"]
    assert [row[1] for row in table["data"]] == ["background", "cat", "sofa"] and len(heatmaps) == 2
    assert ": cat, sofa;" in status


def test_requests_of_several_users_run_one_at_a_time(demo, client, monkeypatch):
    session, url = demo
    running, most = [0], [0]
    lock = threading.Lock()
    segment = session._segment

    def counted(*arguments):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.3)  # long enough for the other requests to arrive while this one runs
            return segment(*arguments)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(session, "_segment", counted)
    users = [Client(url, verbose=False) for _ in range(3)]
    jobs = [user.submit(handle_file(str(CHELSEA)), "cat, sofa", "coco", "relevance", "naclip", "crf", 0.01, None,
                        api_name="/segment") for user in users]
    masks = [np.array(Image.open(job.result(timeout=120)[4][0])) for job in jobs]
    assert most[0] == 1
    assert all(np.array_equal(mask, masks[0]) for mask in masks)


def test_a_headless_chromium_shows_the_error_then_the_overlay_table_and_heat_maps(demo, chromium, tiny_checkpoint,
                                                                                   tmp_path):
    """The page as a user sees it (Debian's Chromium driven by Playwright): Segment without an image shows the
    one-line message; then upload, type labels, Segment: the overlay is decoded and the table holds the shares."""
    from playwright.sync_api import sync_playwright

    _, url = demo
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url)
        page.fill("#labels textarea", "cat")
        page.click("#segment")
        page.get_by_text("no image: upload or drop an image first").wait_for(timeout=30_000)
        assert "Traceback" not in page.inner_text("body")
        browser.close()
    screenshot = tmp_path / "demo.png"
    shown = demo_screenshot.drive_demo(url, CHELSEA, "cat, sofa", screenshot, chromium, timeout_s=60)
    expected = reference_segmenter(tiny_checkpoint, *COMMAND).segment(CHELSEA, "cat, sofa")
    assert shown["overlay_size"] == [451, 300]
    assert [row[1] for row in shown["classes"]] == ["background", "cat", "sofa"]
    assert [float(row[2]) for row in shown["classes"]] == [round(100 * row["pixel_fraction"], 2)
                                                           for row in expected.summary()]
    assert shown["heatmaps"] == 2
    assert Image.open(screenshot).size[0] == demo_screenshot.VIEWPORT["width"]


def test_the_screenshot_script_writes_the_page_as_rendered(chromium, tiny_checkpoint, tmp_path):
    """examples/demo_screenshot.py, which makes docs/demo.png, run as a user runs it."""
    screenshot = tmp_path / "shot.png"
    result = subprocess.run([sys.executable, str(SCREENSHOT_SCRIPT), str(screenshot), "--model", TINY_MODEL,
                             "--model-config", str(TINY_CONFIG), "--checkpoint", str(tiny_checkpoint),
                             "--activation", "gelu", "--device", "cpu", "--chromium", chromium],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(shown) == {"overlay_size", "classes", "heatmaps"}, "it says what the page showed"
    width, height = Image.open(screenshot).size
    assert width == demo_screenshot.VIEWPORT["width"] and height >= demo_screenshot.VIEWPORT["height"]


def test_wildseg_demo_serves_the_page_until_stopped(tiny_checkpoint):
    """`wildseg demo -q`: one line with the address once the model is loaded, the page there, and a clean exit
    on SIGTERM (as on Ctrl-C, which Python turns into the same KeyboardInterrupt)."""
    port = demo_screenshot.free_port()
    command = [sys.executable, "-m", "wildseg.cli", "demo", "-q", "--port", str(port), "--model-config",
               str(TINY_CONFIG), *map(str, tiny_cli_args(tiny_checkpoint))]
    server = subprocess.Popen(command, cwd=ROOT, text=True, stderr=subprocess.PIPE)
    watchdog = threading.Timer(120, server.kill)  # a server that never says where it is fails the test, not hangs
    watchdog.start()
    try:
        line = next((line for line in server.stderr if line.startswith("wildseg demo on")), "")
        assert line.strip() == f"wildseg demo on http://127.0.0.1:{port}/ (Ctrl-C stops it)"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert page.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as answer:
            config = json.load(answer)
        assert config["title"] == "wildseg demo"
        assert "segment" in [dependency.get("api_name") for dependency in config["dependencies"]]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        watchdog.cancel()
        server.kill()
        server.stderr.close()


def test_a_wrong_vocabulary_fails_before_the_model_loads(tmp_path):
    with raises_worded("^unknown vocabulary 'klingon': use voc, coco, ade or the path of a"):
        launch({"model": TINY_MODEL, "checkpoint": tmp_path / "absent.pt"}, vocabulary="klingon")


def test_a_busy_port_is_one_line(demo):
    session, url = demo
    busy = int(url.rstrip("/").rsplit(":", 1)[1])
    with raises_worded(f"^cannot serve the demo on 127.0.0.1:{busy}: Cannot find empty port"):
        serve(session, "127.0.0.1", busy)


class _WithoutGradio:
    """An import hook that finds no module named gradio, as where the demo extra is not installed."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "gradio":
            raise ModuleNotFoundError("No module named 'gradio'", name=name)
        return None


def test_without_gradio_the_demo_names_the_extra_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "gradio")
    monkeypatch.setattr(sys, "meta_path", [_WithoutGradio, *sys.meta_path])
    spec = importlib.util.spec_from_file_location("wildseg.demo_without_gradio", ROOT / "wildseg" / "demo.py")
    with pytest.raises(WildsegError) as caught:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert str(caught.value) == f"wildseg demo needs Gradio (No module named 'gradio'): {INSTALL_DEMO}"
