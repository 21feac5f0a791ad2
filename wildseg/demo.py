"""`wildseg demo`: a local web page (Gradio) that keeps one model loaded while labels and settings are tried.

Upload an image, type labels (or `auto` and a vocabulary), choose method, attention and refinement, and see the
overlay, the per-class table and each label's heat map; the mask PNG and the JSON record are the files `wildseg
segment` writes. Requests run one at a time in Gradio's queue (the model is one), so that several users of one
server wait their turn; nothing a request does depends on that (its notices and files are its own). Mistakes come
back as one line in the page, never a stack trace.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from rich.console import Console

from . import methods
from .autolabels import AutoLabelRule, load_vocabulary, segment_with_found_labels, vocabulary_prompts
from .batch import AUTO, save_outputs
from .provenance import automatic_labels_request, image_request, run_request
from .choices import (
    AUTO_MIN_AREA,
    AUTO_MIN_SCORES,
    DEFAULT_ATTENTION,
    DEFAULT_VOCABULARY,
    METHODS,
    REFINEMENTS,
    VOCABULARIES,
)
from .config import applies
from .errors import WildsegError, first_line
from .factory import build_segmenter, loading_message
from .images import load_image
from .labels import clean_labels
from .outputs import label_slug, output_paths
from .streaming import BatchItem

INSTALL_DEMO = "pip install 'wildseg[demo]'"
"""How to install what the demo needs beyond wildseg (Gradio)."""

try:
    import gradio as gr
except ImportError as missing:
    raise WildsegError(f"wildseg demo needs Gradio ({first_line(missing)}): {INSTALL_DEMO}") from None

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
TABLE_HEADERS = ["class", "label", "share of image (%)", "mean score"]
HEATMAPS_HEIGHT = 480
"""Pixels of the heat-map gallery: a row of three (more scroll)."""
CACHE_SWEEP_S = 3600
"""Gradio's copies of uploads and results older than this are deleted this often (all of them when it stops)."""
KEPT_REQUESTS = 16
"""The folders of this many latest requests are kept (Gradio copies their files into its own cache)."""
PAGE_WORDS = {"labels": "the labels", "vocab": "the vocabulary", "auto_min_area": "auto min area",
              "auto_min_score": "auto min score", "refine": "refinement"}
"""How the page names the settings an error message marks (`errors.setting`)."""


class DemoModels:
    """One loaded model and, kept for later requests, a Segmenter on it for each method, attention and refinement
    chosen in the page; every other setting is the command's `options` (`factory.build_segmenter`'s; the method
    defaults to relevance, as on the command line)."""

    def __init__(self, options: dict, console: Console):
        self.options, self.console = {"method": "relevance", **options}, console
        with console.status(loading_message(self.options)) if console.is_terminal else contextlib.nullcontext():
            first = build_segmenter(self.options)
        self.backbone = first.backbone
        config = first.config
        self.method, self.refine = config.method, config.refine
        self.attention = config.resolved("attention") if config.method == "dense" else None
        self.segmenters = {self._key(self.method, self.attention, self.refine): first}
        self.requests = {self._key(self.method, self.attention, self.refine): run_request(self.options)}

    def get(self, method: str, attention: str, refine: str):
        """The Segmenter for these choices on the loaded model, built on first use."""
        key = self._key(method, attention, refine)
        if key not in self.segmenters:
            chosen = {"method": method, "attention": key[1], "refine": refine}
            options = {**_used_by(self.options, method, refine, key[1]), **chosen}
            self.segmenters[key] = build_segmenter(options, backbone=self.backbone)
            self.requests[key] = run_request(options)
        return self.segmenters[key]

    def request(self, method: str, attention: str, refine: str) -> dict:
        """The settings that decide the masks of these choices (`provenance.run_request`), once `get` built them."""
        return self.requests[self._key(method, attention, refine)]

    @staticmethod
    def _key(method: str, attention: str, refine: str) -> tuple:
        return method, attention if method == "dense" else None, refine


