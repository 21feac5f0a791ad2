"""Half precision without a GPU: the path a GPU takes (16-bit autocast, batched views, the torch CRF) run on the CPU
in float16 and bfloat16, against fp32 and the official implementations' oracles.

CPU autocast does not cast exactly the ops CUDA's does (CUDA runs softmax and layer norm in fp32, the CPU in the
16-bit type), so these tests bound the rounding rather than reproduce a GPU's bits; a dtype mismatch anywhere on the
path fails them. Tolerances, relative to the largest oracle value, with what a 2-core AMD EPYC measured: fp16
(unit roundoff 2^-11 = 4.9e-4) relevance 3e-3 (1.6e-3), dense features 2.5e-3 (1.1e-3); bf16 (unit roundoff 2^-8 =
3.9e-3, eight times coarser) relevance 3e-2 (1.5e-2), dense features 2e-2 (9.8e-3). NACLIP's whole VOC21 pipeline
gives the oracle's label maps on at least 99.9% of the pixels in fp16 (99.96% measured) and 99.5% in bf16 (99.76%).
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from conftest import ORACLE_MODEL, oracle_file, tiny_cli_args
from test_export import camvid_pictures
from test_oracles import IMAGES, NACLIP_VARIANTS, VOC_IMAGE, image_file, protocol_segmenter

from wildseg import Segmenter, SegmenterConfig
from wildseg.backbone import load_backbone
from wildseg.cli import main
from wildseg.errors import WildsegError
from wildseg.evaluation import Query, dense_class_prediction
from wildseg.methods import relevance
from wildseg.methods.relevance import forward_with_class_attention, relevance_maps

HALF = ("fp16", "bf16")
RELEVANCE_TOLERANCE = {"fp16": 3e-3, "bf16": 3e-2}
FEATURE_TOLERANCE = {"fp16": 2.5e-3, "bf16": 2e-2}
LABEL_AGREEMENT = {"fp16": 0.999, "bf16": 0.995}


@pytest.fixture(scope="module")
def oracle_backbones():
    return {precision: load_backbone(ORACLE_MODEL, checkpoint=oracle_file("tiny_openai_sd.pt"), device="cpu",
                                     precision=precision) for precision in ("fp32", *HALF)}


@pytest.mark.parametrize("precision", HALF)
@pytest.mark.parametrize("start_block, key", [(-1, "relevance_start_m1"), (0, "relevance_start_0")])
def test_half_precision_relevance_stays_within_its_rounding_of_chefer_et_al(oracle_backbones, precision,
                                                                            start_block, key):
    chefer = np.load(oracle_file("chefer.npz"))
    backbone = oracle_backbones[precision]
    image = Segmenter(backbone, SegmenterConfig()).pipeline.normalized(chefer["image_u8"])[None]
    text = F.normalize(torch.from_numpy(chefer["text_features"]), dim=-1)
    with backbone.autocast():
        maps = relevance_maps(backbone.tower, image, text, start_block)
    assert maps.dtype == torch.float32, "the relevance rule runs in fp32"
    error = np.abs(maps[0].numpy() - chefer[key]).max() / np.abs(chefer[key]).max()
    assert error <= RELEVANCE_TOLERANCE[precision]
    assert error > 1e-5, "the forward did run in 16 bits (fp32 agrees to 1e-7)"


@pytest.mark.parametrize("precision", HALF)
@pytest.mark.parametrize("attention", ["naclip", "sclip", "clearclip", "vanilla"])
def test_half_precision_dense_features_stay_within_their_rounding_of_the_official_segmentors(
        oracle_backbones, precision, attention):
    oracle = np.load(oracle_file("dense_windows.npz"))
    backbone = oracle_backbones[precision]
    segmenter = protocol_segmenter(backbone, attention, short_side=336)
    whole = segmenter.pipeline.normalized(segmenter.pipeline.decode(image_file(*VOC_IMAGE)).source)[None]
    for window, image in (("win224", torch.from_numpy(oracle["input_win224"])), ("full336x448", whole)):
        with torch.no_grad(), backbone.autocast():
            features = segmenter.method.features(backbone.tower, image)[0]
        expected = oracle[f"{attention}_{window}_features"]
        assert features.dtype == torch.float32
        assert np.abs(features.numpy() - expected).max() / np.abs(expected).max() <= FEATURE_TOLERANCE[precision]


@pytest.mark.parametrize("precision", HALF)
def test_half_precision_naclip_gives_the_oracles_label_maps(oracle_backbones, precision):
    oracle = np.load(oracle_file("naclip_voc21.npz"))
    words, owners = oracle["query_words"].tolist(), oracle["query_idx"]
    query = Query(words, list(range(21)), [np.flatnonzero(owners == index).tolist() for index in range(21)])
    for variant in ("cfg", "slide224_nopamr"):  # with and without PAMR, whole image and windows (fp16 is slow here)
        window, refine = NACLIP_VARIANTS[variant]
        segmenter = protocol_segmenter(oracle_backbones[precision], "naclip", window=window, refine=refine,
                                       background_words=())
        for image in IMAGES:
            probabilities = segmenter.query_probabilities(image_file(*IMAGES[image]), words)
            for threshold in (0.1, 0):
                predicted = dense_class_prediction(probabilities, query, probabilities.shape[1:], threshold, None, 0)
                agreement = (predicted == oracle[f"{image}_{variant}_pred_thd{threshold}"]).mean()
                assert agreement >= LABEL_AGREEMENT[precision], (variant, image, threshold)


def class_attention_gradients(backbone, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The gradients of every label's logit with respect to the last block's class attention as the backward left
    them (in the autocast's type, multiplied by the scale), and that scale."""
    with torch.enable_grad(), backbone.autocast():
        embeddings, attention = forward_with_class_attention(backbone.tower, image)
        logits = backbone.tower.logit_scale.exp() * F.normalize(embeddings, dim=-1) @ text.to(embeddings.dtype).T
        gradients, scale = relevance.attention_gradients(logits, [attention])
    return gradients[0], scale


