"""Automatic region masks from SAM 2 (Kirillov et al., ICCV 2023, Sec. 7.1 "automatic mask generation"; Ravi et al.,
arXiv 2408.00714), with the settings of CorrCLIP's online path (Zhang et al., ICCV 2025, arXiv 2411.10086; its
`mask_generator='sam2'`), painted into one region map as CorrCLIP paints them.

A grid of points prompts SAM 2 one point at a time (one mask per point, no multimask output); a mask is kept when
its predicted IoU and its stability score (the IoU of the mask cut at the mask threshold plus and minus an offset)
pass their thresholds; boxes suppress duplicates (non-maximum suppression by predicted IoU). The steps after the
model are transformers' own (`Sam2ImageProcessor.post_process_masks`, `filter_masks`,
`post_process_for_mask_generation`); the point grid is put into the model's square input frame by `Sam2Processor`,
as Meta's `SAM2AutomaticMaskGenerator` puts it (transformers' own `generate_crop_boxes` scales points as for the
first SAM's longest-side resize, which misplaces them on non-square images for SAM 2).
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..backbone.sam2 import Sam2
from .settings import MaskGeneration


@dataclass
class ProposedMask:
    """One automatic mask: its pixels (H x W bool), the model's predicted IoU and its box (x0, y0, x1, y1 in pixels,
    inclusive, as SAM's generators give boxes)."""

    mask: np.ndarray
    score: float
    box: tuple[int, int, int, int]


def point_grid(points_per_side: int) -> np.ndarray:
    """The prompt points (points_per_side^2 x 2, x then y, in [0, 1] of the image's width and height): cell
    centres of a regular grid, row by row (Kirillov et al.'s `build_point_grid`)."""
    offset = 1 / (2 * points_per_side)
    side = np.linspace(offset, 1 - offset, points_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def automatic_masks(sam2: Sam2, rgb: np.ndarray, settings: MaskGeneration = MaskGeneration()) -> list[ProposedMask]:
    """SAM 2's automatic masks of an image.

    Args:
        sam2: the loaded model (`backbone.sam2.load_sam2`).
        rgb: the image (H x W x 3, uint8).
        settings: the generation settings (CorrCLIP's by default).

    Returns:
        The masks that pass the filters and non-maximum suppression, best predicted IoU first.
    """
    height, width = rgb.shape[:2]
    points = point_grid(settings.points_per_side) * np.array([width, height])
    processor, model = sam2.processor, sam2.model
    inputs = processor(images=rgb, input_points=[[[[float(x), float(y)]] for x, y in points]],
                       input_labels=[[[1] for _ in points]], return_tensors="pt")
    crop_box = torch.tensor([0, 0, width, height])
    rles, scores, boxes = [], [], []
    with torch.no_grad():
        embeddings = model.get_image_embeddings(inputs["pixel_values"].to(sam2.device))
        for start in range(0, len(points), settings.points_per_batch):
            chunk = slice(start, start + settings.points_per_batch)
            output = model(image_embeddings=embeddings, input_points=inputs["input_points"][:, chunk].to(sam2.device),
                           input_labels=inputs["input_labels"][:, chunk].to(sam2.device), multimask_output=False)
            logits = processor.image_processor.post_process_masks(output.pred_masks.float().cpu(), [(height, width)],
                                                                   binarize=False)[0]
            kept, kept_scores, kept_boxes = processor.image_processor.filter_masks(
                logits, output.iou_scores[0].float().cpu(), (height, width), crop_box, settings.pred_iou_threshold,
                settings.stability_threshold, settings.mask_threshold, settings.stability_offset)
            rles.extend(kept)
            scores.append(kept_scores)
            boxes.append(kept_boxes)
    scores, boxes = torch.cat(scores), torch.cat(boxes)
    if not rles:
        return []
    masks, scores, _, boxes = processor.image_processor.post_process_for_mask_generation(
        rles, scores, boxes, settings.box_nms_threshold)
    return [ProposedMask(np.asarray(mask, dtype=bool), float(score), tuple(int(v) for v in box))
            for mask, score, box in zip(masks, scores, boxes)]


def painted_regions(masks: list[ProposedMask], shape: tuple[int, int]) -> np.ndarray:
    """One region map of automatic masks, painted as CorrCLIP paints them: in ascending order of area (ties in the
    masks' order), mask k with id k (from 1), so that larger masks overwrite smaller ones; 0 where none is.

    Args:
        masks: the masks.
        shape: the image's (height, width).

    Returns:
        H x W int64 ids.
    """
    regions = np.zeros(shape, dtype=np.int64)
    for index, proposed in enumerate(sorted(masks, key=lambda item: int(item.mask.sum())), start=1):
        regions[proposed.mask] = index
    return regions
