"""A disk cache of label text embeddings, so that a second run with the same weights and templates starts at once.

Layout under the cache folder (`cache_folder`):

    text-embeddings-v1/<group>/key.json       what the group's embeddings depend on, readable
    text-embeddings-v1/<group>/<label>.npy    one float32 unit vector per label (file name: SHA-256 of the label)
    file-hashes/<path>.json                   the SHA-256 of a checkpoint, reused while its size and mtime stay

`<group>` is the SHA-256 of key.json's content (model, weights, activation, precision, templates, open_clip
version). Every file is written to a temporary name and renamed into place (os.replace), so concurrent runs
never leave a partial file; an unreadable or malformed entry is recomputed; a folder that cannot be written only
turns the cache off, with one warning.
"""

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..cache import CACHE_DIR_VARIABLE, cache_folder, digest
from ..errors import WildsegWarning
from ..files import write_atomically

EMBEDDINGS_FOLDER = "text-embeddings-v1"
FILE_HASHES_FOLDER = "file-hashes"
NORM_TOLERANCE = 1e-2
"""Stored embeddings are unit vectors (fp16 on CUDA, then float32); one further from norm 1 is corrupt."""
TextCacheSetting = Union[None, bool, str, Path]
"""`None` or `True`: the default folder (`cache_folder`); a path: that folder; `False`: no disk cache."""


def open_text_cache(setting: TextCacheSetting) -> Optional["TextCache"]:
    """The disk cache a `text_cache` setting (`TextCacheSetting`) names, or None when it turns caching off."""
    if setting is False:
        return None
    return TextCache(cache_folder() if setting is None or setting is True else Path(setting).expanduser())


class TextCache:
    """Label embeddings on disk under `folder` (see the module's docstring for the layout)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.writable = True
        """Turned off, with one warning, by the first write that fails."""

    def group(self, key: dict) -> "EmbeddingGroup":
        """The entries of one key (model, weights, activation, precision, templates: `Backbone`'s text key)."""
        text = json.dumps(key, sort_keys=True, indent=1)
        return EmbeddingGroup(self, self.folder / EMBEDDINGS_FOLDER / digest(text)[:32], text)

    def file_digest(self, path: Path) -> str:
        """SHA-256 of a file's content, computed once and then reused while its path, size and mtime stay."""
        resolved = path.resolve()
        stat = resolved.stat()
        identity = {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        record = self.folder / FILE_HASHES_FOLDER / f"{digest(str(resolved))[:32]}.json"
        try:
            known = json.loads(record.read_text())
            if {name: known.get(name) for name in identity} == identity and isinstance(known.get("sha256"), str):
                return known["sha256"]
        except (OSError, ValueError):
            pass
        content = hashlib.sha256()
        with resolved.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                content.update(block)
        self.write_atomically(record, lambda target: target.write_text(
            json.dumps({**identity, "sha256": content.hexdigest()})))
        return content.hexdigest()

    def write_atomically(self, path: Path, write: Callable[[Path], object]) -> None:
        """`write` a temporary file beside `path`, then rename it to `path` (`files.write_atomically`); on
        failure warn once and stop writing."""
        if not self.writable:
            return
        try:
            write_atomically(path, write)
        except OSError as error:
            self.writable = False
            warnings.warn(
                f"cannot write the text-embedding cache in {self.folder} ({error.strerror or error}); label "
                f"embeddings are not saved for the next run: set {CACHE_DIR_VARIABLE} to a writable folder",
                WildsegWarning, stacklevel=2,
            )


class EmbeddingGroup:
    """The cached embeddings of one key: one .npy file per label in `folder`, beside the key's key.json."""

    def __init__(self, cache: TextCache, folder: Path, key_text: str):
        self.cache, self.folder, self.key_text = cache, folder, key_text

    def entry(self, label: str) -> Path:
        """The file of a label's embedding."""
        return self.folder / f"{digest(label)[:32]}.npy"

    def load(self, label: str) -> Optional[torch.Tensor]:
        """The stored embedding of `label` (float32, 1-D, unit norm), or None when absent, unreadable or malformed."""
        try:
            array = np.load(self.entry(label), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if array.dtype != np.float32 or array.ndim != 1 or not array.size or not np.isfinite(array).all():
            return None
        if abs(float(np.linalg.norm(array)) - 1) > NORM_TOLERANCE:
            return None
        return torch.from_numpy(array)

    def store(self, label: str, embedding: torch.Tensor) -> None:
        """Save a label's embedding as float32 (bit for bit), with the group's key.json on first use."""
        key_file = self.folder / "key.json"
        if not key_file.is_file():
            self.cache.write_atomically(key_file, lambda target: target.write_text(self.key_text))
        array = embedding.detach().float().cpu().contiguous().numpy()

        def save(target: Path) -> None:
            with target.open("wb") as file:
                np.save(file, array, allow_pickle=False)

        self.cache.write_atomically(self.entry(label), save)
