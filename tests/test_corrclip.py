"""CorrCLIP (`--method corrclip`) against its official run: `corrclip_voc21.npz` (README-corrclip.md) holds the
official pipeline's inputs, intermediates and outputs on a VOC and a CamVid image, computed with a tiny random CLIP
of 12 vision blocks (`tiny_openai_sd.pt` with block i := block i % 3) and a tiny random DINO (`tiny_dino_p8_sd.pt`),
with region maps it supplies. The weights load through wildseg's own loaders."""

import json
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from conftest import oracle_file, oracle_image_file

from wildseg import Segmenter, SegmenterConfig
from wildseg.backbone import load_backbone
from wildseg.backbone.dino import correlation_features, load_dino
from wildseg.evaluation import Query, dense_class_prediction, dense_protocol
from wildseg import methods
from wildseg.methods import corrclip
from wildseg.refinement.regions import nearest_ids, resized_regions

KEYS = ["voc_2007_000123", "camvid_0001TP_008550"]
TINY_DINO = dict(embed_dim=64, depth=3, num_heads=2)
MMSEG_MEAN, MMSEG_STD = (122.771, 116.746, 104.094), (68.501, 66.632, 70.323)
ORACLE_L12 = "tiny_openclip_l12"


@pytest.fixture(scope="module")
def oracle():
    return np.load(oracle_file("corrclip_voc21.npz"))


@pytest.fixture(scope="module")
def l12_backbone(oracle, tmp_path_factory):
    """The oracle's 12-block tiny CLIP: its config (`clip_config_json`) registered, block i the weights of i % 3."""
    folder = tmp_path_factory.mktemp("l12")
    (folder / f"{ORACLE_L12}.json").write_text(str(oracle["clip_config_json"]))
    open_clip.add_model_config(folder / f"{ORACLE_L12}.json")
    weights = torch.load(oracle_file("tiny_openai_sd.pt"))
    prefix = "visual.transformer.resblocks."
    for name in [name for name in weights if name.startswith(prefix)]:
        block, rest = name[len(prefix):].split(".", 1)
        for copy in range(3 + int(block), 12, 3):
            weights[f"{prefix}{copy}.{rest}"] = weights[name].clone()
    torch.save(weights, folder / "tiny_l12.pt")
    return load_backbone(ORACLE_L12, checkpoint=folder / "tiny_l12.pt", device="cpu")


@pytest.fixture(scope="module")
def tiny_dino():
    return load_dino("vit_base_patch8_224.dino", oracle_file("tiny_dino_p8_sd.pt"), **TINY_DINO)


def official_windows(oracle, key):
    """The oracle's windows: (index, normalised pixels with the region channel, the box y1, y2, x1, x2)."""
    pixels = (torch.from_numpy(oracle[f"{key}_input_u8_rgb"]).permute(2, 0, 1).float()
              - torch.tensor(MMSEG_MEAN)[:, None, None]) / torch.tensor(MMSEG_STD)[:, None, None]
    regions = torch.from_numpy(oracle[f"{key}_instance_mask_input"]).float()
    image = torch.cat([pixels, regions[None]])
    for index, (top, bottom, left, right) in enumerate(oracle[f"{key}_windows"]):
        yield index, image[:, top:bottom, left:right], (top, bottom, left, right)


@pytest.mark.parametrize("key", KEYS)
def test_the_regions_are_merged_and_scoped_as_the_official_code_does(oracle, tiny_dino, key):
    """Region merging exactly, the scope exactly but for pairs within 1e-5 of the mean similarity (a summation
    order apart), the attention rows to 1e-5 of their scale."""
    for index, window, _ in official_windows(oracle, key):
        prefix = f"{key}_w{index}"
        dino_input = corrclip.dino_input(window[:3])
        with torch.no_grad():
            features, grid = correlation_features(tiny_dino, dino_input[None])
        features = features[0]
        np.testing.assert_allclose(features.numpy(), oracle[f"{prefix}_dino_feats"], rtol=0, atol=1e-5)
        on_grid = nearest_ids(window[3].long(), grid)
        assert np.array_equal(on_grid.numpy(), oracle[f"{prefix}_mask_dino_grid"])
        merged = corrclip.merged_regions(features, on_grid)
        assert np.array_equal(merged.numpy(), oracle[f"{prefix}_merged_mask_dino_grid"])
        attention = corrclip.scope_attention(features, merged)
        scope = np.unpackbits(oracle[f"{prefix}_scope_packed"])[:len(features) ** 2].reshape(len(features), -1)
        similarity = (features @ features.T).numpy()
        flipped = (attention.numpy() > 0) != scope.astype(bool)
        assert np.all(np.abs(similarity[flipped] - similarity.mean()) < 1e-5), flipped.sum()
        rows = attention[oracle["attn_row_idx"]].numpy()
        np.testing.assert_allclose(rows, oracle[f"{prefix}_attn_rows"], rtol=0, atol=1e-5 * np.abs(rows).max())


