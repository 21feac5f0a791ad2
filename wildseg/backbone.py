"""The CLIP backbone: open_clip models from pretrained tags or local checkpoints, and label text embeddings.

Weights come from open_clip's registry of pretrained tags (downloaded and cached on first use) or from a
local file given with `checkpoint`. Label embeddings use a prompt-template ensemble as in CLIP's zero-shot
classifier (Radford et al. 2021, Sec. 3.1.4): each templated prompt is embedded and normalised, the
embeddings of a label are averaged and normalised again.
"""

import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.model import build_model_from_openai_state_dict
from open_clip.transformer import QuickGELU, ResidualAttentionBlock

from .errors import WildsegError, WildsegWarning, first_line

TEMPLATE_SETS: dict[str, Sequence[Union[str, Callable[[str], str]]]] = {
    "imagenet80": open_clip.OPENAI_IMAGENET_TEMPLATES,
    "photo": ("a photo of a {}.",),
}
DEFAULT_TEMPLATES = "imagenet80"
ACTIVATIONS = {
    "auto": "follow the weights: QuickGELU for OpenAI's (tag config, JIT archive, OpenAI state dict), else the config",
    "gelu": "exact GELU, as open_clip's own trainings (LAION, DataComp) use",
    "quickgelu": "QuickGELU x * sigmoid(1.702 x), as OpenAI's CLIP was trained",
}
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
"""Entries that OpenAI's CLIP state dicts carry beside the tensors of the model (open_clip's have none)."""


def resolve_device(device: str) -> torch.device:
    """Map 'auto' to CUDA when PyTorch sees a GPU and to the CPU otherwise; check that 'cuda' is usable."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise WildsegError("--device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise WildsegError(f"unknown device {device!r}: use auto, cuda or cpu")
    return torch.device(device)


def default_cache_hint() -> str:
    """Where open_clip keeps downloaded weights when no cache folder is given."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return f"{HF_HUB_CACHE} (Hugging Face) or ~/.cache/clip"


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
    _label_cache: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def half_precision(self) -> bool:
        """Half precision (fp16 autocast) is used on CUDA; the CPU runs in fp32."""
        return self.device.type == "cuda"

    def autocast(self):
        """The autocast context for this device: fp16 on CUDA, disabled on CPU."""
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half_precision)

    def embed_labels(self, labels: Sequence[str], templates: str = DEFAULT_TEMPLATES, cached: bool = True
                     ) -> torch.Tensor:
        """Return unit-norm text embeddings (labels x dim, fp32) of the template ensemble of each label.

        Each label is embedded once per template set and then served from a cache (unless `cached=False`).
        """
        if not cached:
            return self._embed(list(labels), templates)
        missing = [label for label in dict.fromkeys(labels) if (label, templates) not in self._label_cache]
        if missing:
            for label, embedding in zip(missing, self._embed(missing, templates)):
                self._label_cache[(label, templates)] = embedding
        return torch.stack([self._label_cache[(label, templates)] for label in labels])

    def _embed(self, labels: list[str], templates: str) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            classifier = open_clip.build_zero_shot_classifier(
                self.model, self.tokenizer, labels, TEMPLATE_SETS[templates], num_classes_per_batch=4,
                device=self.device,
            )
        return classifier.T.float()


def load_backbone(
    model_name: str = "ViT-B-16",
    pretrained: Optional[str] = "openai",
    checkpoint: Optional[Union[str, Path]] = None,
    device: str = "auto",
    cache_dir: Optional[Union[str, Path]] = None,
    activation: str = "auto",
) -> Backbone:
    """Build an open_clip model with weights from `checkpoint` if given, else from the `pretrained` tag.

    `pretrained=None` (CLI: `--pretrained none`) keeps open_clip's random initialisation, for speed tests.
    `activation` (`ACTIVATIONS`) sets the MLP activation; `auto` follows the weights (`_weights_activation`).
    """
    torch_device = resolve_device(device)
    if activation not in ACTIVATIONS:
        raise WildsegError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
    if model_name not in open_clip.list_models():
        raise WildsegError(
            f"unknown model {model_name!r}: run `wildseg models` to list the architectures open_clip has"
        )
    if checkpoint is not None:
        (model, weights_activation), weights = _model_from_checkpoint(model_name, Path(checkpoint)), str(checkpoint)
    elif pretrained is not None and pretrained.lower() != "none":
        model, weights = _model_from_tag(model_name, pretrained, cache_dir), pretrained
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
        return asked, "--activation"
    if from_weights is not None:
        return from_weights
    configured = "quickgelu" if open_clip.get_model_config(model_name).get("quick_gelu") else "gelu"
    if configured == "gelu" and weights != "random":
        warnings.warn(
            f"{weights} does not tell which activation its weights were trained with; using GELU as {model_name}'s "
            "config says: pass --activation quickgelu for OpenAI-trained weights (--activation gelu silences this)",
            WildsegWarning, stacklevel=3,
        )
    return configured, f"the config of {model_name}"


