"""Weights from local files: open_clip and OpenAI state dicts and OpenAI JIT archives, checked against the
architecture asked for, and any other file described from its contents so that the message says what it is.
"""

import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import open_clip
import torch

from ..errors import WildsegError, checkpoint_not_found, first_line, setting
from .clip_internals import build_model_from_openai_state_dict, config_towers, load_state_dict

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
"""Entries that OpenAI's CLIP state dicts carry beside the tensors of the model (open_clip's have none)."""


def model_from_checkpoint(model_name: str, path: Path) -> tuple[torch.nn.Module, Optional[tuple[str, str]]]:
    """The model of architecture `model_name` with the weights of the file at `path`.

    Args:
        model_name: an open_clip architecture.
        path: an open_clip state dict (.pt, .bin, .safetensors), an OpenAI state dict or an OpenAI JIT archive.

    Returns:
        The model (on the CPU, fp32) and the activation the file's format tells with the reason (OpenAI's formats:
        QuickGELU), or None when the format cannot tell.
    """
    if path.is_dir():
        raise WildsegError(f"{setting('checkpoint')} {path} is a folder: pass the weights file inside it")
    if not path.is_file():
        raise checkpoint_not_found(path)
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
                f"pass the {setting('model')} it was saved from"
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
    towers = config_towers(config)
    if towers is None:
        return None
    vision, text = towers
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
            f"checkpoint {path} does not fit {setting('model')} {model_name}: it holds {description}, which no "
            f"open_clip model config has: pass the {setting('model')} of the config it was trained with"
        )
    names = " or ".join(fitting[:3])
    raise WildsegError(
        f"checkpoint {path} does not fit {setting('model')} {model_name}: it holds {description} ({names} in "
        f"open_clip's names): pass {setting('model')} {fitting[0]}"
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

