"""`wildseg demo`: the web page (`wildseg.demo`, Gradio) started with the command's settings."""

import click

from ..choices import AUTO_MIN_AREA, AUTO_MIN_SCORES, DEFAULT_VOCABULARY, VOCABULARIES
from .options import SEGMENT_OPTIONS, segmenter_values


@click.command()
@SEGMENT_OPTIONS
@click.option("--vocab", help=f"For labels 'auto' in the page: {', '.join(VOCABULARIES)} or a class-name file "
                              f"[default: {DEFAULT_VOCABULARY}].")
@click.option("--auto-min-area", type=click.FloatRange(0.0, 1.0),
              help=f"For labels 'auto': the page's first least share of the image [default: {AUTO_MIN_AREA}].")
@click.option("--auto-min-score", type=click.FloatRange(0.0, 1.0),
              help="For labels 'auto': the page's first least mean score [default: "
                   f"{AUTO_MIN_SCORES['relevance']} relevance, {AUTO_MIN_SCORES['dense']} dense].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on: 0.0.0.0 lets other machines reach the page.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port to serve on.")
@click.option("--quiet", "-q", is_flag=True, help="No status line while the model loads.")
def demo(vocab, auto_min_area, auto_min_score, host, port, quiet, **segmenter_arguments):
    """Serve a web page (Gradio) to try labels on your images with one model kept loaded.

    Upload an image, type labels (or auto), choose method, attention and refinement, and see the overlay, the
    classes and each label's heat map; download the mask and JSON. The page starts with this command's settings.
    Needs pip install 'wildseg[demo]'. Ctrl-C stops it.
    """
    from ..config import SegmenterConfig

    options = segmenter_values(segmenter_arguments)
    SegmenterConfig.from_options(options)
    from ..demo import launch  # Gradio: a one-line error with the install command where it is missing

    launch(options, host, port, vocab, auto_min_area, auto_min_score, quiet)
