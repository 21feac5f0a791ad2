"""Files written whole or not at all: a temporary file beside the target, renamed over it once complete."""

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import WildsegError, first_line

TEMPORARY_SUFFIX = ".part"
"""The suffix of a file being written (`.NAME.<random letters>.part` beside NAME); one left behind was cut off
mid-write."""


def process_umask() -> int:
    """The process's file-mode creation mask, read from /proc where Linux has it; elsewhere set and restored at
    once (which writer threads must not race: this runs once, at import)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


PROCESS_UMASK = process_umask()


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it over `path`; never leave a partial file.
    The file gets the permissions a plain `open` would give it (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~PROCESS_UMASK)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, data, what: str) -> None:
    """Write `data` as indented JSON to `path` atomically; a failure is one line naming `what` was being written."""
    text = json.dumps(data, indent=2) + "\n"
    try:
        write_atomically(path, lambda temporary: temporary.write_text(text))
    except OSError as error:
        raise WildsegError(f"cannot write {what} {path}: {first_line(error)}") from None