def test_fp16_loss_scaling_lifts_vit_b_gradients_out_of_the_subnormal_range_and_backs_off_on_overflow(monkeypatch):
    """ViT-B/16 (random weights, a real VOC photo): unscaled, some of the class attention's fp16 gradients fall
    below fp16's smallest normal number (2^-14) and lose bits (measured: 0.085%); with the scale of 2^8 none do.
    A scale that overflows is backed off to 1."""
    torch.manual_seed(0)
    backbone = load_backbone("ViT-B-16", pretrained=None, device="cpu", precision="fp32")
    pipeline = Segmenter(backbone, SegmenterConfig()).pipeline
    photo = Image.fromarray(pipeline.decode(image_file(*VOC_IMAGE)).working).resize((224, 224), Image.BICUBIC)
    image = pipeline.normalized(np.array(photo))[None]
    text = backbone.embed_labels(["cat", "dog", "sofa", "car"], "photo", cached=False)
    exact, _ = class_attention_gradients(backbone, image, text)
    backbone.precision = "fp16"
    scaled, scale = class_attention_gradients(backbone, image, text)
    monkeypatch.setattr(relevance, "GRADIENT_SCALE", 1.0)
    unscaled, _ = class_attention_gradients(backbone, image, text)
    assert scale == 2.0**8 and scaled.dtype == unscaled.dtype == torch.float16
    nonzero = exact != 0
    subnormal = [float(((values.float().abs() < 2**-14) & nonzero).float().mean()) for values in (unscaled, scaled)]
    assert subnormal[0] > 1e-4 and subnormal[1] < subnormal[0] / 10
    monkeypatch.setattr(relevance, "GRADIENT_SCALE", 2.0**30)
    backed_off, factor = class_attention_gradients(backbone, image, text)
    assert factor == 1.0 and torch.equal(backed_off, unscaled), "overflow: redone unscaled"


