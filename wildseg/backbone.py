"""The CLIP backbone: open_clip models from pretrained tags or local checkpoints, and label text embeddings.

Weights come from open_clip's registry of pretrained tags (downloaded and cached on first use) or from a
local file given with `checkpoint`. Label embeddings use a prompt-template ensemble as in CLIP's zero-shot
classifier (Radford et al. 2021, Sec. 3.1.4): each templated prompt is embedded and normalised, the
embeddings of a label are averaged and normalised again. They are kept in memory and on disk (`text_cache`).
"""

import logging
import math
import re
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, build_model_from_openai_state_dict
from open_clip.transformer import QuickGELU, ResidualAttentionBlock

from .choices import ACTIVATIONS, DEFAULT_TEMPLATES
from .errors import WildsegError, WildsegWarning, first_line
from .text_cache import EmbeddingGroup, TextCache, TextCacheSetting, digest, open_text_cache

TEMPLATE_SETS: dict[str, Sequence[Union[str, Callable[[str], str]]]] = {
    "imagenet80": open_clip.OPENAI_IMAGENET_TEMPLATES,
    "photo": ("a photo of a {}.",),
}
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
"""Entries that OpenAI's CLIP state dicts carry beside the tensors of the model (open_clip's have none)."""
ProgressCallback = Callable[[int, int], None]
"""Called as `on_progress(done, total)` with the number of labels embedded (or found cached) so far."""


@dataclass(frozen=True)
class TemplateSet:
    """Prompt templates, each a str.format pattern with one `{}` where the label goes.

    `identity` names the set in records and caches: the built-in set's name, or for a file its name and the
    SHA-256 of its templates; `digest` is the SHA-256 of the templates themselves (the disk cache's key).
    """

    templates: tuple[str, ...]
    identity: str

    @property
    def digest(self) -> str:
        return digest("\n".join(self.templates))


def resolve_templates(templates: Union[str, Path, TemplateSet]) -> TemplateSet:
    """The templates a `--templates` value names: a built-in set of `TEMPLATE_SETS`, else a file of templates
    (`read_template_file`); a resolved TemplateSet is returned as it is."""
    if isinstance(templates, TemplateSet):
        return templates
    if isinstance(templates, str) and templates in TEMPLATE_SETS:
        patterns = tuple(each if isinstance(each, str) else each("{}") for each in TEMPLATE_SETS[templates])
        return TemplateSet(patterns, templates)
    return read_template_file(Path(templates))