def set_activation(model: torch.nn.Module, activation: str) -> None:
    """Give every transformer MLP of both towers the activation `gelu` (exact) or `quickgelu` (Radford et al.
    2021: x * sigmoid(1.702 x)); neither has parameters, so the weights are untouched."""
    layer = QuickGELU if activation == "quickgelu" else torch.nn.GELU
    for module in model.modules():
        if isinstance(module, ResidualAttentionBlock):
            module.mlp.gelu = layer()


def _model_from_tag(model_name: str, tag: str, cache_dir: Optional[Union[str, Path]]) -> torch.nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tag not in tags:
        known = ", ".join(tags) if tags else "none"
        raise WildsegError(
            f"model {model_name} has no pretrained weights {tag!r} (known tags: {known}); "
            "pick one with --pretrained or load a file with --checkpoint"
        )
    try:
        return open_clip.create_model(model_name, pretrained=tag,
                                      cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as error:
        where = cache_dir if cache_dir is not None else default_cache_hint()
        raise WildsegError(
            f"could not get the {tag!r} weights of {model_name} ({first_line(error)}); open_clip downloads them "
            f"once into {where}: connect to the network, point --cache-dir at a copy of that cache, or pass "
            "--checkpoint PATH to a local weights file"
        ) from None


def _model_from_checkpoint(model_name: str, path: Path) -> tuple[torch.nn.Module, Optional[tuple[str, str]]]:
    """The model with the file's weights, and the activation the file's format tells (OpenAI's: QuickGELU)."""
    if path.is_dir():
        raise WildsegError(f"--checkpoint {path} is a folder: pass the weights file inside it")
    if not path.is_file():
        raise WildsegError(f"checkpoint not found: {path} (check the path given to --checkpoint)")
    try:
        if _is_torchscript_archive(path):
            model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
            source = "an OpenAI JIT archive"
        else:
            state_dict = load_state_dict(str(path))
            if not any(key in state_dict for key in OPENAI_EXTRA_KEYS):
                return open_clip.create_model(model_name, pretrained=str(path)), None
            model = build_model_from_openai_state_dict(state_dict).float()
            source = "an OpenAI state dict (it has OpenAI's input_resolution, context_length, vocab_size entries)"
    except Exception as error:
        if _is_architecture_mismatch(error):
            raise WildsegError(
                f"checkpoint {path} does not fit model {model_name} ({first_line(error)}): "
                "pass the --model it was saved from"
            ) from None
        raise WildsegError(
            f"cannot read checkpoint {path} ({first_line(error)}): pass an open_clip state dict "
            "(.pt, .bin, .safetensors) or an OpenAI JIT archive"
        ) from None
    _check_vision_shape(model, model_name, path)
    return model, ("quickgelu", f"{path} is {source}")


def _check_vision_shape(model: torch.nn.Module, model_name: str, path: Path) -> None:
    """OpenAI archives define their own architecture; a ViT's must be the one `model_name` names (other towers
    are refused by the segmenter, which names what it needs)."""
    visual = model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        return
    config = open_clip.get_model_config(model_name)["vision_cfg"]
    found = (visual.conv1.weight.shape[0], len(visual.transformer.resblocks), visual.conv1.weight.shape[-1])
    expected = (config.get("width"), config.get("layers"), config.get("patch_size"))
    if found != expected:
        raise WildsegError(
            f"checkpoint {path} does not fit model {model_name} (its vision tower's width, layers, patch are "
            f"{found}, {model_name}'s are {expected}): pass the --model it was saved from"
        )


def _is_architecture_mismatch(error: Exception) -> bool:
    """The file was read but its tensors do not fit the model: torch's load_state_dict errors, or open_clip's
    assertions while resizing positional embeddings."""
    return isinstance(error, AssertionError) or "Error(s) in loading state_dict" in str(error)


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files with a `constants.pkl` entry; torch.save files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())

