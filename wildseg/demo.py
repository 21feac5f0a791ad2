"""`wildseg demo`: a local web page (Gradio) that keeps one model loaded while labels and settings are tried.

Upload an image, type labels (or `auto` and a vocabulary), choose method, attention and refinement, and see the
overlay, the per-class table and each label's heat map; the mask PNG and the JSON record are the files `wildseg
segment` writes. Requests run one at a time in Gradio's queue, so that several users of one server wait their
turn. Mistakes come back as one line in the page, never a stack trace.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

from rich.console import Console

from .autolabels import AutoLabelRule, auto_label_record, find_labels, found_labels, load_vocabulary, rule_for
from .batch import AUTO, save_outputs
from .choices import (
    ATTENTIONS,
    AUTO_MIN_AREA,
    AUTO_MIN_SCORES,
    DEFAULT_ATTENTION,
    DEFAULT_VOCABULARY,
    METHODS,
    REFINEMENTS,
    VOCABULARIES,
)
from .errors import WildsegError, WildsegWarning, first_line
from .images import load_image
from .labels import clean_labels
from .options import build_segmenter, refuse_misplaced
from .outputs import label_slug, output_paths
from .segmenter import BatchItem

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


class DemoModels:
    """One loaded model and, kept for later requests, a Segmenter on it for each method, attention and
    refinement chosen in the page; every other setting is the command's `options` (the keyword arguments of
    `build_segmenter`; the method defaults to relevance, as on the command line)."""

    def __init__(self, options: dict, console: Console):
        self.options, self.console = {"method": "relevance", **options}, console
        first = build_segmenter(console, protocol={}, **self.options)
        self.backbone = first.backbone
        self.method, self.attention, self.refine = first.method, first.dense.attention, first.refine
        self.segmenters = {self._key(first.method, first.dense.attention, first.refine): first}

    def get(self, method: str, attention: str, refine: str):
        """The Segmenter for these choices on the loaded model, built on first use."""
        key = self._key(method, attention, refine)
        if key not in self.segmenters:
            chosen = {"method": method, "attention": key[1], "refine": refine}
            options = {**_used_by(self.options, method, refine), **chosen, "model_config": None}
            self.segmenters[key] = build_segmenter(self.console, protocol={}, backbone=self.backbone, **options)
        return self.segmenters[key]

    @staticmethod
    def _key(method: str, attention: str, refine: str) -> tuple:
        return method, attention if method == "dense" else None, refine


def _used_by(options: dict, method: str, refine: str) -> dict:
    """The options that `method` and `refine` use: a command's value for another method or refinement (say
    --window when the page asks for relevance) is left out instead of refused."""
    used = {}
    for name, value in options.items():
        try:
            refuse_misplaced({name: value}, method, refine)
        except WildsegError:
            continue
        used[name] = value
    return used


class DemoSession:
    """What the page's requests share: the models, the vocabularies `auto` may use (the built-in ones and the
    command's), the automatic-label thresholds shown first, and a folder for the files of the latest request."""

    def __init__(self, models: DemoModels, vocabulary: Optional[str] = None, auto_min_area: Optional[float] = None,
                 auto_min_score: Optional[float] = None):
        self.models = models
        self.vocabulary = vocabulary or DEFAULT_VOCABULARY
        names = dict.fromkeys([*VOCABULARIES, self.vocabulary])
        self.vocabularies = {name: load_vocabulary(name) for name in names}
        self.auto_min_area = AUTO_MIN_AREA if auto_min_area is None else auto_min_area
        self.auto_min_score = auto_min_score
        self.workspace = tempfile.TemporaryDirectory(prefix="wildseg-demo-")
        self.latest: Optional[Path] = None

    def segment(self, image, labels, vocabulary, method, attention, refine, auto_min_area, auto_min_score,
                progress=gr.Progress()):
        """The page's request (unprocessed Gradio values): overlay, status line, class table, heat maps and the
        files to download. A WildsegError becomes a one-line error in the page; warnings become notices."""
        upload = _uploaded_file(image)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", WildsegWarning)
                outputs = self._segment(upload, labels, vocabulary, method, attention, refine, auto_min_area,
                                        auto_min_score, progress)
        except WildsegError as error:
            message = str(error).replace(str(upload[0]), upload[1]) if upload else str(error)
            raise gr.Error(message, title="wildseg", print_exception=False) from None
        for warning in caught:
            if issubclass(warning.category, WildsegWarning):
                gr.Warning(str(warning.message), title="wildseg")
            else:
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        return outputs

    def _segment(self, upload, labels, vocabulary, method, attention, refine, auto_min_area, auto_min_score,
                 progress):
        if upload is None:
            raise WildsegError("no image: upload or drop an image first")
        if not isinstance(labels, str) or not labels.strip():
            raise WildsegError('no labels: type the names of what is in the image, e.g. "cat, sofa", or auto')
        started = time.perf_counter()
        path, name = upload
        segmenter = self.models.get(method, attention, refine)
        names = None if labels.strip().casefold() == AUTO else clean_labels(labels)
        rgb = load_image(path)
        auto_record = None
        if names is None:
            names, auto_record = self._auto_labels(segmenter, rgb, vocabulary, auto_min_area, auto_min_score,
                                                   progress)
        segmenter.prepare_labels(names, on_progress=_reporter(progress, "embedding labels"))
        result = segmenter.segment(rgb, names, on_progress=_reporter(progress, "test-time views"))
        paths = output_paths(Path(label_slug(Path(name).stem)), self._request_folder(),
                             heatmap_labels=result.labels)
        save_outputs(BatchItem(name, result), paths, segmenter, auto_record, {"save_scores": False, "heatmaps": True})
        rows = [[index, row["label"], round(100 * float(row["pixel_fraction"]), 2), round(row["mean_score"], 3)]
                for index, row in enumerate(result.summary())]
        heatmaps = [(str(paths[f"heatmap_{index}"]), label) for index, label in enumerate(result.labels) if index]
        status = _status_line(name, result, segmenter, auto_record, time.perf_counter() - started)
        return str(paths["overlay"]), status, rows, heatmaps, [str(paths["mask"]), str(paths["record"])]

    def _auto_labels(self, segmenter, rgb, vocabulary, min_area, min_score, progress) -> tuple[list[str], dict]:
        """The vocabulary's classes found in the image (`autolabels`) and the record of every candidate."""
        if vocabulary not in self.vocabularies:
            raise WildsegError(f"unknown vocabulary {vocabulary!r}: use one of {', '.join(self.vocabularies)}")
        for what, value in (("least share of the image", min_area), ("least mean score", min_score)):
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise WildsegError(f"the {what} of automatic labels must lie in 0..1, got {value!r}")
        classes = self.vocabularies[vocabulary]
        rule = rule_for(AutoLabelRule(AUTO_MIN_AREA if min_area is None else min_area, min_score), segmenter.method)
        prompts = [prompt for entry in classes for prompt in entry.prompts]
        segmenter.prepare_labels(prompts, on_progress=_reporter(progress, f"embedding the {vocabulary} vocabulary"))
        candidates = find_labels(segmenter, rgb, classes, rule)
        return found_labels(candidates, rule), auto_label_record(vocabulary, rule, candidates)

    def _request_folder(self) -> Path:
        """A fresh folder for this request's files; the previous request's is removed (Gradio has copied its
        files into its own cache by now, and requests run one at a time)."""
        if self.latest is not None:
            shutil.rmtree(self.latest, ignore_errors=True)
        self.latest = Path(tempfile.mkdtemp(prefix="request-", dir=self.workspace.name))
        return self.latest

    def close(self) -> None:
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
    how = segmenter.method + (f" ({segmenter.dense.attention})" if segmenter.method == "dense" else "")
    line = (f"**{name}** ({width} x {height}): {', '.join(result.labels[1:])}; {how}, refine {segmenter.refine}, "
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
                    attention = gr.Dropdown(list(ATTENTIONS), value=models.attention or DEFAULT_ATTENTION,
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
    """`wildseg demo`: load the model from `options` (the keyword arguments of `options.build_segmenter`, as the
    CLI's segmenter options give them), serve the page until Ctrl-C or SIGTERM, then stop cleanly. The line with
    the page's address is printed also when `quiet` hides the status line of the model's loading."""
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