def read_template_file(path: Path) -> TemplateSet:
    """Templates from a UTF-8 text file: one per line with `{}` where the label goes; blank lines and lines
    starting with `#` are skipped; `{{` and `}}` write literal braces."""
    if not path.is_file():
        raise WildsegError(
            f"--templates {path} is neither a built-in template set ({', '.join(TEMPLATE_SETS)}) nor a file: "
            "pass one of those names or the path of a text file with one template per line"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise WildsegError(f"--templates {path} is not UTF-8 text: save it as UTF-8, one template per line") from None
    templates = []
    for number, line in enumerate(lines, start=1):
        template = line.strip()
        if not template or template.startswith("#"):
            continue
        if "{}" not in template:
            raise WildsegError(
                f"--templates {path} line {number} ({template!r}) has no {{}} where the label goes: "
                "write it as e.g. 'a photo of a {}.'"
            )
        try:
            template.format("label")
        except (IndexError, KeyError, ValueError):
            raise WildsegError(
                f"--templates {path} line {number} ({template!r}) has braces other than one {{}}: "
                "keep one {} for the label and write literal braces as {{ and }}"
            ) from None
        templates.append(template)
    if not templates:
        raise WildsegError(
            f"--templates {path} has no templates (only blank lines and # comments): write one template per "
            "line with {} where the label goes"
        )
    content = digest("\n".join(templates))
    return TemplateSet(tuple(templates), f"{path.name} sha256:{content[:16]}")


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
    checkpoint: Optional[Path] = None
    """The weights file, when the weights came from one (`weights` is then its path as given)."""
    text_cache: Optional[TextCache] = None
    """The disk cache of label embeddings (`text_cache.TextCache`); None keeps them in memory only."""
    _label_cache: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)
    _weights_identity: Optional[str] = field(default=None, repr=False)

    @property
    def half_precision(self) -> bool:
        """Half precision (fp16 autocast) is used on CUDA; the CPU runs in fp32."""
        return self.device.type == "cuda"

    def autocast(self):
        """The autocast context for this device: fp16 on CUDA, disabled on CPU."""
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half_precision)

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
            "precision": f"{self.device.type} {'fp16' if self.half_precision else 'fp32'}",
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
) -> Backbone:
    """Build an open_clip model with weights from `checkpoint` if given, else from the `pretrained` tag.

    `pretrained=None` (CLI: `--pretrained none`) keeps open_clip's random initialisation, for speed tests.
    `activation` (`ACTIVATIONS`) sets the MLP activation; `auto` follows the weights (`_weights_activation`).
    `cache_dir` is open_clip's folder of downloaded weights; `text_cache` the folder of label embeddings:
    None or True for wildseg's cache folder (`text_cache.cache_folder`), a path, or False for none on disk.
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
        checkpoint=None if checkpoint is None else Path(checkpoint),
        text_cache=open_text_cache(text_cache),
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
        with _quiet_download():
            return open_clip.create_model(model_name, pretrained=tag,
                                          cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as error:
        where = cache_dir if cache_dir is not None else default_cache_hint()
        raise WildsegError(
            f"could not get the {tag!r} weights of {model_name}: {_download_failure(error, model_name, tag)}; "
            f"open_clip downloads them once into {where}: connect to the network, point --cache-dir at a copy of "
            "that cache (with HF_HUB_OFFLINE=1 to skip network attempts), or pass --checkpoint PATH to a local "
            "weights file"
        ) from None


@contextmanager
def _quiet_download() -> Iterator[None]:
    """Hold back the log lines and warnings of a download (Hugging Face Hub retries, urllib3, open_clip's root
    logger), whose failure the WildsegError states once; logging and warnings are restored afterwards."""
    root = logging.getLogger()
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)  # a root handler keeps open_clip's logging.info() from calling basicConfig()
    disabled = root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        root.removeHandler(placeholder)


def _download_failure(error: BaseException, model_name: str, tag: str) -> str:
    """Why a download failed, in one line and whole: no network or offline mode said plainly, else the innermost
    exception's message with its lines joined."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    config = open_clip.get_pretrained_cfg(model_name, tag)
    source = (f"{constants.ENDPOINT}/{config['hf_hub'].rstrip('/')}" if config.get("hf_hub")
              else config.get("url") or "the download server")
    if constants.HF_HUB_OFFLINE and any(isinstance(each, (LocalEntryNotFoundError, OfflineModeIsEnabled))
                                        for each in chain):
        return (f"they are not in the download cache, and HF_HUB_OFFLINE=1 forbids fetching them from {source} "
                "(unset it to download)")
    if any(_is_network_error(each) for each in chain):
        return f"{source} could not be reached and they are not in the download cache"
    return " ".join(str(chain[-1]).split()) or type(chain[-1]).__name__


def _is_network_error(error: BaseException) -> bool:
    """A failure to reach a server: the hub's 'not in the cache and not reachable', OS-level connection errors,
    urllib's URLError, or httpx's/requests' connection and timeout errors (matched by name: optional packages)."""
    from urllib.error import URLError

    from huggingface_hub.errors import LocalEntryNotFoundError

    name = type(error).__name__
    return (isinstance(error, (LocalEntryNotFoundError, ConnectionError, TimeoutError, URLError))
            or "ConnectError" in name or "ConnectionError" in name or "Timeout" in name)


def _model_from_checkpoint(model_name: str, path: Path) -> tuple[torch.nn.Module, Optional[tuple[str, str]]]:
    """The model with the file's weights, and the activation the file's format tells (OpenAI's: QuickGELU)."""
    if path.is_dir():
        raise WildsegError(f"--checkpoint {path} is a folder: pass the weights file inside it")
    if not path.is_file():
        raise WildsegError(f"checkpoint not found: {path} (check the path given to --checkpoint)")
    try:
        archive_model = (open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
                         if _is_torchscript_archive(path) else None)
        state_dict = load_state_dict(str(path)) if archive_model is None else archive_model.state_dict()
    except Exception as error:
        raise WildsegError(
            f"cannot read checkpoint {path}, it is not a weights file PyTorch can load: {_file_kind(path, error)}; "
            "pass an open_clip state dict (.pt, .bin, .safetensors) or an OpenAI JIT archive"
        ) from None
    _check_architecture(state_dict, model_name, path)
    if archive_model is not None:
        return archive_model, ("quickgelu", f"{path} is an OpenAI JIT archive")
    try:
        if not any(key in state_dict for key in OPENAI_EXTRA_KEYS):
            return open_clip.create_model(model_name, pretrained=str(path)), None
        model = build_model_from_openai_state_dict(state_dict).float()
    except Exception as error:
        if _is_architecture_mismatch(error):
            raise WildsegError(
                f"checkpoint {path} does not fit model {model_name} ({_mismatch_detail(error)}): "
                "pass the --model it was saved from"
            ) from None
        raise WildsegError(
            f"cannot load checkpoint {path} ({first_line(error)}): pass an open_clip state dict "
            "(.pt, .bin, .safetensors) or an OpenAI JIT archive"
        ) from None
    source = "an OpenAI state dict (it has OpenAI's input_resolution, context_length, vocab_size entries)"
    return model, ("quickgelu", f"{path} is {source}")


