"""wildseg's cache folder, where label embeddings are kept across runs and the command line logs unexpected
errors."""

import hashlib
import os
from pathlib import Path

CACHE_DIR_VARIABLE = "WILDSEG_CACHE_DIR"
"""Environment variable naming the cache folder."""


def cache_folder() -> Path:
    """$WILDSEG_CACHE_DIR, else $XDG_CACHE_HOME/wildseg, else ~/.cache/wildseg."""
    if os.environ.get(CACHE_DIR_VARIABLE):
        return Path(os.environ[CACHE_DIR_VARIABLE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "wildseg"


def digest(text: str) -> str:
    """SHA-256 of a string, in hex (the cache's keys)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
