"""The options the commands share, each named as the Python API names its setting (`--crf-iters` gives
`crf_iterations`), so that the values go to `factory.build_segmenter` as they are."""

from pathlib import Path

import click

from .. import methods
from ..choices import (
    ACTIVATIONS,
    CRF_BACKENDS,
    CRF_ITERATIONS,
    DEFAULT_ATTENTION,
    DEFAULT_MAX_SIDE,
    DEFAULT_SAM2_MODEL,
    DEFAULT_START_BLOCK,
    DEFAULT_TEMPLATES,
    DENSE_LOGIT_SCALE,
    DENSE_SHORT_SIDE,
    DENSE_WINDOW,
    GLOBAL_CONTEXTS,
    METHODS,
    MIN_WORKING_SIDE,
    NORMALIZATIONS,
    PAMR_ITERATIONS,
    PRECISIONS,
    REFINEMENTS,
    RFCLIP_DEFAULTS,
    TTA_POLICIES,
)
from ..errors import WildsegError

DENSE_METHODS = methods.names(methods.DENSE)


def decorated(command, options: list):
    """`command` with `options` applied, the first listed first in the help."""
    for option in reversed(options):
        command = option(command)
    return command


def export_options(command):
    """The options that write the outputs as a data set other tools load (`export`)."""
    return decorated(command, [
        click.option("--coco", "coco_path", type=click.Path(path_type=Path), metavar="FILE",
                     help="Write the output folder's images as one COCO instance-segmentation file (RLE masks)."),
        click.option("--yolo", "yolo_folder", type=click.Path(path_type=Path), metavar="DIR",
                     help="Write the output folder's images as an Ultralytics YOLO segmentation data set here."),
        click.option("--yolo-min-region", type=click.FloatRange(0.0, 1.0),
                     help="With --yolo: least share of the image a region must cover to become a polygon "
                          "[default: 0.0001]."),
        click.option("--instances", is_flag=True,
                     help="One annotation per object (a region given one class) instead of per class. segment: "
                          "also write <name>_instances.png and the objects in the JSON (needs regions: --refine "
                          "regions or --method corrclip); export: from such a run."),
    ])


def ray_options(command):
    """The options that run a command on a Ray cluster (`distributed`)."""
    return decorated(command, [
        click.option("--ray", "ray_address", is_flag=False, flag_value="local", metavar="[ADDRESS]",
                     help="Run on a Ray cluster: alone (or `local`) a Ray instance on this machine using all its "
                          "GPUs (else CPUs); `auto` or HOST:PORT a running cluster, whose nodes see the inputs and "
                          "outputs at the same paths. pip install 'wildseg[ray]'."),
        click.option("--ray-workers", type=click.IntRange(min=1),
                     help="With --ray: workers (each loads the model once) [default: one per GPU, else per CPU]."),
        click.option("--ray-gpus-per-worker", type=click.FloatRange(min=0),
                     help="With --ray: GPUs each worker reserves, e.g. 0.5 for two per GPU [default: 1 where the "
                          "cluster has GPUs, else 0]."),
        click.option("--ray-cpus-per-worker", type=click.FloatRange(min=0, min_open=True),
                     help="With --ray: CPUs each worker reserves (its torch threads on the CPU) [default: 1]."),
    ])


