"""Weights by open_clip's pretrained tags: downloaded once into open_clip's cache, with a one-line reason when
they cannot be had (no network, offline mode, an unknown tag).
"""

import contextlib
import logging
import os
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlsplit

import open_clip
import torch

from ..errors import WildsegError, setting


def default_cache_hint() -> str:
    """Where open_clip keeps downloaded weights when no cache folder is given."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return f"{HF_HUB_CACHE} or ~/.cache/clip"


def model_from_tag(model_name: str, tag: str, cache_dir: Optional[Union[str, Path]]) -> torch.nn.Module:
    """The model of architecture `model_name` with open_clip's pretrained weights `tag`, downloaded into `cache_dir`
    (open_clip's default cache when None) on first use; a one-line error when they cannot be had."""
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if tag not in tags:
        known = ", ".join(tags) if tags else "none"
        raise WildsegError(
            f"model {model_name} has no pretrained weights {tag!r} (known tags: {known}); "
            f"pick one with {setting('pretrained')} or load a file with {setting('checkpoint')}"
        )
    try:
        with quiet_hub_retries():
            return open_clip.create_model(model_name, pretrained=tag,
                                          cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as error:
        raise WildsegError(f"could not get the {tag!r} weights of {model_name}: "
                           f"{_download_failure(error, model_name, tag)}; {_ways_on(cache_dir)}") from None


@contextlib.contextmanager
def quiet_hub_retries():
    """The Hugging Face hub's logger at ERROR while it downloads (its level restored after): a failed download is
    one line of wildseg's, not a dozen of the hub's retries."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def weights_cached(model_name: str, tag: str, cache_dir: Optional[Union[str, Path]]) -> bool:
    """Whether open_clip would load the `tag` weights of `model_name` from its cache (or a local file) rather than
    download them: the Hugging Face hub's cache (safetensors or the named file) or open_clip's URL cache."""
    from huggingface_hub import try_to_load_from_cache

    from .clip_internals import safetensors_alternatives

    config = open_clip.get_pretrained_cfg(model_name, tag)
    if not config or "file" in config:
        return True
    folder = None if cache_dir is None else str(cache_dir)
    if config.get("hf_hub"):
        model_id, filename = os.path.split(config["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        return any(isinstance(try_to_load_from_cache(model_id, name, cache_dir=folder), str)
                   for name in [*safetensors_alternatives(filename), filename])
    url_cache = Path(folder) if folder is not None else Path("~/.cache/clip").expanduser()
    return (url_cache / os.path.basename(config.get("url", ""))).is_file()


def _ways_on(cache_dir: Optional[Union[str, Path]]) -> str:
    """What a user who could not get weights may do, leaving out what they did already (offline mode, a cache)."""
    from huggingface_hub import constants

    ways = [] if constants.HF_HUB_OFFLINE else ["connect to the network"]
    ways.append(f"point {setting('cache_dir')} at a copy of the cache ({default_cache_hint()})" if cache_dir is None
                else f"check that {setting('cache_dir')} {cache_dir} holds them")
    ways.append(f"pass {setting('checkpoint')} FILE")
    return ", ".join(ways[:-1]) + ("," if len(ways) > 2 else "") + f" or {ways[-1]}"


def _download_failure(error: BaseException, model_name: str, tag: str) -> str:
    """Why a download failed, in one line and whole: no network or offline mode said plainly, else the innermost
    exception's message with its lines joined."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    config = open_clip.get_pretrained_cfg(model_name, tag)
    source = urlsplit(constants.ENDPOINT if config.get("hf_hub") else config.get("url", "")).netloc or "the server"
    if constants.HF_HUB_OFFLINE and any(isinstance(each, (LocalEntryNotFoundError, OfflineModeIsEnabled))
                                        for each in chain):
        return "they are not in the download cache, and HF_HUB_OFFLINE=1 forbids downloading them (unset it)"
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