def _used_by(options: dict, method: str, refine: str, attention: str) -> dict:
    """The options that `method` (with dense method `attention`) and `refine` use: a command's value for another
    method or refinement (say window when the page asks for relevance) is left out instead of refused."""
    return {name: value for name, value in options.items() if applies(name, method, refine, attention)}


class DemoSession:
    """What the page's requests share: the models, the vocabularies `auto` may use (the built-in ones and the
    command's), the automatic-label thresholds shown first, and a folder with a sub-folder per recent request."""

    def __init__(self, models: DemoModels, vocabulary: Optional[str] = None, auto_min_area: Optional[float] = None,
                 auto_min_score: Optional[float] = None):
        self.models = models
        self.vocabulary = vocabulary or DEFAULT_VOCABULARY
        names = dict.fromkeys([*VOCABULARIES, self.vocabulary])
        self.vocabularies = {name: load_vocabulary(name) for name in names}
        self.auto_min_area = AUTO_MIN_AREA if auto_min_area is None else auto_min_area
        self.auto_min_score = auto_min_score
        self.workspace = tempfile.TemporaryDirectory(prefix="wildseg-demo-")
        self.requests: deque[Path] = deque()
        self.requests_lock = threading.Lock()

    def segment(self, image, labels, vocabulary, method, attention, refine, auto_min_area, auto_min_score,
                progress=gr.Progress()):
        """The page's request (unprocessed Gradio values): overlay, status line, class table, heat maps and the
        files to download. A WildsegError becomes a one-line error in the page; the request's notices (merged
        duplicate labels) become notices in the page."""
        upload = _uploaded_file(image)
        notices: list[str] = []
        try:
            outputs = self._segment(upload, labels, vocabulary, method, attention, refine, auto_min_area,
                                    auto_min_score, progress, notices.append)
        except WildsegError as error:
            message = error.worded(lambda name: PAGE_WORDS.get(name, name))
            message = message.replace(str(upload[0]), upload[1]) if upload else message
            raise gr.Error(message, title="wildseg", print_exception=False) from None
        for notice in notices:
            gr.Warning(notice, title="wildseg")
        return outputs

    def _segment(self, upload, labels, vocabulary, method, attention, refine, auto_min_area, auto_min_score,
                 progress, on_notice):
        if upload is None:
            raise WildsegError("no image: upload or drop an image first")
        if not isinstance(labels, str) or not labels.strip():
            raise WildsegError('no labels: type the names of what is in the image, e.g. "cat, sofa", or auto')
        started = time.perf_counter()
        path, name = upload
        segmenter = self.models.get(method, attention, refine)
        if labels.strip().casefold() == AUTO:
            item, asked = self._auto_labels(segmenter, path, vocabulary, auto_min_area, auto_min_score, progress)
            result, auto_record = item.result, item.auto_labels
        else:
            names = clean_labels(labels, on_notice)
            segmenter.prepare_labels(names, on_progress=_reporter(progress, "embedding labels"))
            result = segmenter.segment(load_image(path), names, on_progress=_reporter(progress, "test-time views"))
            auto_record, asked = None, {"labels": names}
        paths = output_paths(Path(label_slug(Path(name).stem)), self._request_folder(),
                             heatmap_labels=result.labels)
        save_outputs(BatchItem(name, result, auto_labels=auto_record), paths, segmenter,
                     {"save_scores": False, "heatmaps": True},
                     image_request(self.models.request(method, attention, refine), asked))
        rows = [[index, row["label"], round(100 * float(row["pixel_fraction"]), 2), round(row["mean_score"], 3)]
                for index, row in enumerate(result.summary())]
        heatmaps = [(str(paths[f"heatmap_{index}"]), label) for index, label in enumerate(result.labels) if index]
        status = _status_line(name, result, segmenter, auto_record, time.perf_counter() - started)
        return str(paths["overlay"]), status, rows, heatmaps, [str(paths["mask"]), str(paths["record"])]

    def _auto_labels(self, segmenter, path: Path, vocabulary, min_area, min_score, progress
                     ) -> tuple[BatchItem, dict]:
        """The image segmented with the vocabulary's classes found in it (`autolabels`, as `wildseg segment`
        does), with the record of every candidate, and what decided them (`provenance.automatic_labels_request`);
        a one-line error where none is found."""
        if vocabulary not in self.vocabularies:
            raise WildsegError(f"unknown vocabulary {vocabulary!r}: use one of {', '.join(self.vocabularies)}")
        for what, value in (("least share of the image", min_area), ("least mean score", min_score)):
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise WildsegError(f"the {what} of automatic labels must lie in 0..1, got {value!r}")
        classes = self.vocabularies[vocabulary]
        rule = AutoLabelRule(AUTO_MIN_AREA if min_area is None else min_area, min_score)
        segmenter.prepare_labels(vocabulary_prompts(classes),
                                 on_progress=_reporter(progress, f"embedding the {vocabulary} vocabulary"))
        (item,) = segment_with_found_labels(segmenter, [path], vocabulary, classes, rule, refine_workers=0)
        if item.error is not None:
            raise WildsegError(item.error)
        return item, automatic_labels_request(vocabulary, classes, rule)

    def _request_folder(self) -> Path:
        """A fresh folder for this request's files; the oldest beyond KEPT_REQUESTS is removed (Gradio has copied
        its files into its own cache long before)."""
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.workspace.name))
        with self.requests_lock:
            self.requests.append(folder)
            expired = self.requests.popleft() if len(self.requests) > KEPT_REQUESTS else None
        if expired is not None:
            shutil.rmtree(expired, ignore_errors=True)
        return folder

    def close(self) -> None:
        """Remove the requests' files."""
        self.workspace.cleanup()