@dataclass(frozen=True)
class Architecture:
    """The shapes that tell CLIP architectures apart, read from a state dict's tensors or from a model config.

    `vision` is ("ViT", patch, width, layers) or ("ResNet", width, blocks per stage); `text` is (width, layers,
    vocabulary, context length) of open_clip's own text transformer, None for other text towers or when unread.
    """

    vision: tuple
    image_size: Optional[int]
    embed_dim: Optional[int]
    text: Optional[tuple[int, int, int, int]]

    def describe(self) -> str:
        """E.g. 'a ViT with 16-pixel patches, width 768, 12 layers and 224-pixel input'."""
        kind, *shape = self.vision
        if kind == "ViT":
            words = f"a ViT with {shape[0]}-pixel patches, width {shape[1]}, {shape[2]} layers"
        else:
            words = f"a ResNet with width {shape[0]}, {'-'.join(map(str, shape[1]))} blocks"
        return words + (f" and {self.image_size}-pixel input" if self.image_size else "")

    def fits(self, other: "Architecture") -> bool:
        """Whether the tensors of one load into the other: the same towers (input sizes are interpolated)."""
        same_embedding = None in (self.embed_dim, other.embed_dim) or self.embed_dim == other.embed_dim
        return self.vision == other.vision and same_embedding and (self.text is None or self.text == other.text)


def _read_architecture(state_dict: dict) -> Optional[Architecture]:
    """The architecture of a CLIP state dict (open_clip's or OpenAI's tensor names), or None for other layouts."""
    shape = {name: tuple(tensor.shape) for name, tensor in state_dict.items() if isinstance(tensor, torch.Tensor)}
    conv1 = shape.get("visual.conv1.weight")
    if conv1 is None:
        return None
    vit_layers = _block_count(shape, "visual.transformer.resblocks.")
    if vit_layers:
        positions = shape.get("visual.positional_embedding", (0,))[0]
        grid = math.isqrt(max(positions - 1, 0))
        vision, image_size = ("ViT", conv1[-1], conv1[0], vit_layers), (grid * conv1[-1] or None)
    elif "visual.layer1.0.conv1.weight" in shape:
        blocks = tuple(_block_count(shape, f"visual.layer{stage}.") for stage in range(1, 5))
        vision = ("ResNet", shape["visual.layer1.0.conv1.weight"][0], blocks)
        positions = shape.get("visual.attnpool.positional_embedding", (0,))[0]
        image_size = math.isqrt(max(positions - 1, 0)) * 32 or None
    else:
        return None
    projection = shape.get("text_projection")
    tokens, positions = shape.get("token_embedding.weight"), shape.get("positional_embedding")
    text_layers = _block_count(shape, "transformer.resblocks.")
    text = (tokens[1], text_layers, tokens[0], positions[0]) if tokens and positions and text_layers else None
    return Architecture(vision, image_size, projection[-1] if projection else None, text)


def _block_count(shape: dict, prefix: str) -> int:
    """How many numbered blocks `prefix`N. the tensor names hold."""
    return len({name[len(prefix):].split(".")[0] for name in shape if name.startswith(prefix)})


def _config_architecture(model_name: str) -> Optional[Architecture]:
    """The architecture an open_clip model config describes, or None for timm/Hugging Face towers."""
    config = open_clip.get_model_config(model_name) or {}
    try:
        vision = CLIPVisionCfg(**config.get("vision_cfg", {}))
        text = CLIPTextCfg(**config.get("text_cfg", {}))
    except TypeError:
        return None
    if vision.timm_model_name:
        return None
    image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    if isinstance(vision.layers, int):
        shape = ("ViT", vision.patch_size, vision.width, vision.layers)
    else:
        shape = ("ResNet", vision.width, tuple(vision.layers))
    text_shape = None if text.hf_model_name else (text.width, text.layers, text.vocab_size, text.context_length)
    return Architecture(shape, image_size, config.get("embed_dim"), text_shape)


