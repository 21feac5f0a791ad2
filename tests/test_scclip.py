"""SC-CLIP against its official code (SuleBai/SC-CLIP@0417ba9): the oracle folder's `scclip_voc21.npz` and
`scclip_voc20.npz` hold what it computed on a 12-layer tiny random CLIP (`tiny_l12_visual.npz` over
`tiny_openai_sd.pt`, README-scclip-rfclip.md there) for a VOC and a CamVid image. The weights load through wildseg's
own loader and the images enter as files. On these weights the label maps are nearly constant, so every stage is
compared: the windows, the outlier factor and its outliers (exact), the window internals, the features, the
window-averaged logits and the class scores, each to 1e-5 of its scale; then the label maps.

Achieved on a 2-core AMD EPYC VM: outlier factors 3.0e-6 relative, outliers equal; window features 3.0e-7 (unit
norm), patch cosines 1.8e-7; class scores 3.0e-7; label maps 100%."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (ORACLE_IMAGES, ORACLE_MODEL, dense_protocol_segmenter, oracle_file, oracle_image_file,
                      shared_dataset)
from PIL import Image

from wildseg import Segmenter, SegmenterConfig
from wildseg.backbone import load_backbone
from wildseg.backbone.clip_internals import ClipTower
from wildseg.cli import main
from wildseg.errors import WildsegError
from wildseg.evaluation import Query, dense_class_prediction, dense_protocol
from wildseg.methods import scclip

L12_MODEL = "wildseg-tiny-l12-openai"
"""The oracles' 12-layer tiny CLIP (tests/configs): OpenAI's architecture, QuickGELU, 12 image blocks of width 128."""


@pytest.fixture(scope="module")
def l12_checkpoint(tmp_path_factory):
    """The state dict SC-CLIP ran on, as the oracle README builds it, saved as a file for wildseg's loader."""
    weights = torch.load(oracle_file("tiny_openai_sd.pt"))
    visual = np.load(oracle_file("tiny_l12_visual.npz"))
    weights = {key: tensor for key, tensor in weights.items() if not key.startswith("visual.")}
    weights.update({key: torch.from_numpy(visual[key]).float() for key in visual.files})
    path = tmp_path_factory.mktemp("l12") / "tiny_l12.pt"
    torch.save(weights, path)
    return path


@pytest.fixture(scope="module")
def l12_backbone(l12_checkpoint):
    return load_backbone(L12_MODEL, checkpoint=l12_checkpoint, device="cpu")


def protocol_segmenter(backbone, dataset: str) -> Segmenter:
    return dense_protocol_segmenter(backbone, "scclip", dataset)


def windows_of(segmenter: Segmenter, key: str) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """The image's normalised windows as wildseg plans them, and their boxes as [y1, y2, x1, x2]."""
    pipeline = segmenter.pipeline
    source = pipeline.decode(oracle_image_file(key)).source
    image = pipeline.normalized(source)[None]
    boxes = [(view.box[1], view.box[3], view.box[0], view.box[2]) for view in pipeline.plan(source)]
    return torch.cat([image[:, :, top:bottom, left:right] for top, bottom, left, right in boxes]), boxes


@pytest.mark.parametrize("key", ORACLE_IMAGES)
def test_the_windows_outliers_and_features_are_the_official_codes(l12_backbone, key):
    oracle = np.load(oracle_file("scclip_voc21.npz"))
    segmenter = protocol_segmenter(l12_backbone, "voc")
    assert (segmenter.pipeline.decode(oracle_image_file(key)).source == oracle[f"{key}_input_u8_rgb"]).all()
    windows, boxes = windows_of(segmenter, key)
    assert np.array_equal(np.array(boxes), oracle[f"{key}_windows"]), "224/112 windows placed as mmseg places them"
    tower = ClipTower(l12_backbone.model)
    with torch.no_grad():
        features = scclip.SCClipMethod().features(tower, windows)
        for index, window in enumerate(windows):
            x, _ = tower.embed_windows(window[None])
            for block in range(tower.depth - 1):
                x = tower.run_block(block, x)
            factor = scclip.local_outlier_factor(x[0, 1:])
            expected = oracle[f"{key}_window_lof_scores"][index]
            np.testing.assert_allclose(factor.numpy(), expected, rtol=1e-5, atol=0)
            outliers = torch.where(scclip.outlier_mask(x[0, 1:]))[0].numpy()
            assert outliers.tolist() == oracle[f"{key}_window_lof_outliers"][index].tolist()
    official = oracle[f"{key}_window_features"]
    official = official / np.linalg.norm(official, axis=-1, keepdims=True)
    np.testing.assert_allclose(features.numpy(), official, atol=1e-5, rtol=0)
    logits = (features @ torch.from_numpy(oracle["query_features"]).T).transpose(1, 2).reshape(6, -1, 14, 14)
    np.testing.assert_allclose(logits.numpy(), oracle[f"{key}_window_patch_logits"], atol=1e-6, rtol=0)


