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
    """One image more; the first one done marks where the rate starts (`steady_rate`)."""
    progress.advance(task)
    if "first_done" not in progress.tasks[task].fields:
        progress.update(task, first_done=(progress.get_time(), progress.tasks[task].completed))


def steady_rate(task) -> Optional[float]:
    """Images per second since the first image was done, so that the model's warm-up and the label embeddings before
    it do not count and a burst of images finished by one model batch does not read as the rate; None until a second
    image is done."""
    if "first_done" not in task.fields:
        return None
    started, count = task.fields["first_done"]
    elapsed = task.get_time() - started
    return (task.completed - count) / elapsed if task.completed > count and elapsed > 0 else None


class RateColumn(ProgressColumn):
    """Images per second (`steady_rate`)."""

    def render(self, task) -> Text:
        rate = steady_rate(task)
        return Text("- img/s" if rate is None else f"{rate:.2f} img/s")


class TimeLeftColumn(ProgressColumn):
    """Time left at the steady rate ('-:--:--' until there is one)."""

    def render(self, task) -> Text:
        rate = steady_rate(task)
        if rate is None or task.total is None:
            return Text("-:--:-- left")
        return Text(f"{datetime.timedelta(seconds=round((task.total - task.completed) / rate))} left")


def image_progress(console: Console) -> Progress:
    """The progress bar of a run over images."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeElapsedColumn(), TimeLeftColumn(), console=console, transient=True,
                    disable=not console.is_terminal)
