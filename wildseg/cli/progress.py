"""What the commands show while they work: a status line, progress bars that name their stage with a rate that
means what it says, and one line per failed image. Nothing of it appears with -q or on a pipe, but the failures."""

import contextlib
import datetime
from typing import Optional

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text


def status(console: Console, message: str):
    """A status line while `message` goes on, on a terminal."""
    return console.status(message) if console.is_terminal else contextlib.nullcontext()


def model_loading(console: Console, options: dict):
    """The status line while the model of `options` loads (`factory.loading_message`); when its weights are to be
    downloaded first, a line saying so at once, on a pipe too."""
    from ..factory import loading_message, weights_to_fetch

    fetching = weights_to_fetch(options)
    if fetching is not None:
        console.print(f"wildseg: {fetching}", markup=False, highlight=False, soft_wrap=True)
    return status(console, loading_message(options))


def report_failure(console: Console, image, reason: str) -> None:
    """One line per failed image on stderr, above the progress bar, also with -q."""
    line = f"wildseg: failed: {image}: {reason}"
    if console.quiet:
        click.echo(line, err=True)
    else:
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def embed_ahead(console: Console, segmenter, labels: list[str]) -> None:
    """Embed the run's labels before the first image (`Segmenter.prepare_labels`), with a progress bar of their own
    when the cache does not hold them all."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        prompts = len(segmenter.config.template_set.templates)
        task = progress.add_task(f"embedding labels ({prompts} prompts each)", total=None)
        segmenter.prepare_labels(labels, lambda done, total: progress.update(task, completed=done, total=total))


def advance(progress: Progress, task) -> None:
    """One image more."""
    progress.advance(task)


def image_rate(task) -> Optional[float]:
    """Images finished per second since the task started, when its first image began (model batches finish images
    in bursts: a rate between two images of one burst would mean nothing); None until an image is done."""
    elapsed = task.elapsed
    return task.completed / elapsed if task.completed and elapsed else None


class RateColumn(ProgressColumn):
    """Images per second (`image_rate`)."""

    def render(self, task) -> Text:
        rate = image_rate(task)
        return Text("- img/s" if rate is None else f"{rate:.2f} img/s")


class TimeLeftColumn(ProgressColumn):
    """Time left at `image_rate` ('-:--:--' until there is one)."""

    def render(self, task) -> Text:
        rate = image_rate(task)
        if rate is None or task.total is None:
            return Text("-:--:-- left")
        return Text(f"{datetime.timedelta(seconds=round((task.total - task.completed) / rate))} left")


def image_progress(console: Console) -> Progress:
    """The progress bar of a run over images."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeElapsedColumn(), TimeLeftColumn(), console=console, transient=True,
                    disable=not console.is_terminal)
