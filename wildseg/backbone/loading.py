"""The CLIP backbone: an open_clip model loaded once (from a pretrained tag or a local file), and its label
text embeddings.

Label embeddings use a prompt-template ensemble as in CLIP's zero-shot classifier (Radford et al. 2021, Sec.
3.1.4): each templated prompt is embedded and normalised, the embeddings of a label are averaged and normalised
again. They are kept in memory and on disk (`text_cache`). Loading is apart from use: one Backbone serves any
number of `Segmenter`s.
"""

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import open_clip
import torch

from ..choices import ACTIVATIONS, DEFAULT_TEMPLATES, PRECISIONS
from ..errors import WildsegError, WildsegWarning, model_config_not_a_file, setting
from ..templates import TemplateSet, resolve_templates
from .checkpoints import model_from_checkpoint
from .clip_internals import ClipTower, set_activation
from .downloads import model_from_tag
from .text_cache import EmbeddingGroup, TextCache, TextCacheSetting, open_text_cache

ProgressCallback = Callable[[int, int], None]
"""Called as `on_progress(done, total)` with the number of labels embedded (or found cached) so far."""


def resolve_device(device: str) -> torch.device:
    """Map 'auto' to CUDA when PyTorch sees a GPU and to the CPU otherwise; check that 'cuda' is usable."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise WildsegError(f"{setting('device')} cuda was asked for, but PyTorch sees no CUDA GPU: use cpu or auto")
    if device not in ("cpu", "cuda"):
        raise WildsegError(f"unknown {setting('device')} {device!r}: use auto, cuda or cpu")
    return torch.device(device)


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to run with (`choices.PRECISIONS`): 'auto' is fp16 on CUDA and fp32 on the CPU; bf16 on a GPU
    without bfloat16 is a one-line error."""
    if precision not in PRECISIONS:
        raise WildsegError(f"unknown {setting('precision')} {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise WildsegError(f"{setting('precision')} bf16 was asked for, but this GPU has no bfloat16: use fp16 or "
                           "fp32")
    return precision


