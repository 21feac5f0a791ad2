"""The CLIP backbone: loading an open_clip model once (`load_backbone`) and embedding label names with it."""

from .loading import Backbone, ProgressCallback, load_backbone, register_model_config, resolve_device

__all__ = ["Backbone", "ProgressCallback", "load_backbone", "register_model_config", "resolve_device"]
