"""What decides an image's mask, known before the model loads: written into each image's JSON record as `request`
and compared on a rerun, so that an output folder done with other settings is never passed off as done with these.

The device is not part of it (a GPU's fp16 and the CPU's fp32 differ by rounding, and a run interrupted on one
machine may be finished on another); nor are the threads, the progress display, the summary file, the label cache
or the CRF's implementation (`crf_backend`: both compute the same marginals) and the model batch size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .choices import AUTO_MIN_SCORES, VOCABULARIES
from .config import SegmenterConfig, applies
from .errors import checkpoint_not_found, model_config_not_a_file

if TYPE_CHECKING:
    from .autolabels import AutoLabelRule
    from .datasets.classes import ClassName

MASK_NEUTRAL = frozenset({"view_batch", "crf_backend", "templates"})
"""Configuration fields that do not enter the request as they are: the first two do not change the mask, the
templates enter as their text (`template_text`)."""

MODEL_OPTIONS = ("model", "pretrained", "activation")
"""Model options that enter the request as given (with a checkpoint, `pretrained` is not used)."""


def run_request(options: dict) -> dict:
    """The settings of a run that decide every image's mask, from the options as `factory.build_segmenter` takes
    them (paths absolute).

    Args:
        options: the segmenter options (`cli.options.segmenter_values`).

    Returns:
        A JSON-ready dict: the model (architecture, pretrained tag or the checkpoint file with its size and
        modification time, the model config file's hash, the activation asked for), the templates' text, and every
        configuration setting the method and refinement use, with its value in effect.
    """
    config = SegmenterConfig.from_options(options)
    request = {name: options.get(name) for name in MODEL_OPTIONS}
    checkpoint, model_config = options.get("checkpoint"), options.get("model_config")
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise checkpoint_not_found(checkpoint)
        request["pretrained"] = None
        request["checkpoint"] = file_identity(Path(checkpoint))
    if model_config is not None:
        if not Path(model_config).is_file():
            raise model_config_not_a_file(model_config)
        request["model_config"] = file_digest(Path(model_config))
    request["templates"] = list(config.template_set.templates)
    for item in fields(SegmenterConfig):
        if item.name not in MASK_NEUTRAL and applies(item.name, config.method, config.refine, config.attention):
            request[item.name] = config.resolved(item.name)
    if request.get("dino_checkpoint") is not None:
        request["dino_checkpoint"] = file_identity(Path(request["dino_checkpoint"]))
    request["bg_threshold"] = config.background_threshold
    if config.method == "dense":
        request["stride"] = config.window_stride
        request["background_words"] = list(config.dense_background_words)
    return _as_json(request)


def image_request(run: dict, labels: dict) -> dict:
    """The request of one image: the run's with what decides its labels.

    Args:
        run: `run_request`'s dict.
        labels: `labels` (the names given), `labels_file` (the image's entry in a labels file), or the automatic
            labels' settings (`automatic_labels_request`), as `batch.Labeling.asked` gives them.

    Returns:
        `run` with those added; an automatic rule's minimum score left to its default is the method's
        (`choices.AUTO_MIN_SCORES`).
    """
    request = {**run, **labels}
    if "auto_min_score" in request and request["auto_min_score"] is None:
        request["auto_min_score"] = AUTO_MIN_SCORES[run["method"]]
    return _as_json(request)


def automatic_labels_request(name: str, vocabulary: list[ClassName], rule: AutoLabelRule) -> dict:
    """What decides automatic labels: the vocabulary (a built-in one's name, and the classes with their prompts,
    which alone say what a vocabulary file holds wherever it lies) and the rule's minimum area and score."""
    return {"vocab": {"name": name if name in VOCABULARIES else None,
                      "classes": [list(entry.prompts) for entry in vocabulary]},
            "auto_min_area": rule.min_area, "auto_min_score": rule.min_score}


def changed_settings(record: dict, request: dict) -> Optional[list[str]]:
    """The settings whose values in an image's record differ from `request`; None when the record holds no
    request (written by a wildseg that did not record one). Settings that only one of the two has (those of
    another method or refinement) are named only when no setting both have differs: a changed method is the
    method, not each of its settings.
    """
    recorded = record.get("request")
    if not isinstance(recorded, dict):
        return None
    both = [name for name in recorded.keys() & request.keys() if recorded[name] != request[name]]
    return sorted(both or (recorded.keys() ^ request.keys()))


def request_digest(request: dict) -> str:
    """SHA-256 of an image's request (`image_request`) as canonical JSON (sorted keys, no spaces): written into the
    record beside the request as `request_digest`, so that a resumed run finds a record made with its settings by
    finding that digest in the record's text, without parsing it."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


UNRECORDED = "settings unrecorded"
"""The name under which a record that holds no request is counted among those made with other settings."""


def file_identity(path: Path) -> dict:
    """A weights file as the request names it: its absolute path, size and modification time (hashing gigabytes
    on every run would cost more than loading them)."""
    status = path.stat()
    return {"path": str(path.absolute()), "bytes": status.st_size, "modified_ns": status.st_mtime_ns}


def file_digest(path: Path) -> str:
    """SHA-256 of a small file's content."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _as_json(value):
    """`value` as it reads back from JSON (tuples become lists), so that a request equals its recorded copy."""
    return json.loads(json.dumps(value))
