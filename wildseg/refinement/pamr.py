"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, "Single-Stage Semantic Segmentation from Image
Labels", CVPR 2020), with the authors' formula, which NACLIP (Hajimiri et al., WACV 2025) applies as published.

Each pixel i looks at its neighbours j: the 8 neighbours of a 3 x 3 neighbourhood at every dilation d in
`dilations` (default 1, 2, 4, 8, 12, 24, so 48 neighbours). With image channels I_c, the affinity logits are

    k_ij = -(1/C) sum_c |I_ic - I_jc| / (lambda * sigma_ic + eps),    alpha_ij = softmax_j(k_ij),

where sigma_ic is the unbiased standard deviation of channel c over the 3 x 3 windows of pixel i at every
dilation, each window including pixel i itself (9 values per dilation, so i counts once per dilation),
lambda = `sharpness` (0.1) and eps = 1e-8. The maps m (classes x H x W: probabilities, or NACLIP's cosines)
are then updated `iterations` times: m_i <- sum_j alpha_ij m_j. Pixels outside the image take the value of the
nearest border pixel (replicate padding), for the image and for the maps alike.
"""

import torch
import torch.nn.functional as F

from .settings import PamrSettings

EPSILON = 1e-8
DIRECTIONS = tuple((row, col) for row in (-1, 0, 1) for col in (-1, 0, 1) if (row, col) != (0, 0))


def neighbour_offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """(row, column) offsets of all neighbours."""
    return [(row * dilation, col * dilation) for dilation in dilations for row, col in DIRECTIONS]


def shifted(padded: torch.Tensor, offset: tuple[int, int], margin: int, height: int, width: int) -> torch.Tensor:
    """View of `padded` (channels x H+2margin x W+2margin) whose pixel (y, x) is the original's (y+row, x+col)."""
    row, col = offset
    return padded[:, margin + row : margin + row + height, margin + col : margin + col + width]


def window_deviation(image: torch.Tensor, padded: torch.Tensor, offsets: list[tuple[int, int]], margin: int
                     ) -> torch.Tensor:
    """sigma (channels x H x W): the unbiased standard deviation over the neighbours and the centre pixel counted
    once per dilation, accumulated one neighbour at a time."""
    _, height, width = image.shape
    centres = len(offsets) // len(DIRECTIONS)
    count = centres + len(offsets)
    mean = (centres * image + sum(shifted(padded, offset, margin, height, width) for offset in offsets)) / count
    squares = centres * (image - mean).square()
    for offset in offsets:
        squares += (shifted(padded, offset, margin, height, width) - mean).square()
    return (squares / (count - 1)).sqrt()


def affinities(image: torch.Tensor, offsets: list[tuple[int, int]], margin: int, sharpness: float) -> torch.Tensor:
    """alpha (neighbours x H x W): softmax over neighbours of the normalised colour-difference logits."""
    _, height, width = image.shape
    padded = F.pad(image[None], [margin] * 4, mode="replicate")[0]
    sigma = window_deviation(image, padded, offsets, margin)
    scale = sharpness * sigma + EPSILON
    logits = image.new_empty(len(offsets), height, width)
    for logit, offset in zip(logits, offsets):
        torch.mean((image - shifted(padded, offset, margin, height, width)).abs() / scale, dim=0, out=logit)
    return logits.neg_().softmax(dim=0)


@torch.no_grad()
def pamr(image: torch.Tensor, probabilities: torch.Tensor, settings: PamrSettings = PamrSettings()) -> torch.Tensor:
    """Refine class probabilities (classes x H x W) on an image (channels x H x W, any scale); returns fp32.

    Memory is O((classes + neighbours) x H x W): the weights are computed once and each update accumulates
    over neighbours one at a time.
    """
    if image.shape[-2:] != probabilities.shape[-2:]:
        raise ValueError(f"image {tuple(image.shape)} and probabilities {tuple(probabilities.shape)} differ in size")
    offsets = neighbour_offsets(settings.dilations)
    margin = max(settings.dilations)
    weights = affinities(image.float(), offsets, margin, settings.sharpness)
    _, height, width = probabilities.shape
    mask = probabilities.float()
    for _ in range(settings.iterations):
        padded = F.pad(mask[None], [margin] * 4, mode="replicate")[0]
        mask = torch.zeros_like(mask)
        for weight, offset in zip(weights, offsets):
            mask.addcmul_(weight, shifted(padded, offset, margin, height, width))
    return mask