@dataclass
class Backbone:
    """A loaded open_clip model in eval mode, with what is needed to feed it images and text."""

    model: torch.nn.Module
    tokenizer: Callable
    model_name: str
    weights: str
    device: torch.device
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    activation: str
    """`gelu` or `quickgelu`: the MLP activation the model runs with."""
    activation_source: str
    """Why that activation: what told it (the tag's config, the file's format, the model config, the user)."""
    checkpoint: Optional[Path] = None
    """The weights file, when the weights came from one (`weights` is then its path as given)."""
    text_cache: Optional[TextCache] = None
    """The disk cache of label embeddings (`text_cache.TextCache`); None keeps them in memory only."""
    precision: str = "fp32"
    """`fp32`, `fp16` or `bf16`: the autocast of the model's passes (`resolve_precision`)."""
    _label_cache: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)
    _weights_identity: Optional[str] = field(default=None, repr=False)

    @cached_property
    def tower(self) -> ClipTower:
        """The image tower as segmentation methods use it (`clip_internals.ClipTower`)."""
        return ClipTower(self.model)

    @property
    def half_precision(self) -> bool:
        """Whether the model's passes run in a 16-bit autocast (`precision` fp16 or bf16)."""
        return self.precision in AUTOCAST_DTYPES

    def autocast(self):
        """The autocast context of `precision` on this device (disabled for fp32)."""
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES.get(self.precision, torch.float32),
                              enabled=self.half_precision)

    def embed_labels(self, labels: Sequence[str], templates: Union[str, Path, TemplateSet] = DEFAULT_TEMPLATES,
                     cached: bool = True, on_progress: Optional[ProgressCallback] = None) -> torch.Tensor:
        """Return unit-norm text embeddings (labels x dim, fp32) of the template ensemble of each label.

        `templates` is a built-in set's name, a template file's path or a `TemplateSet` (`resolve_templates`).
        Each label is embedded once per template set and then served from memory and from the disk cache
        (`text_cache`), bit for bit; `cached=False` computes every label afresh and touches neither cache.
        `on_progress(done, total)` counts the distinct labels: first those found cached, then one at a time.
        """
        template_set = resolve_templates(templates)
        unique = list(dict.fromkeys(labels))
        if not cached:
            fresh = dict(self._embed_each(unique, template_set, on_progress, done=0))
            return torch.stack([fresh[label] for label in labels])
        memory = {label: self._label_cache.get((label, template_set.identity)) for label in unique}
        missing = [label for label, embedding in memory.items() if embedding is None]
        stored = self._stored_group(template_set) if missing else None
        if stored is not None:
            for label in missing:
                embedding = stored.load(label)
                if embedding is not None:
                    self._label_cache[(label, template_set.identity)] = embedding.to(self.device)
            missing = [label for label in missing if (label, template_set.identity) not in self._label_cache]
        computed = self._embed_each(missing, template_set, on_progress, done=len(unique) - len(missing))
        for label, embedding in computed:
            self._label_cache[(label, template_set.identity)] = embedding
            if stored is not None:
                stored.store(label, embedding)
        return torch.stack([self._label_cache[(label, template_set.identity)] for label in labels])

    def _text_key(self, template_set: TemplateSet, cache: TextCache) -> Optional[dict]:
        """What a label's embedding depends on besides its text, for the disk cache (`text_cache` module): None for
        random weights, which differ in every process. A checkpoint is named by its content's SHA-256."""
        if self.weights == "random" and self.checkpoint is None:
            return None
        if self._weights_identity is None:
            self._weights_identity = (
                f"pretrained {self.weights}" if self.checkpoint is None
                else f"file sha256:{cache.file_digest(self.checkpoint)}"
            )
        return {
            "model": self.model_name,
            "weights": self._weights_identity,
            "activation": self.activation,
            "precision": f"{self.device.type} {self.precision}",
            "templates": template_set.digest,
            "open_clip": open_clip.__version__,
        }

    def _stored_group(self, template_set: TemplateSet) -> Optional[EmbeddingGroup]:
        """The disk cache's entries for these weights and templates, or None when there is no disk cache."""
        if self.text_cache is None:
            return None
        try:
            key = self._text_key(template_set, self.text_cache)
        except OSError:
            return None
        return None if key is None else self.text_cache.group(key)

    def _embed_each(self, labels: list[str], template_set: TemplateSet, on_progress: Optional[ProgressCallback],
                    done: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (label, embedding) for `labels`, reporting progress from `done` (labels already had)."""
        total = done + len(labels)
        if on_progress is not None:
            on_progress(done, total)
        for count, label in enumerate(labels, start=done + 1):
            yield label, self._embed(label, template_set)
            if on_progress is not None:
                on_progress(count, total)

    def _embed(self, label: str, template_set: TemplateSet) -> torch.Tensor:
        """One label's ensemble embedding. Its prompts form one batch of their own, so its bits do not depend
        on which other labels are embedded with it (batch composition changes matmul rounding): a cached label
        equals a freshly computed one."""
        with torch.no_grad(), self.autocast():
            classifier = open_clip.build_zero_shot_classifier(
                self.model, self.tokenizer, [label], template_set.templates, num_classes_per_batch=1,
                device=self.device,
            )
        return classifier[:, 0].float()


def load_backbone(
    model_name: str = "ViT-B-16",
    pretrained: Optional[str] = "openai",
    checkpoint: Optional[Union[str, Path]] = None,
    device: str = "auto",
    cache_dir: Optional[Union[str, Path]] = None,
    activation: str = "auto",
    text_cache: TextCacheSetting = None,
    precision: str = "auto",
) -> Backbone:
    """Load an open_clip model once, to serve any number of Segmenters.

    Args:
        model_name: an open_clip architecture (`wildseg models` lists those wildseg can use).
        pretrained: an open_clip pretrained tag, downloaded and cached on first use; None or "none" keeps open_clip's
            random initialisation (for speed tests).
        checkpoint: a local weights file (open_clip or OpenAI state dict, OpenAI JIT archive), used instead of
            `pretrained`.
        device: "auto" (CUDA when PyTorch sees a GPU, else the CPU), "cuda" or "cpu".
        cache_dir: open_clip's folder of downloaded weights (default: its own).
        activation: the MLP activation (`choices.ACTIVATIONS`): "auto" follows the weights (QuickGELU for
            OpenAI's), else "gelu" or "quickgelu".
        text_cache: the disk cache of label embeddings: None or True for wildseg's cache folder
            (`text_cache.cache_folder`), a folder, or False for none.
        precision: the autocast of the model's passes (`choices.PRECISIONS`): "auto" (fp16 on CUDA, fp32 on the
            CPU), "fp32", "fp16" or "bf16". The relevance rule, probabilities and refinement run in fp32 whatever
            it is.

    Returns:
        The Backbone, in eval mode without gradients, on its device.
    """
    torch_device = resolve_device(device)
    resolved_precision = resolve_precision(precision, torch_device)
    if activation not in ACTIVATIONS:
        raise WildsegError(f"unknown {setting('activation')} {activation!r}: use one of {', '.join(ACTIVATIONS)}")
    if model_name not in open_clip.list_models():
        raise WildsegError(
            f"unknown model {model_name!r}: run `wildseg models` to list the architectures open_clip has"
        )
    if checkpoint is not None:
        (model, weights_activation), weights = model_from_checkpoint(model_name, Path(checkpoint)), str(checkpoint)
    elif pretrained is not None and pretrained.lower() != "none":
        model, weights = model_from_tag(model_name, pretrained, cache_dir), pretrained
        weights_activation = _tag_activation(model_name, pretrained)
    else:
        model, weights, weights_activation = open_clip.create_model(model_name), "random", None
    activation, source = _choose_activation(activation, weights_activation, model_name, weights)
    set_activation(model, activation)
    model = model.to(torch_device).eval().requires_grad_(False)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess.get("size", model.visual.image_size)
    return Backbone(
        model=model,
        tokenizer=open_clip.get_tokenizer(model_name),
        model_name=model_name,
        weights=weights,
        device=torch_device,
        image_size=size if isinstance(size, int) else size[0],
        mean=tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
        activation=activation,
        activation_source=source,
        checkpoint=None if checkpoint is None else Path(checkpoint),
        text_cache=open_text_cache(text_cache),
        precision=resolved_precision,
    )


def _tag_activation(model_name: str, tag: str) -> Optional[tuple[str, str]]:
    """The activation a pretrained tag's open_clip config names (OpenAI's tags: QuickGELU), with the reason."""
    quick = open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu")
    if quick is None:
        return None
    return ("quickgelu" if quick else "gelu"), f"the open_clip config of pretrained tag {tag!r}"


def _choose_activation(asked: str, from_weights: Optional[tuple[str, str]], model_name: str, weights: str
                       ) -> tuple[str, str]:
    """The activation to run with and why: the user's choice; else what the weights say; else the model config,
    with one warning line when real weights could not tell (a state dict without OpenAI's entries)."""
    if asked != "auto":
        return asked, "given"
    if from_weights is not None:
        return from_weights
    configured = "quickgelu" if open_clip.get_model_config(model_name).get("quick_gelu") else "gelu"
    if configured == "gelu" and weights != "random":
        warnings.warn(WildsegWarning(
            f"{weights} does not tell which activation its weights were trained with; using GELU as {model_name}'s "
            f"config says: set {setting('activation')} quickgelu for OpenAI-trained weights ({setting('activation')} "
            "gelu silences this)"), stacklevel=3)
    return configured, f"the config of {model_name}"




def register_model_config(path: Union[str, Path]) -> None:
    """Make an open_clip model config file (JSON: embed_dim, vision_cfg, text_cfg) known by its file stem, as
    open_clip's `add_model_config` does, so that `load_backbone` can build it."""
    if not Path(path).is_file():
        raise model_config_not_a_file(path)
    open_clip.add_model_config(Path(path))
