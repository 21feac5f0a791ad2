"""wildseg against the official implementations: the oracle folder (`conftest.ORACLES`) holds what Chefer et al.'s
notebook, NACLIP, SCLIP and ClearCLIP computed on a tiny random CLIP in OpenAI's format. The weights are loaded
through wildseg's own loading path, and the images enter as raw pixels through wildseg's own decoding, resizing and
normalisation, so that a preprocessing difference fails here too; agreement is the evidence that wildseg's numbers
with real weights are the published ones.

Tolerances (absolute), with what is achieved on a 2-core AMD EPYC VM: preprocessed inputs 1e-6 (0: bit for bit);
image features 1e-6 (0); text features 1e-5 (2.1e-6; the official CLIP and open_clip differ by 2.9e-6); relevance
1e-7 (9.8e-9, values up to 0.06); dense patch features and cosines 1e-6 (2.4e-7); PAMR alone 1e-6 (2.8e-7); NACLIP's
whole pipeline, per-class scores 1e-5 (1.5e-6; the official code's own output moves by up to 3e-6 between 1 and 2
threads); label maps on at least 99.999% of the pixels (100%)."""

import json
import warnings
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import ORACLE_MODEL, as_command_line_says, oracle_file, shared_dataset
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from wildseg import Segmenter, SegmenterConfig
from wildseg.backbone import load_backbone
from wildseg.cli import main
from wildseg.datasets.classes import published_class_prompts
from wildseg.errors import WildsegWarning
from wildseg.evaluation import Query, dense_class_prediction, dense_protocol
from wildseg.methods.relevance import relevance_maps
from wildseg.refinement.pamr import pamr
from wildseg.refinement.settings import PamrSettings

@pytest.fixture(scope="module")
def oracle_backbone():
    return load_backbone(ORACLE_MODEL, checkpoint=oracle_file("tiny_openai_sd.pt"), device="cpu")