def _reporter(progress, what: str):
    """An `on_progress(done, total)` callback that moves the page's progress bar."""
    return lambda done, total: progress((done, total), desc=what)


def _uploaded_file(image) -> Optional[tuple[Path, str]]:
    """The uploaded file's path in Gradio's cache and the name it was uploaded under, or None without an image."""
    if not isinstance(image, dict) or not image.get("path"):
        return None
    path = Path(image["path"])
    return path, image.get("orig_name") or path.name


def _status_line(name: str, result, segmenter, auto_record: Optional[dict], seconds: float) -> str:
    """One line under the overlay: what was segmented, how, in how long; with auto, what was found."""
    height, width = result.mask.shape
    config = segmenter.config
    how = config.method + (f" ({config.resolved('attention')})" if config.method == "dense" else "")
    line = (f"**{name}** ({width} x {height}): {', '.join(result.labels[1:])}; {how}, refine {config.refine}, "
            f"{seconds:.1f} s")
    if auto_record is not None:
        line += (f". Found in `{auto_record['vocabulary']}` among {len(auto_record['candidates'])} candidates "
                 "(all of them in the JSON record)")
    return line


def build_app(session: DemoSession) -> gr.Blocks:
    """The page: inputs on the left, overlay, status and class table on the right, heat maps and downloads below.
    The segment request is `/segment` in Gradio's API (gradio_client: `client.predict(..., api_name="/segment")`)."""
    models = session.models
    settings = models.get(models.method, models.attention, models.refine).settings()
    score_defaults = ", ".join(f"{score} {method}" for method, score in AUTO_MIN_SCORES.items())
    with gr.Blocks(title="wildseg demo", analytics_enabled=False, delete_cache=(CACHE_SWEEP_S, CACHE_SWEEP_S)) as app:
        gr.Markdown(f"## wildseg demo\nTraining-free zero-shot segmentation with CLIP: **{settings['model']}** "
                    f"({settings['weights']}) on {settings['device']}. Type labels, or `auto` to find them in a "
                    "vocabulary; change a word and segment again, the model stays loaded.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Image", elem_id="image", sources=["upload", "clipboard"])
                labels = gr.Textbox(label="Labels", elem_id="labels", placeholder="cat, sofa    (or: auto)",
                                    info="comma-separated names; 'auto' finds them in the vocabulary below")
                with gr.Row():
                    method = gr.Dropdown(list(METHODS), value=models.method, label="Method", elem_id="method")
                    attention = gr.Dropdown(list(methods.names(methods.DENSE)),
                                            value=models.attention or DEFAULT_ATTENTION,
                                            label="Attention (dense)", elem_id="attention",
                                            interactive=models.method == "dense")
                    refine = gr.Dropdown(list(REFINEMENTS), value=models.refine, label="Refinement", elem_id="refine")
                with gr.Accordion("Automatic labels (labels: auto)", open=False):
                    vocabulary = gr.Dropdown(list(session.vocabularies), value=session.vocabulary,
                                             label="Vocabulary", elem_id="vocabulary")
                    with gr.Row():
                        min_area = gr.Number(session.auto_min_area, label="auto min area", minimum=0, maximum=1,
                                             step=0.005, info="least share of the image a found class covers")
                        min_score = gr.Number(session.auto_min_score, label="auto min score", minimum=0, maximum=1,
                                              step=0.05, info=f"least mean score; empty: {score_defaults}")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                overlay = gr.Image(type="filepath", label="Overlay", elem_id="overlay", interactive=False)
                status = gr.Markdown(elem_id="status")
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["number", "str", "number", "number"],
                                     label="Classes", elem_id="classes", interactive=False)
                files = gr.File(label="Mask PNG (pixel value = class) and JSON record", elem_id="files",
                                file_count="multiple", interactive=False)
        heatmaps = gr.Gallery(label="Heat maps (probability, 0-1)", elem_id="heatmaps", columns=3, fit_columns=False,
                              height=HEATMAPS_HEIGHT, object_fit="contain")
        method.change(lambda chosen: gr.Dropdown(interactive=chosen == "dense"), method, attention, queue=False,
                      api_visibility="private")
        gr.on([button.click, labels.submit], session.segment,
              [image, labels, vocabulary, method, attention, refine, min_area, min_score],
              [overlay, status, table, heatmaps, files], api_name="segment", preprocess=False,
              show_progress_on=overlay)
    return app


