"""DINO through timm (`wildseg.backbone.dino`) against CorrCLIP's official run: `corrclip_voc21.npz` holds the
features its code computed with `tiny_dino_p8_sd.pt` (README-corrclip.md, step D) on the two 336 x 336 windows of a
VOC and a CamVid image. The weights load by timm's model name from the local file.

Achieved on a 2-core AMD EPYC VM: 1.3e-7 (unit-norm features)."""

import numpy as np
import pytest
import torch
from conftest import oracle_file
from timm.layers import resample_abs_pos_embed

from wildseg.backbone.dino import IMAGENET_MEAN, IMAGENET_STD, correlation_features, dino_positions, load_dino
from wildseg.errors import WildsegError

TINY_DINO = dict(embed_dim=64, depth=3, num_heads=2)
"""The oracle's tiny DINO: ViT-B/8's layout at width 64, 3 blocks, 2 heads."""
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
MMSEG_MEAN, MMSEG_STD = (122.771, 116.746, 104.094), (68.501, 66.632, 70.323)


def channels(values) -> torch.Tensor:
    return torch.tensor(values)[:, None, None]


@pytest.fixture(scope="module")
def tiny_dino():
    return load_dino("vit_base_patch8_224.dino", oracle_file("tiny_dino_p8_sd.pt"), **TINY_DINO)


@pytest.mark.parametrize("key", ["voc_2007_000123", "camvid_0001TP_008550"])
def test_the_correlation_features_are_corrclips(tiny_dino, key):
    """CorrCLIP un-normalises each CLIP-normalised window with CLIP's constants, then normalises it for ImageNet."""
    oracle = np.load(oracle_file("corrclip_voc21.npz"))
    clip_input = (torch.from_numpy(oracle[f"{key}_input_u8_rgb"]).permute(2, 0, 1).float()
                  - channels(MMSEG_MEAN)) / channels(MMSEG_STD)
    for window, (top, bottom, left, right) in enumerate(oracle[f"{key}_windows"]):
        rgb = clip_input[:, top:bottom, left:right] * channels(CLIP_STD) + channels(CLIP_MEAN)
        with torch.no_grad():
            features, grid = correlation_features(tiny_dino, ((rgb - channels(IMAGENET_MEAN))
                                                              / channels(IMAGENET_STD))[None])
        assert grid == (42, 42)
        np.testing.assert_allclose(features[0].numpy(), oracle[f"{key}_w{window}_dino_feats"], rtol=0, atol=1e-5)


def test_positions_follow_dinos_rule_not_timms(tiny_dino):
    """At 42 x 42 DINO's (g + 0.1) / 28 scale factor samples elsewhere than timm's resampling to the size."""
    with torch.no_grad():
        ours = dino_positions(tiny_dino, (42, 42))
        timms = resample_abs_pos_embed(tiny_dino.pos_embed, (42, 42), num_prefix_tokens=1)
    assert ours.shape == timms.shape == (1, 1 + 42 * 42, 64)
    assert torch.equal(ours[:, 0], tiny_dino.pos_embed[:, 0])
    assert (ours - timms).abs().max() > 1e-3
    assert torch.equal(dino_positions(tiny_dino, (28, 28)), tiny_dino.pos_embed)


def test_missing_dino_weights_are_one_line_errors(tmp_path, unreachable_hub):
    with pytest.raises(WildsegError, match="checkpoint not found"):
        load_dino("vit_small_patch8_224.dino", tmp_path / "absent.pt")
    with pytest.raises(WildsegError, match="timm could not load vit_small_patch8_224.dino's weights .*give a local "
                                           "state dict"):
        load_dino("vit_small_patch8_224.dino", **TINY_DINO)
