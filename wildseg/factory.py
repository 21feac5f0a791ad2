"""A Segmenter from one flat set of option values, as the command line, its Ray workers and the demo give them.

Options are named as the Python API names them: `load_backbone`'s parameters, `model_config` (an open_clip model
config file to register first) and `SegmenterConfig`'s fields. Values given win over defaults (a command's, or a
published protocol's), which win over the library's; a default that the chosen method or refinement does not use
is left out, while a given one is refused (`SegmenterConfig`). The configuration is checked before the model loads,
and this module imports the model libraries only then.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .config import SegmenterConfig
from .templates import TEMPLATE_SETS

if TYPE_CHECKING:
    from .backbone import Backbone
    from .segmenter import Segmenter

BACKBONE_OPTIONS = ("model", "pretrained", "checkpoint", "cache_dir", "activation", "device", "text_cache",
                    "precision")
"""The options of `load_backbone` (`model` is its `model_name`)."""


PATH_OPTIONS = ("checkpoint", "model_config", "cache_dir", "text_cache", "templates", "dino_checkpoint")
"""The options that may name files."""


def absolute_paths(options: dict) -> dict:
    """The option values with every relative path made absolute, as the command line passes them on, so that its
    records name the files wherever the model loads (a Ray worker starts elsewhere); a built-in template set's
    name, a switched-off text cache and options not given are left as they are; a region folder and a SAM 2 folder
    are made absolute (a region source or Hub name is not a path)."""
    resolved = dict(options)
    for name in PATH_OPTIONS:
        value = resolved.get(name)
        if value is None or isinstance(value, bool) or (name == "templates" and value in TEMPLATE_SETS):
            continue
        resolved[name] = Path(value).absolute()
    for name in ("regions", "sam2_model"):
        if resolved.get(name) is not None and Path(resolved[name]).is_dir():
            resolved[name] = str(Path(resolved[name]).absolute())
    return resolved


def build_segmenter(options: dict, defaults: Optional[dict] = None, backbone: Optional[Backbone] = None
                    ) -> Segmenter:
    """A Segmenter from option values.

    Args:
        options: values given (None: not given): `BACKBONE_OPTIONS`, `model_config` and `SegmenterConfig` fields.
        defaults: the `SegmenterConfig` values of a command or protocol where none is given.
        backbone: a loaded model to use instead of loading the one the options name.

    Returns:
        The Segmenter; its configuration is checked before any model loads, and SAM 2 (for `regions` sam2) loads
        before CLIP, so that its problems are said first.
    """
    config = SegmenterConfig.from_options(options, defaults)
    from .backbone import load_backbone, register_model_config, resolve_device  # once the options are checked
    from .segmenter import Segmenter

    sam2 = None
    if config.uses_sam2:
        from .backbone.sam2 import load_sam2

        device = backbone.device if backbone is not None else resolve_device(options.get("device") or "auto")
        sam2 = load_sam2(config.resolved("sam2_model"), device)
    dino = None
    if config.method_name == "corrclip":
        from .backbone.dino import load_dino

        device = backbone.device if backbone is not None else resolve_device(options.get("device") or "auto")
        dino = load_dino(config.resolved("dino_model"), config.dino_checkpoint, device)
    if backbone is None:
        if options.get("model_config") is not None:
            register_model_config(options["model_config"])
        loading = {name: options[name] for name in BACKBONE_OPTIONS if options.get(name) is not None}
        if "model" in loading:
            loading["model_name"] = loading.pop("model")
        backbone = load_backbone(**loading)
    return Segmenter(backbone, config, sam2=sam2, dino=dino)


def loading_message(options: dict) -> str:
    """What a status line says while the model of `options` loads: the architecture and where its weights come
    from."""
    if options.get("checkpoint") is not None:
        source = str(options["checkpoint"])
    elif str(options.get("pretrained", "openai")).lower() == "none":
        source = "random weights"
    else:
        source = f"{options.get('pretrained', 'openai')} weights, downloaded on first use"
    return f"loading {options.get('model', 'ViT-B-16')} ({source})"


def weights_to_fetch(options: dict) -> Optional[str]:
    """When the model of `options` must download its weights before it loads: a line saying which and where to
    (a download takes minutes, so a command says it at once); None when they are local or cached, or when
    offline mode (HF_HUB_OFFLINE) forbids downloading them."""
    import open_clip

    from .backbone import register_model_config
    from .backbone.downloads import default_cache_hint, weights_cached

    tag, cache_dir = options.get("pretrained") or "openai", options.get("cache_dir")
    model = options.get("model") or "ViT-B-16"
    if options.get("checkpoint") is not None or tag.lower() == "none":
        return None
    if options.get("model_config") is not None:
        register_model_config(options["model_config"])
    if model not in open_clip.list_models() or tag not in open_clip.list_pretrained_tags_by_model(model):
        return None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or weights_cached(model, tag, cache_dir):
        return None
    return f"downloading the {tag} weights of {model} into {cache_dir or default_cache_hint()} (once)"