def test_each_stage_of_a_window_is_the_official_codes(l12_backbone):
    """Window 0 of the VOC image, stage by stage (oracle `w0_*`), each to 1e-5 of its largest value."""
    oracle = np.load(oracle_file("scclip_voc21.npz"))
    stage = {name.removeprefix("voc_2007_000123_w0_"): oracle[name] for name in oracle.files
             if name.startswith("voc_2007_000123_w0_")}
    windows, _ = windows_of(protocol_segmenter(l12_backbone, "voc"), "voc_2007_000123")
    tower, grid = ClipTower(l12_backbone.model), (14, 14)

    def same(ours: torch.Tensor, name: str) -> None:
        expected = stage[name]
        np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5 * np.abs(expected).max(), rtol=0, err_msg=name)

    with torch.no_grad():
        x, _ = tower.embed_windows(windows[:1])
        outputs = []
        for block in range(tower.depth - 1):
            x = tower.run_block(block, x)
            outputs.append(x[0])
        for block, name in ((3, "block3_out"), (8, "block8_out"), (10, "block10_out")):
            same(outputs[block], name)
        outliers = scclip.outlier_mask(outputs[10][1:])
        fixed = scclip.neighbour_mean_fix(outputs[10][1:], outliers, grid)
        same(fixed, "after_lof_fix")
        pre = scclip.neighbour_mean_fix(outputs[8][1:], outliers, grid)
        same(pre, "pre_feats_fixed")
        similarity, before = scclip.thresholded_cosines(pre)
        same(similarity, "mid_simi")
        same(before, "before_simi_thresholded")
        _, after = scclip.thresholded_cosines(outputs[3][1:])
        same(after, "after_simi_thresholded")
        x = scclip.aggregate(fixed, before)
        same(x, "x_agg_pre")
        attended = scclip.calibrated_attention(tower, x, similarity)
        same(attended, "main_attn")
        x = attended + scclip.CLASS_TOKEN_SHARE * outputs[10][:1]
        same(x, "main_after_res_cls")
        x = scclip.aggregate(x, after)
        same(x, "main_out")
        levels = sum(outputs[block] for block in scclip.MULTI_LEVEL_BLOCKS)
        same(levels, "re_feats_sum")
        fused = scclip.calibrated_attention(tower, levels[1:], similarity)
        same(fused, "re_attn")
        fused = scclip.aggregate(fused + scclip.CLASS_TOKEN_SHARE * levels[:1], after)
        same(fused, "re_out")
        same(x + fused, "final_x")


