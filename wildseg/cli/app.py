"""The `wildseg` command group: one line per mistake, and the settings of the process the command runs in.

Every error a user can fix is printed as one line `wildseg: error: ...` with exit code 2, no traceback, its
settings worded as this command line's flags (`errors.setting`). The model libraries (torch, open_clip) are
imported only where a command needs them, so that help, version, usage errors and the checks made before the model
loads answer at once.
"""

import logging
import sys
import warnings
from pathlib import Path

import click
from PIL import Image

from ..errors import LOG, WildsegError, WordedMessage
from ..version import __version__

USAGE_ERROR = 2
INTERRUPTED = 130
FLAGS = {"crf_iterations": "--crf-iters", "pamr_iterations": "--pamr-iters", "model_name": "--model"}
"""Settings whose flag is not their name with dashes."""
NO_FLAG = {"temperature", "view_batch", "long_side", "background_words", "pamr_dilations"}
"""Settings of the Python API that the command line does not offer: their name is said as it is."""


def flag(name: str) -> str:
    """The command-line flag of a setting of the Python API (`crf_iterations` -> `--crf-iters`)."""
    if name in NO_FLAG:
        return name
    return FLAGS.get(name, "--" + name.replace("_", "-"))


class OneLineErrors(click.Group):
    """A click group whose usage errors and WildsegErrors print a single line and exit with code 2."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as help_request:
            click.echo(help_request.ctx.get_help())
            sys.exit(0)
        except click.exceptions.Abort:
            fail("interrupted")
        except click.ClickException as error:
            fail(error.format_message().replace("\n", " "))
        except WildsegError as error:
            fail(error.worded(flag))


def fail(message: str) -> None:
    """Print one error line and exit with the usage error's code."""
    click.echo(f"wildseg: error: {message}", err=True)
    sys.exit(USAGE_ERROR)


def warn_in_one_line(message, category, filename, lineno, file=None, line=None):
    """A warning as one line on stderr, its settings worded as flags, written through `sys.stderr` so that a live
    progress display (which redirects it) prints it above itself."""
    text = message.worded(flag) if isinstance(message, WordedMessage) else str(message)
    print(f"wildseg: warning: {text}", file=sys.stderr)


class ErrorLog(logging.FileHandler):
    """A log file made, with its folder, when the first record comes (none for a run without unexpected errors)."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return
        super().emit(record)


def configure_process() -> None:
    """What the command sets for its own process: warnings in one line (without Pillow's decompression-bomb notice,
    whose limit wildseg reports itself, and torch's notice that the sparse tensors of the torch CRF are a beta
    feature); other libraries' log lines held back (the one-line errors say what went wrong); wildseg's own log of
    unexpected errors (`errors.LOG`) kept, with tracebacks, in the cache folder."""
    warnings.showwarning = warn_in_one_line
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
    root = logging.getLogger()
    root.setLevel(logging.CRITICAL)
    if not any(isinstance(handler, logging.NullHandler) for handler in root.handlers):
        root.addHandler(logging.NullHandler())
    if any(isinstance(handler, ErrorLog) for handler in LOG.handlers):
        return
    from ..cache import cache_folder

    handler = ErrorLog(cache_folder() / "errors.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.ERROR)
    LOG.propagate = False


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wildseg")
def main():
    """Training-free zero-shot semantic segmentation with CLIP."""
    configure_process()
