"""SAM 2 region masks (`--regions sam2`): transformers' SAM 2 loaded by wildseg's loader, the automatic masks
against a reference computed point by point from the model alone, CorrCLIP's painting, the one-line errors, and
segment end to end with a tiny random SAM 2 of the real architecture's classes."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from conftest import TINY_SAM2_SIDE, oracle_image_file, tiny_cli_args
from wildseg.backbone.sam2 import load_sam2
from wildseg.cli import main
from wildseg.config import SegmenterConfig
from wildseg.errors import WildsegError
from wildseg.refinement.automatic_masks import ProposedMask, automatic_masks, painted_regions, point_grid
from wildseg.refinement.settings import MaskGeneration


def reference_masks(sam2, rgb: np.ndarray, settings: MaskGeneration) -> list[tuple[np.ndarray, float]]:
    """Meta's automatic mask generation written out from its description on the image as transformers'
    processor prepares it, one prompt point per model call: the grid point in the square input frame, the mask
    logits resized bilinearly to the image, the predicted-IoU and stability filters, boxes, greedy non-maximum
    suppression by predicted IoU."""
    height, width = rgb.shape[:2]
    side, model = TINY_SAM2_SIDE, sam2.model
    candidates = []
    with torch.no_grad():
        embeddings = model.get_image_embeddings(sam2.processor(images=rgb, return_tensors="pt")["pixel_values"])
        for x, y in point_grid(settings.points_per_side):
            point = torch.tensor([[[[x * side, y * side]]]], dtype=torch.float32)
            output = model(image_embeddings=embeddings, input_points=point,
                           input_labels=torch.ones(1, 1, 1, dtype=torch.long), multimask_output=False)
            logits = F.interpolate(output.pred_masks[0], (height, width), mode="bilinear", align_corners=False)[0, 0]
            score = float(output.iou_scores.flatten()[0])
            inner = int((logits > settings.mask_threshold + settings.stability_offset).sum())
            outer = int((logits > settings.mask_threshold - settings.stability_offset).sum())
            if score > settings.pred_iou_threshold and outer and inner / outer > settings.stability_threshold:
                candidates.append((logits.numpy() > settings.mask_threshold, score))

    def box(mask):
        rows, columns = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        return columns[0], rows[0], columns[-1], rows[-1]

    def box_iou(a, b):
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        area = lambda c: (c[2] - c[0]) * (c[3] - c[1])
        return inter / (area(a) + area(b) - inter)

    kept = []
    for mask, score in sorted(candidates, key=lambda item: -item[1]):
        if all(box_iou(box(mask), box(other)) <= settings.box_nms_threshold for other, _ in kept):
            kept.append((mask, score))
    return kept


@pytest.fixture(scope="module")
def tiny_sam2(tiny_sam2_folder):
    return load_sam2(tiny_sam2_folder)


def test_the_loader_reads_a_transformers_folder_and_turns_off_the_multimask_fallback(tiny_sam2):
    """CorrCLIP's `build_sam2(..., apply_postprocessing=False)` has no fall-back to multimask outputs; transformers'
    configs have it on."""
    assert type(tiny_sam2.model).__name__ == "Sam2Model" and not tiny_sam2.model.training
    assert tiny_sam2.model.config.mask_decoder_config.dynamic_multimask_via_stability is True
    assert tiny_sam2.model.mask_decoder.dynamic_multimask_via_stability is False


@pytest.mark.parametrize("nms", [1.0, 0.7])
def test_automatic_masks_match_a_point_by_point_reference_on_a_real_non_square_image(tiny_sam2, nms):
    """On a 480 x 360 CamVid frame, 64 points: without suppression (nms 1) the 62 masks that pass the filters, and
    with CorrCLIP's 0.7 what suppression leaves, are the reference's, in the same order (predicted IoU), pixel for
    pixel. Points put in the square frame matter here: transformers' own crop-box points are scaled as for the first
    SAM's longest-side resize, which would move them on this image."""
    rgb = np.array(Image.open(oracle_image_file("camvid_0001TP_008550")).convert("RGB"))
    settings = MaskGeneration(box_nms_threshold=nms)
    ours, reference = automatic_masks(tiny_sam2, rgb, settings), reference_masks(tiny_sam2, rgb, settings)
    assert len(ours) == len(reference) == (62 if nms == 1.0 else 1)
    for proposed, (mask, score) in zip(ours, reference):
        assert abs(proposed.score - score) < 1e-5
        assert np.count_nonzero(proposed.mask != mask) <= 2
        rows, columns = np.nonzero(proposed.mask)
        assert proposed.box == (columns.min(), rows.min(), columns.max(), rows.max())


