"""The dense method: its last-block variants against independent computations, windows and stitching."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import raises_worded, tiny_segmenter

from wildseg import methods
from wildseg.backbone.clip_internals import ClipTower
from wildseg.config import REGION_METHODS, SegmenterConfig
from wildseg.methods.base import LastBlockMethod
from wildseg.methods.naclip import NEIGHBOURHOOD_STD
from wildseg.pseudolabels import dense_scores
from wildseg.tta import merge_views, plan_windows, window_spans

DENSE_METHODS = {name: methods.load_method(name).build(SegmenterConfig(method="dense", attention=name))
                 for name in methods.names(methods.DENSE) if name not in REGION_METHODS}
"""The dense methods that need no second model (CorrCLIP's DINO: tests/test_corrclip.py)."""


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def patch_tokens(tower: ClipTower, windows: torch.Tensor, method) -> torch.Tensor:
    """Tokens after ln_post (batch x 1 + patches x width), the last block changed by the method."""
    x, grid = tower.embed_windows(windows)
    for block in range(tower.depth - 1):
        x = tower.run_block(block, x)
    return tower.visual.ln_post(method.last_block(tower, x, grid))


def tokens_before_last_block(visual, images):
    """open_clip's own embedding and blocks up to the last one."""
    x = visual._embeds(images)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x


def attention_with_projections(attention: torch.nn.MultiheadAttention, query_from: str, key_from: str):
    """A copy of torch's attention module whose query and key projections are the given ones of the original
    ('q', 'k'), so that torch itself computes e.g. softmax(q q^T / sqrt(d)) v."""
    width = attention.embed_dim
    rows = {"q": slice(0, width), "k": slice(width, 2 * width)}
    changed = copy.deepcopy(attention)
    with torch.no_grad():
        for target, source in (("q", query_from), ("k", key_from)):
            changed.in_proj_weight[rows[target]] = attention.in_proj_weight[rows[source]]
            changed.in_proj_bias[rows[target]] = attention.in_proj_bias[rows[source]]
    return changed


def plain_neighbourhood_prior(rows: int, columns: int, std: float) -> torch.Tensor:
    tokens = 1 + rows * columns
    prior = torch.zeros(tokens, tokens)
    for i in range(rows * columns):
        for j in range(rows * columns):
            distance2 = (i // columns - j // columns) ** 2 + (i % columns - j % columns) ** 2
            prior[1 + i, 1 + j] = math.exp(-distance2 / (2 * std**2))
    return prior


def reference_last_block(name: str, block, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Each variant's formula computed with torch's MultiheadAttention on swapped projections."""
    attention, normed = block.attn, block.ln_1(x)

    def attend(query_from, key_from, mask=None):
        module = attention_with_projections(attention, query_from, key_from)
        return module(normed, normed, normed, need_weights=False, attn_mask=mask)[0]

    if name == "maskclip":
        value = F.linear(normed, attention.in_proj_weight[2 * attention.embed_dim:],
                         attention.in_proj_bias[2 * attention.embed_dim:])
        return attention.out_proj(value)
    if name == "clearclip":
        return attend("q", "q")
    if name == "sclip":
        x = x + attend("q", "q") + attend("k", "k") - attention.out_proj.bias
        return x + block.mlp(block.ln_2(x))
    if name == "naclip":
        return attend("k", "k", plain_neighbourhood_prior(*grid, NEIGHBOURHOOD_STD))
    raise AssertionError(name)


def test_vanilla_tokens_equal_open_clips_own_forward(tiny_model, windows):
    visual = copy.deepcopy(tiny_model.visual)
    visual.output_tokens = True
    with torch.no_grad():
        pooled, open_clip_tokens = visual(windows)
        ours = patch_tokens(ClipTower(tiny_model), windows, DENSE_METHODS["vanilla"])
    torch.testing.assert_close(ours[:, 1:], open_clip_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[:, 0] @ visual.proj, pooled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["maskclip", "clearclip", "sclip", "naclip"])
def test_each_variant_equals_an_independent_computation_of_its_formula(tiny_model, windows, name):
    visual = tiny_model.visual
    with torch.no_grad():
        x = tokens_before_last_block(visual, windows)
        expected = visual.ln_post(reference_last_block(name, visual.transformer.resblocks[-1], x, (8, 8)))
        ours = patch_tokens(ClipTower(tiny_model), windows, DENSE_METHODS[name])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_variants_really_differ(tiny_model, windows):
    """The methods that change the last block only (SC-CLIP, which needs 11 blocks, has its own oracle tests)."""
    with torch.no_grad():
        tokens = {name: patch_tokens(ClipTower(tiny_model), windows, method) for name, method in DENSE_METHODS.items()
                  if isinstance(method, LastBlockMethod)}
    assert set(tokens) == {"vanilla", "maskclip", "sclip", "clearclip", "naclip"}
    names = list(tokens)
    for first in range(len(names)):
        for second in range(first + 1, len(names)):
            assert (tokens[names[first]] - tokens[names[second]]).abs().max() > 1e-2, (names[first], names[second])


def test_positional_interpolation_is_the_identity_at_the_native_grid(tiny_model):
    tower = ClipTower(tiny_model)
    torch.testing.assert_close(tower.interpolated_positions((8, 8)), tower.visual.positional_embedding, atol=1e-6,
                               rtol=0)


def test_dense_maps_on_windows_larger_than_the_model_input(tiny_model):
    text = F.normalize(torch.randn(3, 64), dim=-1)
    maps = DENSE_METHODS["naclip"].map_views(ClipTower(tiny_model), torch.randn(2, 3, 96, 96), text)
    assert maps.shape == (2, 3, 12, 12) and maps.abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("size, window, stride", [((70, 90), 32, 16), ((64, 150), 40, 13), ((33, 33), 32, 32)])
def test_sliding_windows_reproduce_a_local_map_of_the_whole_image(size, window, stride):
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
    views = plan_windows(*size, window, stride, "none")
    lefts = sorted({view.box[0] for view in views})
    assert max(np.diff(lefts), default=0) <= stride and max(view.box[2] for view in views) == size[1]

    def local_map(batch):
        return torch.stack([batch[:, 0] * batch[:, 1], batch[:, 2].exp()], dim=1)

    stitched = merge_views(image, views, local_map)
    torch.testing.assert_close(stitched, local_map(image[None])[0], atol=1e-6, rtol=0)


def test_window_zooms_and_mirrors_follow_the_policy():
    default = plan_windows(375, 500, 250, 125, "default")
    sides = sorted({view.box[2] - view.box[0] for view in default})
    assert sides == [125, 250]
    assert {view.mirrored for view in default if view.box[2] - view.box[0] == 250} == {False, True}
    assert {view.mirrored for view in default if view.box[2] - view.box[0] == 125} == {False}
    assert len(plan_windows(375, 500, 250, 125, "none")) == 6


def test_dense_scores_follow_the_background_rule():
    cosines = torch.tensor([[0.30, 0.10, 0.20], [0.10, 0.30, 0.20], [0.00, 0.00, 0.21]])[:, :, None]
    scores = dense_scores(cosines, labels=2, logit_scale=10.0, bg_threshold=0.5)
    probabilities = torch.softmax(10.0 * cosines, dim=0)
    torch.testing.assert_close(scores[1:], probabilities[:2])
    torch.testing.assert_close(scores[0], torch.maximum(probabilities[2], torch.tensor(0.5)))
    assert scores[:, :, 0].argmax(dim=0).tolist() == [1, 2, 0]


def test_segmenter_dense_method_end_to_end(tiny_checkpoint):
    segmenter = tiny_segmenter(tiny_checkpoint, templates="imagenet80", method="dense", refine="pamr+crf",
                               attention="sclip", window=64, short_side=96, background_words=("sky",))
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    result = segmenter.segment(image, ["cat", "dog"])
    assert result.mask.shape == (90, 120) and result.labels == ["background", "cat", "dog"]
    np.testing.assert_allclose(result.scores.sum(axis=0), 1, atol=1e-4)
    settings = segmenter.settings()
    assert settings["method"] == "dense" and settings["dense"]["stride"] == 32 and settings["bg_threshold"] == 0.1
    assert settings["pamr"]["iterations"] == 10 and settings["crf"] is not None and settings["start_block"] is None
    assert {"maps_s", "pamr_s", "crf_s"} <= set(result.timings)


@pytest.mark.parametrize("dense, message", [
    (dict(attention="qq"), "unknown --attention"),
    (dict(window=60, short_side=96), "--window 60 is not a multiple of wildseg-tiny-vit's 8-pixel patches"),
    (dict(window=8), "--window must be 0"),
    (dict(short_side=8), "--short-side must be at least 16"),
    (dict(window=64, stride=80, short_side=96), "--stride"),
])
def test_bad_dense_settings_are_one_line_errors(tiny_checkpoint, dense, message):
    with raises_worded(message):
        tiny_segmenter(tiny_checkpoint, method="dense", **dense)


def test_windows_are_placed_as_mmsegmentation_places_them():
    """The official code's positions on a 500 x 333 VOC image resized to 504 x 336 (the issue's example: x starts
    0, 111, 222, 278 in original pixels) and on 500 x 366 (459 x 336: two rows, not three)."""
    assert window_spans(504, 224, 112) == [(0, 224), (112, 336), (224, 448), (280, 504)]
    assert window_spans(336, 224, 112) == [(0, 224), (112, 336)]
    assert window_spans(200, 224, 112) == [(0, 200)], "a window longer than the image is cut to it"
    assert [round(start * 500 / 504) for start, _ in window_spans(504, 224, 112)] == [0, 111, 222, 278]
    views = plan_windows(336, 459, 224, 112, "none")
    assert sorted({view.box[1] for view in views}) == [0, 112] and len(views) == 2 * 4