@pytest.mark.parametrize("key", KEYS)
def test_the_window_features_are_the_official_codes(oracle, l12_backbone, tiny_dino, key):
    """The projected features of every window (before normalisation) to 1e-5 of their largest magnitude."""
    method = corrclip.CorrClip(tiny_dino)
    for index, window, _ in official_windows(oracle, key):
        with torch.no_grad():
            features, grid = method.window(l12_backbone.tower, window)
        assert grid == (42, 42)
        expected = oracle[f"{key}_w{index}_features"]
        np.testing.assert_allclose(features.numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def corrclip_segmenter(backbone, dino, regions: str, dataset: str = "voc") -> Segmenter:
    """CorrCLIP under its published protocol for `dataset`, with region maps from `regions`."""
    options = dense_protocol("corrclip", dataset, SimpleNamespace(background_class=0 if dataset == "voc" else None))
    config = SegmenterConfig.from_options({"method": "corrclip", "background_words": (), "regions": regions},
                                          options["options"])
    return Segmenter(backbone, config, dino=dino)


@pytest.fixture(scope="module")
def oracle_regions(oracle, tmp_path_factory):
    """The oracle's region maps as CorrCLIP releases them: <image stem>.npz with instance_mask."""
    folder = tmp_path_factory.mktemp("region_masks")
    for key in KEYS:
        np.savez(folder / f"{oracle_image_file(key).stem}.npz", instance_mask=oracle[f"{key}_instance_mask"])
    return folder


@pytest.mark.parametrize("key", KEYS)
def test_the_whole_pipeline_reproduces_the_official_logits_probabilities_and_label_maps(
        oracle, l12_backbone, tiny_dino, oracle_regions, key):
    """Through `Segmenter` as eval runs it: the region map from a released-format folder, the 336-pixel input and its
    windows, the query logits and the class probabilities to 1e-5 of their scale, and the label maps before and
    after the map correction on at least 99.9% of pixels."""
    segmenter = corrclip_segmenter(l12_backbone, tiny_dino, str(oracle_regions))
    decoded = segmenter.pipeline.decode(oracle_image_file(key))
    assert np.array_equal(decoded.source, oracle[f"{key}_input_u8_rgb"])
    regions_input = resized_regions(decoded.regions, decoded.source.shape[:2])
    mask_input = oracle[f"{key}_instance_mask_input"]
    assert np.array_equal(regions_input == regions_input.min(), mask_input == mask_input.min())
    assert len(np.unique(regions_input)) == len(np.unique(mask_input))
    words, owners = oracle["query_words"].tolist(), oracle["query_idx"]
    maps = segmenter.pipeline.merged_maps(decoded, segmenter.backbone.embed_labels(
        words, segmenter.config.template_set), {})
    logits = torch.nn.functional.interpolate(maps[None], size=decoded.working.shape[:2], mode="bilinear",
                                             align_corners=False)[0].numpy()
    expected = oracle[f"{key}_query_logits_lattice"]
    np.testing.assert_allclose(logits[:, 4::8, 4::8], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    probabilities = segmenter.query_probabilities(oracle_image_file(key), words)
    classes = int(owners.max()) + 1
    grouped = np.stack([probabilities[owners == index].max(axis=0) for index in range(classes)])
    expected = oracle[f"{key}_probs_lattice"]
    np.testing.assert_allclose(grouped[:, 4::8, 4::8], expected, rtol=0, atol=1e-5 * expected.max())
    query = Query(words, list(range(classes)), [np.flatnonzero(owners == index).tolist() for index in range(classes)])
    before = dense_class_prediction(probabilities, query, probabilities.shape[1:],
                                    segmenter.config.background_threshold, None, 0)
    assert (before == oracle[f"{key}_pred_before_correction"]).mean() >= 0.999
    after = corrclip.majority_labels(before, decoded.regions)
    assert (after == oracle[f"{key}_pred"]).mean() >= 0.999
    assert (after != before).sum() > 2000


@pytest.fixture(scope="module")
def small_dino_checkpoint(tmp_path_factory):
    """Random DINO ViT-S/8 weights (the architecture of CorrCLIP's listed alternative) by timm's initialisation."""
    import timm

    path = tmp_path_factory.mktemp("dino") / "dino_s8.pt"
    torch.save(timm.create_model("vit_small_patch8_224.dino", pretrained=False, num_classes=0).state_dict(), path)
    return path


@pytest.mark.parametrize("regions", ["slic", "sam2"])
def test_segment_with_corrclip_end_to_end(oracle, l12_backbone, small_dino_checkpoint, tiny_sam2_folder, tmp_path,
                                          regions):
    """`--method corrclip` with superpixels and with SAM 2's masks (tiny random SAM 2, random DINO ViT-S/8, the
    12-block tiny CLIP, no test-time views, as CorrCLIP's protocols have none): exit 0, its windows and DINO
    recorded, and every region but the unsegmented one holds one label (the map correction) where the mask is at
    the image's size; `--instances` writes a COCO file whose
    annotations are those regions' pieces of each class (for SAM 2, none where no mask was painted). The labels
    are none of the 26 background words (road and sky are), so that the random model gives them some regions."""
    from pycocotools.coco import COCO

    from click.testing import CliRunner
    from PIL import Image

    from wildseg.backbone.sam2 import load_sam2
    from wildseg.cli import main
    from wildseg.refinement.automatic_masks import automatic_masks, painted_regions
    from wildseg.refinement.regions import superpixels

    photo = oracle_image_file("camvid_0001TP_008550")
    config = tmp_path / f"{ORACLE_L12}.json"
    config.write_text(str(oracle["clip_config_json"]))
    result = CliRunner().invoke(main, [
        "segment", str(photo), "--labels", "car,person", "--method", "corrclip", "--regions", regions,
        *(["--sam2-model", str(tiny_sam2_folder)] if regions == "sam2" else []), "--refine", "none", "--tta", "none",
        "--dino-model", "vit_small_patch8_224.dino", "--dino-checkpoint", str(small_dino_checkpoint),
        "--model", ORACLE_L12, "--model-config", str(config), "--checkpoint", str(l12_backbone.checkpoint),
        "--device", "cpu", "--templates", "photo", "--out", str(tmp_path / "out"), "-q", "--instances",
        "--coco", str(tmp_path / "objects.json")])
    assert result.exit_code == 0, result.output
    mask = np.array(Image.open(tmp_path / "out" / "0001TP_008550.png"))
    rgb = np.array(Image.open(photo).convert("RGB"))
    ids = (superpixels(rgb, "slic") if regions == "slic"
           else painted_regions(automatic_masks(load_sam2(tiny_sam2_folder), rgb), rgb.shape[:2]))
    assert all(len(np.unique(mask[ids == region])) == 1 for region in np.unique(ids)[1:])
    painted = ids > 0 if regions == "sam2" else np.ones(ids.shape, dtype=bool)
    pieces = {(int(region), int(label)) for region, label in zip(ids[painted & (mask > 0)], mask[painted & (mask > 0)])}
    coco = COCO(str(tmp_path / "objects.json"))
    record = json.loads((tmp_path / "out" / "0001TP_008550.json").read_text())
    assert len(coco.anns) == len(record["instances"]) == len(pieces), "one annotation per object"
    # Measured: SLIC gives objects; the tiny SAM 2 paints one mask over 80% of the frame, which the correction
    # makes background, so its labelled pixels are all unpainted and there is no object.
    assert (len(pieces) > 0) == (regions == "slic") and np.any(mask > 0)
    for annotation, listed in zip(coco.anns.values(), record["instances"]):
        region, label = listed["region"], listed["class_index"]
        assert np.array_equal(coco.annToMask(annotation) == 1, (ids == region) & (mask == label))
    settings = json.loads((tmp_path / "out" / "0001TP_008550.json").read_text())["settings"]
    assert settings["dense"]["window"] == 336 and settings["dense"]["stride"] == 112
    assert settings["dense"]["corrclip"]["dino_model"] == "vit_small_patch8_224.dino"


def test_corrclip_problems_are_one_line_errors(tmp_path, unreachable_hub):
    from click.testing import CliRunner

    from wildseg.cli import main

    result = CliRunner().invoke(main, ["segment", "x.jpg", "--labels", "cat", "--method", "corrclip",
                                       "--dino-checkpoint", str(tmp_path / "absent.pt")])
    assert result.exit_code == 2 and "--dino-checkpoint" in result.output and "no such file" in result.output
    assert "Traceback" not in result.output


def test_corrclip_protocols_carry_the_published_table():
    """The README's ViT-B row with the released SAM 2 masks: average 51.0 over the eight."""
    published = methods.published_protocols("corrclip")["datasets"]
    numbers = {key: entry["published_miou"] for key, entry in published.items()}
    assert numbers == {"voc": 74.8, "voc20": 88.8, "context": 44.2, "context59": 48.8, "coco-object": 43.7,
                       "coco-stuff": 31.6, "cityscapes": 49.4, "ade20k": 26.9}
    assert round(sum(numbers.values()) / 8, 1) == 51.0


def test_eval_names_region_sources_other_than_the_released_masks_as_deviations(tmp_path):
    """CorrCLIP's numbers are with its released masks: a folder is the published run, superpixels or SAM 2 made
    online are deviations of the report."""
    from wildseg.evaluation.protocols import run_protocol

    from wildseg.datasets.classes import ClassName

    dataset = SimpleNamespace(background_class=0, name="voc",
                              classes=[ClassName(str(index), (str(index),), index == 0) for index in range(21)],
                              with_classes=lambda classes: SimpleNamespace(classes=classes))

    def deviations(regions):
        options = {"method": "dense", "attention": "corrclip", "regions": regions}
        return run_protocol(options, "voc", dataset, None, "open").published["deviations"]
    assert deviations(str(tmp_path)) == []
    assert deviations(None) == [f"regions slic instead of {methods.published_protocols('corrclip')['region_masks']}"]
    assert deviations("sam2")[0].startswith("regions sam2 instead of CorrCLIP's released SAM 2 masks")
