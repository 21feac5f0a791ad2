"""The `wildseg` command: a thin click layer over the Python API.

Every error a user can fix is printed as one line `wildseg: error: ...` with exit code 2, no traceback.
"""

import logging
import os
import sys
import time
import warnings
from pathlib import Path

import click
import open_clip
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .backbone import DEFAULT_TEMPLATES, TEMPLATE_SETS
from .errors import WildsegError, first_line
from .images import load_image
from .labels import clean_labels
from .outputs import output_paths, write_outputs
from .pseudolabels import DEFAULT_BG_THRESHOLD
from .refine import REFINEMENTS, CrfSettings
from .relevance import DEFAULT_START_BLOCK
from .segmenter import Segmenter
from .tta import POLICIES

USAGE_ERROR = 2


class OneLineErrors(click.Group):
    """A click group whose usage errors and WildsegErrors print a single line and exit with code 2."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as help_request:
            click.echo(help_request.ctx.get_help())
            sys.exit(0)
        except click.exceptions.Abort:
            _fail("interrupted")
        except click.ClickException as error:
            _fail(error.format_message().replace("\n", " "))
        except WildsegError as error:
            _fail(str(error))


def _fail(message: str) -> None:
    click.echo(f"wildseg: error: {message}", err=True)
    sys.exit(USAGE_ERROR)


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None):
    click.echo(f"wildseg: warning: {message}", err=True)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wildseg")
def main():
    """Training-free zero-shot semantic segmentation with CLIP."""
    warnings.showwarning = _warn_in_one_line
    logging.getLogger().setLevel(logging.ERROR)


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--labels", "-l", required=True, help='Comma-separated names of what is in the image, e.g. "cat,sofa".')
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path), default=Path("wildseg_out"), show_default=True,
              help="Folder for the mask PNG, overlay JPEG and JSON record.")
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip architecture (see `wildseg models`).")
@click.option("--pretrained", default="openai", show_default=True,
              help="open_clip pretrained tag, downloaded and cached on first use; 'none' for random weights.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Local weights: open_clip state dict (.pt/.bin/.safetensors) or OpenAI JIT archive.")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Where open_clip caches downloaded weights.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="auto = CUDA when available (fp16), else CPU (fp32).")
@click.option("--tta", type=click.Choice(list(POLICIES)), default="default", show_default=True,
              help="Test-time augmentation views (see README).")
@click.option("--refine", type=click.Choice(list(REFINEMENTS)), default="crf", show_default=True,
              help="Refinement of the pseudo-labels.")
@click.option("--crf-iters", type=click.IntRange(min=1), default=CrfSettings.iterations, show_default=True,
              help="Mean-field iterations of the dense CRF.")
@click.option("--bg-threshold", type=click.FloatRange(0.0, 1.0), default=DEFAULT_BG_THRESHOLD, show_default=True,
              help="Pixels whose best normalised label relevance is below this are background.")
@click.option("--start-block", type=int, default=DEFAULT_START_BLOCK, show_default=True,
              help="First transformer block whose attention enters the relevance (-1 = last only, 0 = all).")
@click.option("--templates", type=click.Choice(list(TEMPLATE_SETS)), default=DEFAULT_TEMPLATES, show_default=True,
              help="Prompt templates: CLIP's 80 ImageNet templates, or 'a photo of a {}.'.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display and no summary table.")
def segment(image, labels, out_dir, model, pretrained, checkpoint, cache_dir, device, tta, refine, crf_iters,
            bg_threshold, start_block, templates, quiet):
    """Segment IMAGE into background and the given labels; writes IMAGE's stem .png, _overlay.jpg and .json."""
    started = time.perf_counter()
    paths = output_paths(image, out_dir)
    _refuse_to_overwrite_input(image, paths.values())
    _check_output_folder(out_dir, paths.values())
    names = clean_labels(labels)
    pixels = load_image(image)
    decode_s = time.perf_counter() - started
    console = Console(stderr=True, quiet=quiet)
    with console.status("loading the model", spinner="dots"):
        segmenter = Segmenter(
            model=model, pretrained=pretrained, checkpoint=checkpoint, device=device, cache_dir=cache_dir, tta=tta,
            refine=refine, crf=CrfSettings(iterations=crf_iters), bg_threshold=bg_threshold, start_block=start_block,
            templates=templates,
        )
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"segmenting {image.name}", total=None)
        result = segmenter.segment(pixels, names, on_progress=lambda done, total: progress.update(
            task, completed=done, total=total))
    record = {
        "image": str(image),
        "image_size": {"width": int(result.mask.shape[1]), "height": int(result.mask.shape[0])},
        "labels": result.labels,
        "classes": result.summary(),
        "settings": segmenter.settings(),
        "timings_s": {**result.timings, "decode_s": decode_s, "total_s": time.perf_counter() - started},
    }
    try:
        write_outputs(paths, result.image, result.mask, result.labels, record)
    except OSError as error:
        raise WildsegError(f"cannot write the outputs into {out_dir}: {first_line(error)}") from None
    report = Console(quiet=quiet)
    report.print(_summary_table(result.summary()))
    report.print(f"wrote {paths['mask']}, {paths['overlay'].name}, {paths['record'].name}")


def _refuse_to_overwrite_input(image: Path, outputs) -> None:
    if image.exists() and any(path.exists() and path.resolve() == image.resolve() for path in outputs):
        raise WildsegError(f"the output would overwrite the input {image}: choose another --out folder")


def _check_output_folder(out_dir: Path, outputs) -> None:
    """Fail before any work when the outputs could not be written: --out under a file, unwritable, or taken."""
    nearest = next(folder for folder in (out_dir.absolute(), *out_dir.absolute().parents) if folder.exists())
    if not nearest.is_dir():
        raise WildsegError(f"{nearest} is a file, not a folder: choose another --out")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise WildsegError(f"cannot write into {nearest}: choose an --out folder you can write to")
    for path in outputs:
        if path.is_dir():
            raise WildsegError(f"the output path {path} is a folder: move it away or choose another --out")


def _summary_table(rows: list[dict]) -> Table:
    table = Table()
    table.add_column("class", justify="right")
    table.add_column("label")
    table.add_column("pixels", justify="right")
    table.add_column("mean score", justify="right")
    for index, row in enumerate(rows):
        if row["pixel_fraction"] > 0:
            table.add_row(str(index), row["label"], f"{row['pixel_fraction']:.1%}", f"{row['mean_score']:.2f}")
    return table


@main.command()
def models():
    """List open_clip architectures and their pretrained tags."""
    for name in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(name)
        click.echo(f"{name}: {', '.join(tags) if tags else '(no pretrained tags)'}")