def segmenter_options(bg_threshold_help: str, defaults_help: str):
    """The options that build a Segmenter, shared by the commands that segment. Options whose default depends on
    the method or the command (`defaults_help` says how) default to None here: `factory.build_segmenter` resolves
    them."""
    options = [
        click.option("--model", default="ViT-B-16", show_default=True,
                     help="open_clip architecture (see `wildseg models`)."),
        click.option("--pretrained", default="openai", show_default=True,
                     help="open_clip pretrained tag, downloaded and cached on first use; 'none' for random weights."),
        click.option("--model-config", type=click.Path(path_type=Path),
                     help="An open_clip model config JSON to register first: --model then names it by its file stem."),
        click.option("--checkpoint", type=click.Path(path_type=Path),
                     help="Local weights: open_clip state dict (.pt/.bin/.safetensors) or OpenAI JIT archive."),
        click.option("--cache-dir", type=click.Path(path_type=Path), help="Where open_clip caches downloaded weights."),
        click.option("--activation", type=click.Choice(list(ACTIVATIONS)), default="auto", show_default=True,
                     help="MLP activation: auto follows the weights (QuickGELU for OpenAI's), else gelu or quickgelu."),
        click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                     help="auto = CUDA when available, else CPU."),
        click.option("--precision", type=click.Choice(list(PRECISIONS)), default="auto", show_default=True,
                     help="The model's arithmetic: auto = fp16 autocast on CUDA, fp32 on the CPU; fp16 or bf16 "
                          "autocast (the relevance rule, probabilities and refinement stay fp32); fp32."),
        click.option("--method", type=click.Choice([*METHODS, *DENSE_METHODS]), default="relevance",
                     show_default=True,
                     help="relevance: Chefer et al. relevance (Zabari & Hoshen); dense: patch tokens of a "
                          "training-free dense method (--attention); a dense method's name (corrclip, naclip, ...) "
                          "is short for dense with that --attention."),
        click.option("--attention", type=click.Choice(DENSE_METHODS),
                     help=f"Dense method: which one ({', '.join(DENSE_METHODS)}) [default: {DEFAULT_ATTENTION}]."),
        click.option("--dino-model",
                     help="CorrCLIP: its DINO by timm's name (vit_small_patch8_224.dino for ViT-S/8) "
                          "[default: vit_base_patch8_224.dino, DINO ViT-B/8]."),
        click.option("--dino-checkpoint", type=click.Path(path_type=Path),
                     help="CorrCLIP: local DINO weights (a state dict in DINO's or timm's key names)."),
        click.option("--window", type=click.IntRange(min=0),
                     help="Dense method: sliding-window side in pixels, 0 for the whole image in one pass "
                          f"[default: {DENSE_WINDOW}]."),
        click.option("--stride", type=click.IntRange(min=1),
                     help="Dense method: window stride [default: half the window]."),
        click.option("--short-side", type=click.IntRange(min=16),
                     help=f"Dense method: the image is seen at this short side [default: {DENSE_SHORT_SIDE}]."),
        click.option("--logit-scale", type=click.FloatRange(min=0, min_open=True),
                     help=f"Dense method: softmax scale of the patch-label cosines [default: {DENSE_LOGIT_SCALE:g}]."),
        click.option("--normalization", type=click.Choice(list(NORMALIZATIONS)),
                     help="Dense method: pixel normalisation: official (the constants of the method's official "
                          "code), model (the model's own) [default: auto = official when the model's constants are "
                          "CLIP's, else model]."),
        click.option("--global-weight", type=click.FloatRange(0.0, 1.0),
                     help="RF-CLIP (--attention rfclip): share of the global vector's label cosines in the map "
                          f"[default: {RFCLIP_DEFAULTS['global_weight']}]."),
        click.option("--prompt-shift", type=click.FloatRange(0.0, 1.0),
                     help="RF-CLIP: how far each label cluster's best label moves towards its best patches "
                          f"[default: {RFCLIP_DEFAULTS['prompt_shift']}]."),
        click.option("--cluster-threshold", type=click.FloatRange(0.0, 2.0),
                     help="RF-CLIP: cosine distance at which the labels' clusters are cut "
                          f"[default: {RFCLIP_DEFAULTS['cluster_threshold']}]."),
        click.option("--global-context", type=click.Choice(list(GLOBAL_CONTEXTS)),
                     help="RF-CLIP: the global vector of the whole image (a pass of its own) or of each window "
                          f"[default: {RFCLIP_DEFAULTS['global_context']}]."),
        click.option("--tta", type=click.Choice(TTA_POLICIES),
                     help="Test-time augmentation views (see docs/segment.md) [default: default]."),
        click.option("--refine", type=click.Choice(list(REFINEMENTS)),
                     help="Refinement of the pseudo-labels, applied in the order named: PAMR (on the model's "
                          "device), the region vote (each region takes its mean probabilities, --regions), the "
                          "dense CRF [default: crf]."),
        click.option("--regions",
                     help="With --refine regions or --method corrclip: where the regions come from: slic or "
                          "felzenszwalb (scikit-image superpixels of the image), sam2 (SAM 2's automatic masks, the "
                          "sam2 extra), or a folder of region maps named by the image's stem (<stem>.npz with key "
                          "instance_mask, as CorrCLIP releases them, or <stem>.png of region ids, 0 unsegmented) "
                          "[default: slic]."),
        click.option("--sam2-model",
                     help=f"With --regions sam2: the SAM 2 model, a Hugging Face Hub name or a folder saved by "
                          f"transformers [default: {DEFAULT_SAM2_MODEL}]."),
        click.option("--sam2-points", type=click.IntRange(min=1),
                     help="With --regions sam2: prompt points per side of the image [default: 8, CorrCLIP's]."),
        click.option("--crf-iters", "crf_iterations", type=click.IntRange(min=1),
                     help=f"Mean-field iterations of the dense CRF [default: {CRF_ITERATIONS}]."),
        click.option("--crf-backend", type=click.Choice(list(CRF_BACKENDS)),
                     help="Dense CRF implementation: torch (on the model's device) or pydensecrf (CPU) "
                          "[default: auto = torch on a GPU, pydensecrf on the CPU]."),
        click.option("--pamr-iters", "pamr_iterations", type=click.IntRange(min=1),
                     help=f"PAMR iterations [default: {PAMR_ITERATIONS}]."),
        click.option("--bg-threshold", type=click.FloatRange(0.0, 1.0), help=bg_threshold_help),
        click.option("--max-side", type=click.IntRange(min=MIN_WORKING_SIDE),
                     help="Working resolution: larger images are segmented at this long side; masks are full size "
                          f"[default: {DEFAULT_MAX_SIDE}]."),
        click.option("--start-block", type=int,
                     help="Relevance method: first block whose attention enters the relevance (-1 = last only, "
                          f"0 = all) [default: {DEFAULT_START_BLOCK}]."),
        click.option("--templates",
                     help="Prompt templates: imagenet80 (CLIP's 80), photo ('a photo of a {}.'), or a file with one "
                          "template per line containing {} (blank lines and # comments ignored) "
                          f"[default: {DEFAULT_TEMPLATES}]."),
        click.option("--text-cache", type=click.Path(path_type=Path),
                     help="Folder caching label embeddings across runs [default: $WILDSEG_CACHE_DIR, else "
                          "$XDG_CACHE_HOME/wildseg, else ~/.cache/wildseg]."),
        click.option("--no-text-cache", is_flag=True, default=None,
                     help="Compute label embeddings afresh, without reading or writing the cache."),
    ]

    def decorate(command):
        command = decorated(command, options)
        command.__doc__ = f"{command.__doc__.rstrip()}\n\n    {defaults_help}"
        return command

    return decorate


SEGMENT_OPTIONS = segmenter_options(
    "Background threshold: relevance method, normalised relevance (default 0.4); dense method, label probability "
    "(default 0.1); below it a pixel is background.",
    "Dense method defaults: attention naclip, window 224, stride 112, short side 336, logit scale 40, background "
    "words of PASCAL VOC's background class; both methods: tta default, refine crf.")
"""The segmenter options of the commands that segment images of the user's (segment, demo)."""


def segmenter_values(arguments: dict) -> dict:
    """The segmenter options of a command as `factory.build_segmenter` takes them: a dense method named by
    `--method` becomes `--method dense --attention NAME`, `--no-text-cache` becomes `text_cache` False, and paths are
    absolute (`factory.absolute_paths`)."""
    from ..factory import absolute_paths

    from ..config import dense_shorthand

    values = dict(arguments)
    if values.get("method") is not None:
        values["method"], values["attention"] = dense_shorthand(values["method"], values.get("attention"))
    if values.pop("no_text_cache", None):
        if values.get("text_cache") is not None:
            raise WildsegError("--text-cache names the cache folder and --no-text-cache turns the cache off: give one")
        values["text_cache"] = False
    return absolute_paths(values)
