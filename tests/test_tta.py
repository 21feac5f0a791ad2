"""Test-time views: exact inverse warps and view-equivariant averaging."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import raises_worded

from wildseg.tta import POLICIES, View, merge_views, plan_views, render_view, warp_to_box

SIZES = [(75, 100), (100, 75), (64, 64), (37, 211)]


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_views_lie_inside_the_image_and_cover_it(height, width, policy):
    views = plan_views(height, width, 64, policy)
    covered = torch.zeros(height, width)
    for view in views:
        left, top, right, bottom = view.box
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1
    assert views[0] == View((0, 0, width, height), False, (64, 64))


def test_default_policy_views_of_a_voc_sized_image():
    views = plan_views(375, 500, 64, "default")
    assert len(views) == 19
    assert sum(view.mirrored for view in views) == 1
    assert {view.box[2] - view.box[0] for view in views[2:]} == {375, 188}


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("grid", [7, 14])
def test_inverse_warp_maps_a_grid_ramp_back_exactly(height, width, grid):
    """A map that is a ramp in grid coordinates must land where the view's geometry says, pixel for pixel.

    The ramp value at grid position u is u, sampled at cell centres; bilinear interpolation reproduces it
    exactly between the outermost cell centres, which is where the comparison is made.
    """
    centres = torch.arange(grid) + 0.5
    ramp_x = centres.expand(grid, grid)
    ramp_y = ramp_x.T
    for view in plan_views(height, width, 64, "heavy"):
        left, top, right, bottom = view.box
        warped = warp_to_box(torch.stack([ramp_x, ramp_y]), view)
        x = (torch.arange(left, right) + 0.5 - left) * grid / (right - left)
        y = (torch.arange(top, bottom) + 0.5 - top) * grid / (bottom - top)
        expected_x = (grid - x) if view.mirrored else x
        inside_x = (x >= 0.5) & (x <= grid - 0.5)
        inside_y = (y >= 0.5) & (y <= grid - 0.5)
        assert inside_x.sum() > (right - left) // 2
        assert torch.allclose(warped[0][:, inside_x], expected_x[inside_x].expand(bottom - top, -1), atol=1e-5)
        assert torch.allclose(warped[1][inside_y], y[inside_y, None].expand(-1, right - left), atol=1e-5)


@pytest.mark.parametrize("policy", ["default", "heavy"])
def test_render_then_warp_back_returns_the_crop_at_native_scale(policy):
    """With the view's size equal to its crop size, rendering and warping back is the identity on pixels."""
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    for view in plan_views(48, 64, 64, policy):
        left, top, right, bottom = view.box
        if right - left != bottom - top:
            continue
        rendered = render_view(image, replace(view, size=(bottom - top, right - left)))
        restored = warp_to_box(rendered, view)
        assert torch.allclose(restored, image[:, top:bottom, left:right], atol=1e-6)


def equivariant_map(views_pixels: torch.Tensor, grid: int = 16) -> torch.Tensor:
    """A map that commutes with the views: the first channel of each view at grid resolution."""
    return F.interpolate(views_pixels[:, :1], size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)


@pytest.mark.parametrize("policy", ["default", "heavy"])
def test_averaging_an_equivariant_map_equals_the_single_view_map(policy):
    """On a linear ramp image every view's warped map is the ramp, so the average equals the single view.

    Resampling is exact for linear images away from box edges, where filters are cut: measured exact to 2e-7
    beyond 1.5 grid cells from a box's edge. The comparison keeps pixels that are that far inside the edge of
    every view covering them.
    """
    height, width = 96, 128
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    image = torch.stack([0.3 + 0.004 * xs + 0.002 * ys] * 3)
    single = merge_views(image, plan_views(height, width, 64, "none"), equivariant_map)
    views = plan_views(height, width, 64, policy)
    averaged = merge_views(image, views, equivariant_map, batch_size=5)
    exact = torch.ones(height, width, dtype=torch.bool)
    for view in views:
        left, top, right, bottom = view.box
        margin_x, margin_y = 1.5 * (right - left) / 16, 1.5 * (bottom - top) / 16
        near_edge = (xs - left < margin_x) | (right - xs < margin_x) | (ys - top < margin_y) | (bottom - ys < margin_y)
        inside = (xs > left) & (xs < right) & (ys > top) & (ys < bottom)
        exact &= ~(inside & near_edge)
    assert exact.sum() > 0.03 * height * width
    assert torch.allclose(averaged[0][exact], single[0][exact], atol=1e-5)
    assert torch.allclose(single[0][exact], image[0][exact], atol=1e-5)


def test_merge_counts_each_view_once_per_pixel():
    calls = []

    def constant_map(batch):
        calls.append(len(batch))
        return torch.full((len(batch), 2, 7, 7), 3.0)

    views = plan_views(75, 100, 32, "heavy")
    merged = merge_views(torch.rand(3, 75, 100), views, constant_map, batch_size=8)
    assert torch.allclose(merged, torch.full((2, 75, 100), 3.0))
    assert sum(calls) == len(views) and max(calls) == 8


def test_unknown_policy_is_a_clear_error():
    with raises_worded("unknown TTA policy 'wild'"):
        plan_views(10, 10, 64, "wild")