def test_painting_puts_larger_masks_over_smaller_ones_with_ids_in_ascending_area():
    """CorrCLIP's rule, by hand: areas 6, 2 and 4 get ids 3, 1 and 2; the large mask covers the others where they
    overlap; 0 where no mask is."""
    large, small, middle = (np.zeros((3, 4), bool) for _ in range(3))
    large[:2, :3] = True
    small[0, 3] = small[1, 3] = True
    middle[1:, 2:] = True
    painted = painted_regions([ProposedMask(large, 0.9, (0, 0, 2, 1)), ProposedMask(small, 0.8, (3, 0, 3, 1)),
                               ProposedMask(middle, 0.7, (2, 1, 3, 2))], (3, 4))
    assert painted.tolist() == [[3, 3, 3, 1], [3, 3, 3, 2], [0, 0, 2, 2]]


def test_sam2_problems_are_one_line_errors(tmp_path, monkeypatch, unreachable_hub):
    with pytest.raises(WildsegError, match="sam2_model ./absent: no such folder"):
        SegmenterConfig(refine="regions", regions="sam2", sam2_model="./absent")
    with pytest.raises(WildsegError, match="sam2_points is an option of regions sam2"):
        SegmenterConfig(refine="regions", regions="slic", sam2_points=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WildsegError, match="could not load the SAM 2 model .*empty .*folder saved by transformers"):
        load_sam2(tmp_path / "empty")
    with pytest.raises(WildsegError, match="could not load the SAM 2 model facebook/sam2-hiera-large .*connect to"):
        load_sam2("facebook/sam2-hiera-large", cache_dir=tmp_path / "cache")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "transformers" else real_find_spec(name, *rest))
    result = CliRunner().invoke(main, ["segment", "x.jpg", "--labels", "cat", "--refine", "regions", "--regions",
                                       "sam2"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--regions sam2 needs transformers: pip install 'wildseg[sam2]'" in result.output


def test_segment_with_sam2_regions_end_to_end(tiny_checkpoint, tiny_sam2_folder, tmp_path):
    """`--refine regions --regions sam2` on the relevance method with the tiny SAM 2: every painted region is one
    label in the mask, and the record names the model and CorrCLIP's settings."""
    photo = oracle_image_file("camvid_0001TP_008550")
    result = CliRunner().invoke(main, ["segment", str(photo), "--labels", "road,sky", "--refine", "regions",
                                       "--regions", "sam2", "--sam2-model", str(tiny_sam2_folder), "--tta", "none",
                                       "--out", str(tmp_path), "-q", *map(str, tiny_cli_args(tiny_checkpoint))])
    assert result.exit_code == 0, result.output
    mask = np.array(Image.open(tmp_path / "0001TP_008550.png"))
    regions = painted_regions(automatic_masks(load_sam2(tiny_sam2_folder), np.array(Image.open(photo).convert("RGB"))),
                              mask.shape)
    assert all(len(np.unique(mask[regions == region])) == 1 for region in np.unique(regions) if region)
    settings = json.loads((tmp_path / "0001TP_008550.json").read_text())["settings"]
    assert settings["regions"] == "sam2"
    assert settings["sam2"] == {"model": str(tiny_sam2_folder), **vars(MaskGeneration())}