def _check_architecture(state_dict: dict, model_name: str, path: Path) -> None:
    """Refuse weights of another architecture than `model_name`, naming the one the tensors show and the open_clip
    models that have it (those of the same input size if any, without -quickgelu twins, short names first)."""
    found = _read_architecture(state_dict)
    expected = _config_architecture(model_name)
    if found is None or expected is None or found.fits(expected):
        return
    fitting = [name for name in open_clip.list_models()
               if (config := _config_architecture(name)) is not None and found.fits(config)]
    fitting = [name for name in fitting if not (name.endswith("-quickgelu") and name[:-10] in fitting)]
    same_input = [name for name in fitting if _config_architecture(name).image_size == found.image_size]
    fitting = sorted(same_input or fitting, key=lambda name: (name.count("-"), name))
    description = found.describe()
    if found.vision == expected.vision:
        description += f", and a text tower unlike {model_name}'s"
    if not fitting:
        raise WildsegError(
            f"checkpoint {path} does not fit --model {model_name}: it holds {description}, which no open_clip model "
            "config has: pass the --model of the config it was trained with"
        )
    names = " or ".join(fitting[:3])
    raise WildsegError(
        f"checkpoint {path} does not fit --model {model_name}: it holds {description} ({names} in open_clip's "
        f"names): pass --model {fitting[0]}"
    )


def _mismatch_detail(error: Exception) -> str:
    """The first difference torch's load_state_dict reports, in one line, key lists cut to three names."""
    for line in str(error).splitlines()[1:]:
        line = line.strip()
        if not line:
            continue
        keys = re.findall(r'"([^"]+)"', line)
        if len(keys) > 3:
            return f"{line.split(':')[0]}: {', '.join(keys[:3])} and {len(keys) - 3} more"
        return line.rstrip(".")
    return first_line(error)


def _is_architecture_mismatch(error: Exception) -> bool:
    """The file was read but its tensors do not fit the model: torch's load_state_dict errors, or open_clip's
    assertions while resizing positional embeddings."""
    return isinstance(error, AssertionError) or "Error(s) in loading state_dict" in str(error)


FILE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "it is a PNG image"),
    (b"\xff\xd8\xff", "it is a JPEG image"),
    (b"GIF8", "it is a GIF image"),
    (b"II*\x00", "it is a TIFF image"),
    (b"MM\x00*", "it is a TIFF image"),
    (b"%PDF", "it is a PDF document"),
    (b"\x1f\x8b", "it is gzip-compressed: unpack it first"),
)
"""Leading bytes of files people pass by mistake, and what to say about them."""


def _file_kind(path: Path, error: Exception) -> str:
    """What a file that PyTorch cannot read is, from its first bytes (image, archive, web page, text...) or from
    torch's refusal of a pickle that holds objects other than tensors (weights_only loading)."""
    needed = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if needed:
        return (f"it holds a pickled {needed.group(1)} beside its tensors, which PyTorch does not load from files "
                "unchecked: save the state dict alone (torch.save(state_dict, 'weights.pt'))")
    with path.open("rb") as file:
        head = file.read(4096)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/data.pkl") for name in archive.namelist()):
                return f"it is a PyTorch file that does not load ({first_line(error)})"
        return "it is a zip archive without PyTorch's layout: unpack it first"
    if not head:
        return "it is empty (0 bytes), maybe an interrupted download"
    for signature, kind in FILE_SIGNATURES:
        if head.startswith(signature):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "it is a WebP image"
    if not _looks_like_text(head):
        return "it is binary data PyTorch does not recognise, maybe a truncated download"
    start = head.decode("utf-8", errors="ignore").lstrip().lower()
    if start.startswith("version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights: fetch them with `git lfs pull`"
    if start.startswith(("<!doctype html", "<html")):
        return "it is a web page (HTML), not the weights: download the file itself"
    return "it looks like text"


def _looks_like_text(head: bytes) -> bool:
    """UTF-8 without NUL bytes (a character cut by the end of `head` allowed)."""
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(head) - 3
    return True


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files with a `constants.pkl` entry; torch.save files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())