def serve(session: DemoSession, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> gr.Blocks:
    """Start the page on http://host:port in the background, one request at a time; returns the running app
    (`app.local_url`, `app.close()`)."""
    app = build_app(session)
    app.queue(default_concurrency_limit=1)
    try:
        app.launch(server_name=host, server_port=port, show_error=False, quiet=True, prevent_thread_lock=True,
                   ssr_mode=False)
    except OSError as error:
        raise WildsegError(f"cannot serve the demo on {host}:{port}: {first_line(error)}") from None
    return app


def launch(options: dict, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, vocabulary: Optional[str] = None,
           auto_min_area: Optional[float] = None, auto_min_score: Optional[float] = None, quiet: bool = False) -> None:
    """`wildseg demo`: load the model from `options` (`factory.build_segmenter`'s, as the command's segmenter options
    give them), serve the page until Ctrl-C or SIGTERM, then stop cleanly. The line with the page's address is
    printed also when `quiet` hides the status line of the model's loading."""
    if vocabulary is not None:
        load_vocabulary(vocabulary)  # a wrong --vocab fails at once, not after the model has loaded
    console = Console(stderr=True, quiet=quiet)
    session = DemoSession(DemoModels(options, console), vocabulary, auto_min_area, auto_min_score)
    try:
        app = serve(session, host, port)
        Console(stderr=True).print(f"wildseg demo on {app.local_url} (Ctrl-C stops it)", soft_wrap=True,
                                   highlight=False)
        _run_until_stopped(app)
    finally:
        session.close()


def _run_until_stopped(app: gr.Blocks) -> None:
    """Wait until Ctrl-C or SIGTERM (a service manager, `docker stop`), then close the app."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        app.close()


def _interrupt(signal_number, frame) -> None:
    raise KeyboardInterrupt
