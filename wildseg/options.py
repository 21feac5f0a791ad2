"""A Segmenter from the options of the commands (`wildseg segment`, `wildseg eval`, the Ray workers that run
them): given values win over a command's or a protocol's defaults, which win over the library's; options that
would be ignored are refused in one line."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from .errors import WildsegError

if TYPE_CHECKING:
    from .segmenter import Segmenter

DENSE_OPTIONS = ("attention", "window", "stride", "short_side", "logit_scale", "background_words")


def build_segmenter(console: Console, method: str, protocol: dict, **options) -> Segmenter:
    """A Segmenter from CLI options: given values win over `protocol` (defaults of a command or benchmark),
    which win over the library's defaults. Options of another method or refinement are refused."""
    given = {name: value for name, value in options.items() if value is not None}
    refuse_misplaced(given, method, options.get("refine") or protocol.get("refine") or "crf")
    values = {**protocol, **given}
    if values.pop("no_text_cache", None):
        if "text_cache" in values:
            raise WildsegError("--text-cache names the cache folder and --no-text-cache turns the cache off: give one")
        values["text_cache"] = False
    model_config = values.pop("model_config", None)
    status = console.status(_loading_message(method, values)) if console.is_terminal else contextlib.nullcontext()
    with status:
        from .dense import DenseSettings  # torch and open_clip take seconds to import: under the status line
        from .pamr import PamrSettings
        from .refine import CrfSettings
        from .segmenter import Segmenter

        if model_config is not None:
            register_model_config(model_config)
        dense = DenseSettings(**{name: values.pop(name) for name in DENSE_OPTIONS if name in values})
        crf = CrfSettings(**({"iterations": values.pop("crf_iters")} if "crf_iters" in values else {}))
        pamr = PamrSettings(**{field: values.pop(option) for option, field in
                               (("pamr_iters", "iterations"), ("pamr_dilations", "dilations")) if option in values})
        return Segmenter(method=method, dense=dense, crf=crf, pamr_settings=pamr, **values)


def _loading_message(method: str, values: dict) -> str:
    """What the status line says while the model loads: the architecture and where its weights come from."""
    if values.get("backbone") is not None:
        return f"preparing the {method} method"
    if values.get("checkpoint") is not None:
        source = str(values["checkpoint"])
    elif str(values.get("pretrained", "openai")).lower() == "none":
        source = "random weights"
    else:
        source = f"{values.get('pretrained', 'openai')} weights, downloaded on first use"
    return f"loading {values.get('model', 'ViT-B-16')} ({source})"


def refuse_misplaced(given: dict, method: str, refine: str) -> None:
    """One line for an option that would be ignored: another method's, or a refinement's that is not used."""
    owners = {name: ("--method dense", method == "dense") for name in DENSE_OPTIONS}
    owners["start_block"] = ("--method relevance", method == "relevance")
    owners["pamr_iters"] = ("--refine pamr or pamr+crf", "pamr" in refine)
    owners["crf_iters"] = ("--refine crf or pamr+crf", "crf" in refine)
    owners["crf_backend"] = ("--refine crf or pamr+crf", "crf" in refine)
    for name, (needed, used) in owners.items():
        if name in given and not used:
            raise WildsegError(f"--{name.replace('_', '-')} is an option of {needed}: add that or leave it out")


def register_model_config(path: Path) -> None:
    """Make an open_clip model config file (JSON: embed_dim, vision_cfg, text_cfg) known by its file name."""
    import open_clip

    if not Path(path).is_file():
        raise WildsegError(f"the model config {path} is not a file: give an open_clip model config JSON")
    open_clip.add_model_config(Path(path))