def test_the_oracle_weights_load_with_quickgelu_and_reproduce_clip_features(oracle_backbone):
    chefer = np.load(oracle_file("chefer.npz"))
    model = oracle_backbone.model
    assert oracle_backbone.activation == "quickgelu"
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(chefer["image"]))
        text = model.encode_text(torch.from_numpy(chefer["tokens"]))
    np.testing.assert_allclose(image.numpy(), chefer["image_features"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(text.numpy(), chefer["text_features"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("start_block, key", [(-1, "relevance_start_m1"), (0, "relevance_start_0")])
def test_relevance_reproduces_chefer_et_al_interpret_from_the_pixels(oracle_backbone, start_block, key):
    """The notebook's resized and cropped pixels, normalised by wildseg's relevance pipeline (CLIP's own constants, as
    the notebook's `preprocess`), give its input; the notebook explains text i on copy i of the image, wildseg every
    label on one image."""
    chefer = np.load(oracle_file("chefer.npz"))
    image = Segmenter(oracle_backbone, SegmenterConfig()).pipeline.normalized(chefer["image_u8"])[None]
    np.testing.assert_allclose(image.numpy(), chefer["image"], atol=1e-6, rtol=0)
    text = F.normalize(torch.from_numpy(chefer["text_features"]), dim=-1)
    maps = relevance_maps(oracle_backbone.tower, image, text, start_block)
    np.testing.assert_allclose(maps[0].numpy(), chefer[key], atol=1e-7, rtol=0)


def protocol_segmenter(backbone, method: str, **changes) -> Segmenter:
    """A Segmenter with the options of `method`'s published VOC21 protocol (`changes` on top)."""
    options = dense_protocol(method, "voc", SimpleNamespace(background_class=0))["options"]
    return Segmenter(backbone, SegmenterConfig.from_options({"method": "dense", "attention": method, **changes},
                                                            options))


VOC_IMAGE = ("voc2012", "JPEGImages/2007_000123.jpg")
IMAGES = {"voc_2007_000123": VOC_IMAGE, "camvid_0001TP_008550": ("camvid", "images/0001TP_008550.png")}
"""The oracle images by their key in `naclip_voc21.npz`: data set and file."""


def image_file(dataset: str, name: str):
    return shared_dataset(dataset) / name


@pytest.mark.parametrize("method", ["naclip", "sclip", "clearclip"])
def test_each_dense_protocol_preprocesses_raw_pixels_as_the_official_code(oracle_backbone, method):
    """From the image file: the resized pixels are mmcv's bit for bit, and the normalised input is the official
    segmentors' (mmseg's constants) to 1e-6. The oracle inputs are at short side 336, NACLIP's and SCLIP's protocol;
    ClearCLIP's protocol resizes to 448 with the same resizing and constants, so its check runs at 336."""
    segmenter = protocol_segmenter(oracle_backbone, method, short_side=336)
    naclip, windows = np.load(oracle_file("naclip_voc21.npz")), np.load(oracle_file("dense_windows.npz"))
    for key, (dataset, name) in IMAGES.items():
        source = segmenter.pipeline.decode(image_file(dataset, name)).source
        np.testing.assert_array_equal(source, naclip[f"{key}_input_u8_rgb"])
    source = segmenter.pipeline.decode(image_file(*VOC_IMAGE)).source
    normalised = segmenter.pipeline.normalized(source)[None]
    np.testing.assert_allclose(normalised.numpy(), windows["input_full336x448"], atol=1e-6, rtol=0)
    assert segmenter.settings()["dense"]["normalization"]["source"] == "official"
    model_constants = protocol_segmenter(oracle_backbone, method, short_side=336, normalization="model")
    assert np.abs(model_constants.pipeline.normalized(source)[None].numpy() - windows["input_full336x448"]).max() > 1e-6


@pytest.mark.parametrize("attention", ["naclip", "sclip", "clearclip", "vanilla"])
@pytest.mark.parametrize("window", ["win224", "full336x448"])
def test_dense_features_reproduce_the_official_segmentors(oracle_backbone, attention, window):
    """Patch features of a 224 window (native positions; the notebook's CLIP input) and of the whole VOC image
    resized to 336 x 448 by wildseg from its file (interpolated positions)."""
    oracle = np.load(oracle_file("dense_windows.npz"))
    segmenter = protocol_segmenter(oracle_backbone, attention, short_side=336)
    if window == "win224":
        image = torch.from_numpy(oracle["input_win224"])
    else:
        image = segmenter.pipeline.normalized(segmenter.pipeline.decode(image_file(*VOC_IMAGE)).source)[None]
    with torch.no_grad():
        features = segmenter.method.features(oracle_backbone.tower, image)[0]
    np.testing.assert_allclose(features.numpy(), oracle[f"{attention}_{window}_features"], atol=1e-6, rtol=0)
    text = torch.from_numpy(oracle[f"text_embeddings_{'naclip' if attention == 'vanilla' else attention}"])
    np.testing.assert_allclose((features @ text.T).numpy(), oracle[f"{attention}_{window}_logits"], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def gelu_config_model(tmp_path_factory):
    """The oracle architecture under a config that names no activation, as ViT-B-16's does."""
    config = json.loads(oracle_file(f"{ORACLE_MODEL}.json").read_text())
    del config["quick_gelu"]
    path = tmp_path_factory.mktemp("configs") / "oracle-plain.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return "oracle-plain"


def oracle_image_error(backbone) -> float:
    chefer = np.load(oracle_file("chefer.npz"))
    with torch.no_grad():
        image = backbone.model.encode_image(torch.from_numpy(chefer["image"]))
    return float(np.abs(image.numpy() - chefer["image_features"]).max())


def test_a_state_dict_that_cannot_tell_keeps_the_config_and_warns_in_one_line(gelu_config_model):
    with pytest.warns(WildsegWarning) as caught:
        backbone = load_backbone(gelu_config_model, checkpoint=oracle_file("tiny_openai_sd.pt"), device="cpu")
    message = as_command_line_says(caught[0].message)
    assert "\n" not in message and "GELU" in message and "--activation quickgelu" in message
    assert backbone.activation == "gelu" and oracle_image_error(backbone) > 1e-2
    backbone = load_backbone(gelu_config_model, checkpoint=oracle_file("tiny_openai_sd.pt"), device="cpu",
                             activation="quickgelu")
    assert backbone.activation_source == "given" and oracle_image_error(backbone) < 1e-5


def test_an_openai_state_dict_with_its_extra_entries_gets_quickgelu(gelu_config_model, tmp_path):
    state_dict = torch.load(oracle_file("tiny_openai_sd.pt"))
    state_dict.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                      vocab_size=torch.tensor(49408))
    torch.save(state_dict, tmp_path / "openai.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", WildsegWarning)
        backbone = load_backbone(gelu_config_model, checkpoint=tmp_path / "openai.pt", device="cpu")
    assert backbone.activation == "quickgelu" and "OpenAI state dict" in backbone.activation_source
    assert oracle_image_error(backbone) < 1e-5


def test_a_pretrained_tag_gets_the_activation_of_its_open_clip_config(gelu_config_model, monkeypatch):
    """The download is replaced by the local file (open_clip's `file` entry); the rest is open_clip's tag path."""
    tag = {"file": str(oracle_file("tiny_openai_sd.pt")), "quick_gelu": True, "mean": OPENAI_DATASET_MEAN,
           "std": OPENAI_DATASET_STD}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, gelu_config_model, {"openai": tag})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # open_clip's own QuickGELU mismatch notice
        backbone = load_backbone(gelu_config_model, pretrained="openai", device="cpu")
    assert backbone.activation == "quickgelu" and "pretrained tag 'openai'" in backbone.activation_source
    assert oracle_image_error(backbone) < 1e-5


@pytest.mark.parametrize("image", IMAGES)
def test_pamr_reproduces_naclips_on_its_cosine_maps(oracle_backbone, image):
    """NACLIP's PAMR step alone: its own patch logits upsampled as it does (to the 336 x 448 input, then to the
    original size), its guide (the input wildseg normalises from the resized pixels, resized to the original size),
    10 iterations, (8, 16)."""
    oracle = np.load(oracle_file("naclip_voc21.npz"))
    size = tuple(int(side) for side in oracle[f"{image}_ori_shape"])
    normalised = protocol_segmenter(oracle_backbone, "naclip").pipeline.normalized(oracle[f"{image}_input_u8_rgb"])
    logits = F.interpolate(torch.from_numpy(oracle[f"{image}_patch_logits"])[None], size=(336, 448), mode="bilinear")
    logits = F.interpolate(logits, size=size, mode="bilinear")[0]
    guide = F.interpolate(normalised[None], size=size, mode="bilinear")[0]
    refined = pamr(guide, logits, PamrSettings(iterations=10, dilations=(8, 16)))
    expected = oracle[f"{image}_cfg_pamr_out_lattice"]
    assert np.abs(logits[:, 4::8, 4::8].numpy() - expected).max() > 0.05, "PAMR changes the maps"
    np.testing.assert_allclose(refined[:, 4::8, 4::8].numpy(), expected, atol=1e-6, rtol=0)


NACLIP_VARIANTS = {"cfg": (0, "pamr"), "cfg_nopamr": (0, "none"), "slide224": (224, "pamr"),
                   "slide224_nopamr": (224, "none")}
"""The oracle's NACLIP runs: the published VOC21 config (whole image), the class default 224/112 sliding window,
each with and without PAMR."""


@pytest.fixture(scope="module")
def naclip_segmenters(oracle_backbone):
    """A Segmenter per variant, with the settings of wildseg's NACLIP VOC21 protocol."""
    return {variant: protocol_segmenter(oracle_backbone, "naclip", window=window, refine=refine, background_words=())
            for variant, (window, refine) in NACLIP_VARIANTS.items()}


def test_the_published_voc21_list_is_naclips_query_list_word_for_word():
    oracle = np.load(oracle_file("naclip_voc21.npz"))
    published = published_class_prompts("naclip/cls_voc21.txt")
    assert [word for prompts in published for word in prompts] == oracle["query_words"].tolist()
    assert [index for index, prompts in enumerate(published) for _ in prompts] == oracle["query_idx"].tolist()


@pytest.mark.parametrize("variant", NACLIP_VARIANTS)
@pytest.mark.parametrize("image", IMAGES)
def test_naclips_whole_voc21_pipeline_is_reproduced_from_the_image_file(naclip_segmenters, variant, image):
    """Per-class scores (max over a class's queries, normalised per pixel as NACLIP returns them) to 1e-5, and the
    label maps with NACLIP's background threshold 0.1 and without one on at least 99.999% of the pixels."""
    oracle = np.load(oracle_file("naclip_voc21.npz"))
    words, owners = oracle["query_words"].tolist(), oracle["query_idx"]
    probabilities = naclip_segmenters[variant].query_probabilities(image_file(*IMAGES[image]), words)
    classes = np.stack([probabilities[owners == index].max(axis=0) for index in range(21)])
    expected = oracle[f"{image}_{variant}_probs_lattice"]
    np.testing.assert_allclose((classes / classes.sum(axis=0))[:, 4::8, 4::8], expected, atol=1e-5, rtol=0)
    query = Query(words, list(range(21)), [np.flatnonzero(owners == index).tolist() for index in range(21)])
    for threshold in (0.1, 0):
        predicted = dense_class_prediction(probabilities, query, probabilities.shape[1:], threshold, None, 0)
        assert (predicted == oracle[f"{image}_{variant}_pred_thd{threshold}"]).mean() >= 0.99999


def test_wildseg_eval_reproduces_naclips_voc21_prediction_from_the_command_line(tmp_path):
    """`wildseg eval --method dense` on the real VOC file, with the protocol's defaults and published class list:
    the saved prediction is NACLIP's (variant cfg, background threshold 0.1)."""
    root, ids = shared_dataset("voc2012"), tmp_path / "ids.txt"
    ids.write_text("2007_000123\n")
    result = CliRunner().invoke(main, [
        "eval", "-d", "voc", "--root", str(root), "--ids", str(ids), "--method", "dense", "--model", ORACLE_MODEL,
        "--checkpoint", str(oracle_file("tiny_openai_sd.pt")), "--device", "cpu", "--save-predictions",
        str(tmp_path / "predictions"), "--report", str(tmp_path / "report.json"), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "report.json").read_text())["dense_protocol"]["deviations"] == []
    predicted = np.array(Image.open(tmp_path / "predictions" / "2007_000123.png"))
    oracle = np.load(oracle_file("naclip_voc21.npz"))
    assert (predicted == oracle["voc_2007_000123_cfg_pred_thd0.1"]).mean() >= 0.99999