@pytest.mark.parametrize("dataset, oracle_name", [("voc", "scclip_voc21.npz"), ("voc20", "scclip_voc20.npz")])
@pytest.mark.parametrize("key", ORACLE_IMAGES)
def test_the_whole_pipeline_reproduces_the_official_scores_and_label_maps(l12_backbone, dataset, oracle_name, key):
    """VOC21: softmax(50 x cosine), class maxima, the area rule (0.1), the 0.15 threshold; VOC20: scale 40, plain
    argmax. Scores as the official code returns them (not renormalised) to 1e-5 of their maximum."""
    oracle = np.load(oracle_file(oracle_name))
    words, owners = oracle["query_words"].tolist(), oracle["query_idx"]
    classes = int(owners.max()) + 1
    segmenter = protocol_segmenter(l12_backbone, dataset)
    probabilities = segmenter.query_probabilities(oracle_image_file(key), words)
    grouped = np.stack([probabilities[owners == index].max(axis=0) for index in range(classes)])
    published = dense_protocol("scclip", dataset, SimpleNamespace(background_class=0 if dataset == "voc" else None))
    if published["area_threshold"] is not None:
        expected = oracle[f"{key}_noarea_probs_lattice"]
        np.testing.assert_allclose(grouped[:, 4::8, 4::8], expected, atol=1e-5 * expected.max(), rtol=0)
    query = Query(words, list(range(classes)), [np.flatnonzero(owners == index).tolist() for index in range(classes)])
    background = 0 if dataset == "voc" else None
    predicted = dense_class_prediction(probabilities, query, probabilities.shape[1:],
                                       segmenter.config.background_threshold, published["area_threshold"], background)
    assert (predicted == oracle[f"{key}_cfg_pred"]).mean() >= 0.999
    if dataset == "voc":
        argmax = dense_class_prediction(probabilities, query, probabilities.shape[1:], 0.0, None, 0)
        assert (argmax == oracle[f"{key}_argmax_pred"]).mean() >= 0.999
        kept = np.ones(classes, dtype=bool)
        areas = np.bincount(grouped.argmax(axis=0).ravel(), minlength=classes)
        kept[1:] = areas[1:] > published["area_threshold"] * areas[1:].sum()
        grouped = grouped * kept[:, None, None]
    expected = oracle[f"{key}_cfg_probs_lattice"]
    np.testing.assert_allclose(grouped[:, 4::8, 4::8], expected, atol=1e-5 * expected.max(), rtol=0)


def test_wildseg_eval_compare_lists_scclip_with_its_published_number_and_reproduces_its_prediction(
        l12_checkpoint, tmp_path):
    root, ids = shared_dataset("voc2012"), tmp_path / "ids.txt"
    ids.write_text("2007_000123\n")
    result = CliRunner().invoke(main, [
        "eval", "-d", "voc", "--root", str(root), "--ids", str(ids), "--compare", "naclip,scclip", "--model",
        L12_MODEL, "--checkpoint", str(l12_checkpoint), "--device", "cpu", "--save-predictions",
        str(tmp_path / "predictions"), "--report", str(tmp_path / "report.json"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {row["run"]: row for row in report["comparison"]}
    assert rows["scclip"]["published_miou"] == 64.6 and rows["naclip"]["published_miou"] == 64.07
    assert rows["scclip"]["follows"] == "scclip" and rows["scclip"]["deviations"] == 0
    predicted = np.array(Image.open(tmp_path / "predictions" / "scclip" / "2007_000123.png"))
    oracle = np.load(oracle_file("scclip_voc21.npz"))
    assert (predicted == oracle["voc_2007_000123_cfg_pred"]).mean() >= 0.999


def test_a_model_with_too_few_blocks_is_refused_in_one_line():
    backbone = load_backbone(ORACLE_MODEL, checkpoint=oracle_file("tiny_openai_sd.pt"), device="cpu")
    with pytest.raises(WildsegError, match=f"scclip reads blocks 4 to 10 of the image tower, and {ORACLE_MODEL}'s "
                                           "has 3: use a model with at least 11 blocks, such as ViT-B-16"):
        Segmenter(backbone, SegmenterConfig(method="dense", attention="scclip"))


def test_segment_with_scclip_writes_the_mask_its_scores_give(l12_checkpoint, tmp_path):
    """`wildseg segment --method dense --attention scclip` end to end: the mask is the argmax of the scores file."""
    photo = shared_dataset("camvid") / "images" / "0001TP_008550.png"
    result = CliRunner().invoke(main, [
        "segment", str(photo), "--labels", "cat,sofa", "--method", "dense", "--attention", "scclip", "--model",
        L12_MODEL, "--checkpoint", str(l12_checkpoint), "--device", "cpu", "--out", str(tmp_path), "--save-scores",
        "--templates", "photo"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "0001TP_008550.json").read_text())
    assert record["settings"]["dense"]["attention"] == "scclip" and record["request"]["attention"] == "scclip"
    mask = np.array(Image.open(tmp_path / "0001TP_008550.png"))
    scores = np.load(tmp_path / "0001TP_008550_scores.npz")
    assert mask.shape == (360, 480) and np.array_equal(mask, scores["scores"].astype(np.float32).argmax(axis=0))
