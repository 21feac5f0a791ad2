"""The names and defaults of wildseg's choices, in a module that imports nothing heavy.

The command line builds its options, help and checks from these before any model library (torch, open_clip)
is imported, so that help, version and usage errors answer at once; the modules that implement each choice
take their names and defaults from here.
"""

METHODS = {
    "relevance": "Chefer et al. relevance of each label in CLIP's attention (Zabari & Hoshen's method)",
    "dense": "patch-text maps of a training-free dense method (--attention: MaskCLIP, SCLIP, ClearCLIP, NACLIP, "
             "SC-CLIP, RF-CLIP, CorrCLIP)",
}
DEFAULT_ATTENTION = "naclip"
"""The dense method used when none is named (`wildseg.methods`)."""
TTA_POLICIES = ("none", "default", "heavy")
"""Test-time view policies (`tta.POLICIES`)."""
REFINEMENTS = ("crf", "pamr", "pamr+crf", "regions", "pamr+regions", "regions+crf", "pamr+regions+crf", "none")
"""Refinements, applied in the order named: PAMR, then the region vote, then the dense CRF."""
SUPERPIXELS = {
    "slic": "scikit-image SLIC superpixels of the working image (about 250 regions, compactness 10)",
    "felzenszwalb": "scikit-image Felzenszwalb graph segments of the working image (scale 100, sigma 0.8, min size 50)",
}
"""The region sources that need no files (`refinement.regions.superpixels`); any other is a folder of region maps."""
DEFAULT_REGIONS = "slic"
"""The region source of `--refine regions` where none is given (`refinement.regions`)."""
REGION_MODELS = {
    "sam2": "SAM 2 automatic masks of the image (CorrCLIP's online settings; the sam2 extra)",
}
"""The region sources that run a model (`refinement.automatic_masks`)."""
DEFAULT_DINO_MODEL = "vit_base_patch8_224.dino"
"""DINO ViT-B/8 by timm's name: CorrCLIP's proxy backbone (`backbone.dino`)."""
DEFAULT_SAM2_MODEL = "facebook/sam2-hiera-large"
"""SAM 2 Hiera-L, the checkpoint of CorrCLIP's online masks, by its Hugging Face Hub name (`backbone.sam2`)."""
CRF_BACKENDS = {
    "auto": "torch when the model is on a GPU, pydensecrf on the CPU",
    "torch": "wildseg.refinement.crf.mean_field_crf on the model's device, the images of a model step in one batch",
    "pydensecrf": "pydensecrf on the CPU, in worker processes beside the model on GPU machines",
}
ACTIVATIONS = {
    "auto": "follow the weights: QuickGELU for OpenAI's (tag config, JIT archive, OpenAI state dict), else the config",
    "gelu": "exact GELU, as open_clip's own trainings (LAION, DataComp) use",
    "quickgelu": "QuickGELU x * sigmoid(1.702 x), as OpenAI's CLIP was trained",
}
PRECISIONS = {
    "auto": "fp16 autocast on CUDA, fp32 on the CPU",
    "fp32": "float32 throughout",
    "fp16": "float16 autocast for the model (the relevance rule, probabilities and refinement stay fp32)",
    "bf16": "bfloat16 autocast for the model (the relevance rule, probabilities and refinement stay fp32)",
}
"""The arithmetic of the model's forward (and for the relevance method its backward), `backbone.loading`."""
DEFAULT_TEMPLATES = "imagenet80"
DEFAULT_MAX_SIDE = 1024
"""Working resolution: the longest side an image is segmented at (`resolution`)."""
MIN_WORKING_SIDE = 32
DEFAULT_START_BLOCK = -1
"""Relevance from the last block only, as in Chefer et al.'s CLIP demo; 0 accumulates over every block."""
DEFAULT_BG_THRESHOLD = 0.4
DEFAULT_DENSE_BG_THRESHOLD = 0.1
DEFAULT_TEMPERATURE = 0.1
"""Of the softmax turning per-pixel scores into probabilities (`pseudolabels`)."""
DENSE_WINDOW = 224
DENSE_SHORT_SIDE = 336
DENSE_LOGIT_SCALE = 40.0
NORMALIZATIONS = {
    "auto": "official when the model's own constants are CLIP's (which the official ones round), else model",
    "official": "the constants of the dense method's official code (mmseg's: mean 122.771, 116.746, 104.094, "
                "std 68.501, 66.632, 70.323 in 0-255 units)",
    "model": "the model's own preprocessing constants (open_clip's)",
}
"""How the dense method normalises pixels (`methods.official_normalization`); the relevance method always uses the
model's own constants, as Chefer et al.'s notebook does."""
GLOBAL_CONTEXTS = {
    "image": "the whole image's, from a pass of its own (RF-CLIP's rule on every data set but Cityscapes)",
    "window": "each window's own class token (RF-CLIP's rule on Cityscapes)",
}
"""Where RF-CLIP's global vector comes from (`methods.rfclip`)."""
RFCLIP_DEFAULTS = {"global_weight": 0.1, "prompt_shift": 0.03, "cluster_threshold": 0.1, "global_context": "image"}
"""RF-CLIP's settings where none is given: those of its PASCAL VOC configuration (`methods/rfclip.json`), the one
its evaluation script runs."""
CRF_ITERATIONS = 5
PAMR_ITERATIONS = 10
VOCABULARIES = {"voc": "voc20", "coco": "coco_object", "ade": "ade20k"}
"""Built-in vocabularies of --labels auto: --vocab name -> shipped class-name list."""
DEFAULT_VOCABULARY = "coco"
AUTO_MIN_AREA = 0.01
AUTO_MIN_SCORES = {"relevance": 0.6, "dense": 0.3}
"""Mean score a class found by --labels auto needs by default: normalised relevance (which beats the 0.4
background threshold on every pixel a class owns, so the bar is above it) or label probability (dense,
threshold 0.1)."""
DATASETS = ("voc", "voc20", "context", "context59", "coco-object", "coco-stuff", "ade20k", "cityscapes", "folder")
"""The benchmarks of `wildseg eval` (`datasets.DATASETS`)."""
