"""Weights by open_clip's pretrained tags: downloaded once into open_clip's cache, with a one-line reason when
they cannot be had (no network, offline mode, an unknown tag).
"""

from pathlib import Path
from typing import Optional, Union

import open_clip
import torch

from ..errors import WildsegError, setting


def default_cache_hint() -> str:
    """Where open_clip keeps downloaded weights when no cache folder is given."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return f"{HF_HUB_CACHE} (Hugging Face) or ~/.cache/clip"


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
        return open_clip.create_model(model_name, pretrained=tag,
                                      cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as error:
        where = cache_dir if cache_dir is not None else default_cache_hint()
        raise WildsegError(
            f"could not get the {tag!r} weights of {model_name}: {_download_failure(error, model_name, tag)}; "
            f"open_clip downloads them once into {where}: connect to the network, point {setting('cache_dir')} at a "
            f"copy of that cache (with HF_HUB_OFFLINE=1 to skip network attempts), or pass {setting('checkpoint')} "
            "PATH to a local weights file"
        ) from None


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


