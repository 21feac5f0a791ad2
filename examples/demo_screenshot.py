"""Screenshot `wildseg demo` in a headless Chromium: start the demo, upload a photo, type labels, segment, and save
the page once the overlay, the class table and the heat maps are shown (how docs/demo.png is made).

    python examples/demo_screenshot.py docs/demo.png --checkpoint random_vitb16.pt --activation gelu --device cpu

Needs `pip install 'wildseg[demo]'` and a Chromium (Debian: `apt-get install chromium`), driven by Playwright.
"""

import argparse
import json
import shutil
import socket
from pathlib import Path

from playwright.sync_api import sync_playwright
from rich.console import Console

from wildseg.demo import DemoModels, DemoSession, serve

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
"""Debian's Chromium (`apt-get install chromium`), which Playwright drives as it is."""
VIEWPORT = {"width": 1280, "height": 1180}


def free_port() -> int:
    """A TCP port nobody listens on now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def drive_demo(url: str, image: Path, labels: str, screenshot: Path, chromium: str = CHROMIUM,
               timeout_s: float = 120) -> dict:
    """Open the demo at `url` in headless Chromium, upload `image`, type `labels`, press Segment, wait until the
    overlay image is decoded and the heat maps are shown, and save a screenshot of the page. Returns what the page
    shows: the overlay's natural size, the class table's rows (as text) and the heat maps' count."""
    timeout_ms = timeout_s * 1000
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url, timeout=timeout_ms)
            page.set_input_files("#image input[type=file]", str(image), timeout=timeout_ms)
            page.wait_for_selector("#image img", timeout=timeout_ms)  # the upload is done: its preview shows
            page.fill("#labels textarea", labels)
            page.click("#segment")
            page.wait_for_function("() => (document.querySelector('#overlay img')?.naturalWidth ?? 0) > 0",
                                   timeout=timeout_ms)
            page.wait_for_function("() => [...document.querySelectorAll('#heatmaps img')].some(img => "
                                   "img.complete && img.naturalWidth > 0)", timeout=timeout_ms)
            page.screenshot(path=str(screenshot), full_page=True)
            return {
                "overlay_size": page.eval_on_selector("#overlay img", "img => [img.naturalWidth, img.naturalHeight]"),
                "classes": page.eval_on_selector_all(
                    "#classes .virtual-row", "rows => rows.map(row => [...row.querySelectorAll('[role=gridcell]')]"
                                             ".map(cell => cell.innerText.trim()))"),
                "heatmaps": page.eval_on_selector_all("#heatmaps img", "images => images.length"),
            }
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="where to write the screenshot (PNG)")
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "images" / "chelsea.jpg")
    parser.add_argument("--labels", default="cat, sofa")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture")
    parser.add_argument("--pretrained", default="openai", help="open_clip pretrained tag")
    parser.add_argument("--model-config", type=Path, help="an open_clip model config JSON to register first")
    parser.add_argument("--checkpoint", type=Path, help="local weights")
    parser.add_argument("--activation", default="auto",
                        help="MLP activation: auto, gelu (make_random_checkpoint.py's files) or quickgelu")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--chromium", default=CHROMIUM, help="the Chromium executable")
    arguments = parser.parse_args()
    options = {"model": arguments.model, "pretrained": arguments.pretrained, "model_config": arguments.model_config,
               "checkpoint": arguments.checkpoint, "activation": arguments.activation, "device": arguments.device}
    session = DemoSession(DemoModels(options, Console(stderr=True)))
    app = serve(session, port=free_port())
    try:
        shown = drive_demo(app.local_url, arguments.image, arguments.labels, arguments.output, arguments.chromium)
    finally:
        app.close()
        session.close()
    print(json.dumps(shown))


if __name__ == "__main__":
    main()