@pytest.mark.parametrize("method", ["relevance", "naclip"])
def test_the_gpu_path_on_the_cpu_in_half_precision_gives_fp32s_masks(tmp_path, tiny_checkpoint, method):
    """`wildseg segment` as a GPU runs it (16-bit autocast, the default views batched, PAMR, the torch CRF) on two real
    CamVid frames with the tiny model: the masks agree with fp32's on at least 99% of the pixels (measured: 99.9% to
    100%), the records name the precision and each precision has its own label-cache entry."""
    camvid_pictures(tmp_path / "images", 2)
    masks = {}
    for precision in ("fp32", *HALF):
        out = tmp_path / precision
        result = CliRunner().invoke(main, [
            "segment", str(tmp_path / "images"), "-l", "road,car,sky,building", "-q",
            *map(str, tiny_cli_args(tiny_checkpoint)), "--method", method, "--precision", precision,
            "--refine", "pamr+crf", "--crf-backend", "torch", "--text-cache", str(tmp_path / "cache"), "-o", str(out)])
        assert result.exit_code == 0, result.output
        records = [json.loads(path.read_text()) for path in sorted(out.glob("*.json"))]
        assert [record["settings"]["precision"] for record in records] == [precision] * 2
        masks[precision] = [np.array(Image.open(path)) for path in sorted(out.glob("*[0-9].png"))]
    for precision in HALF:
        assert all((half == full).mean() >= 0.99 for half, full in zip(masks[precision], masks["fp32"])), precision
    keys = [json.loads(path.read_text())["precision"] for path in (tmp_path / "cache").rglob("key.json")]
    assert sorted(keys) == ["cpu bf16", "cpu fp16", "cpu fp32"]


def test_precision_problems_are_one_line_errors():
    result = CliRunner().invoke(main, ["segment", "x.jpg", "-l", "cat", "--precision", "fp8"])
    assert result.exit_code == 2 and "'fp8' is not one of 'auto', 'fp32', 'fp16', 'bf16'" in result.output
    with pytest.raises(WildsegError, match="unknown .*precision.* 'fp8'"):
        load_backbone(ORACLE_MODEL, checkpoint=oracle_file("tiny_openai_sd.pt"), device="cpu", precision="fp8")
    assert load_backbone(ORACLE_MODEL, checkpoint=oracle_file("tiny_openai_sd.pt"), device="cpu").precision == "fp32"


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["relevance", "naclip"])
def test_on_a_gpu_fp16_gives_the_cpus_fp32_masks(tmp_path, tiny_checkpoint, method):
    """The tiny model on two CamVid frames: `--device cuda` (fp16 autocast, the torch CRF on the GPU) against the
    CPU in fp32, to the CPU's fp16 bound (99% of the pixels)."""
    camvid_pictures(tmp_path / "images", 2)
    masks = {}
    for device in ("cpu", "cuda"):
        arguments = [str(value) for value in tiny_cli_args(tiny_checkpoint)]
        arguments[arguments.index("--device") + 1] = device
        result = CliRunner().invoke(main, ["segment", str(tmp_path / "images"), "-l", "road,car,sky,building", "-q",
                                           *arguments, "--method", method, "-o", str(tmp_path / device)])
        assert result.exit_code == 0, result.output
        masks[device] = [np.array(Image.open(path)) for path in sorted((tmp_path / device).glob("*[0-9].png"))]
    settings = json.loads(next((tmp_path / "cuda").glob("*.json")).read_text())["settings"]
    assert settings["device"] == "cuda" and settings["precision"] == "fp16"
    assert all((gpu == cpu).mean() >= 0.99 for gpu, cpu in zip(masks["cuda"], masks["cpu"]))
