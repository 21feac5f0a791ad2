"""Relevance maps against open_clip's own forward and against a plain one-label-at-a-time computation."""

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import raises_worded

from wildseg.backbone.clip_internals import ClipTower, vision_config_problem, vision_tower_problem
from wildseg.methods.base import Method
from wildseg.methods.relevance import forward_with_attention, relevance_maps, resolve_start_block


def test_explicit_attention_forward_matches_open_clip(tiny_model):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    embeddings, attentions = forward_with_attention(ClipTower(tiny_model), images)
    with torch.no_grad():
        expected = tiny_model.encode_image(images)
    assert torch.allclose(embeddings.detach(), expected, atol=1e-5)
    assert len(attentions) == 3 and attentions[0].shape == (3, 2, 65, 65)
    assert torch.allclose(attentions[0].sum(-1), torch.ones(3, 2, 65), atol=1e-5)


def reference_relevance(model, image, text_embedding, first_block, monkeypatch):
    """Chefer et al.'s rule for one image and one label, on open_clip's own forward.

    Blocks are forced onto torch's MultiheadAttention slow path (need_weights=True); its softmax output, the
    attention probabilities used in the forward, is captured so that autograd differentiates with respect to it.
    """
    captured = []
    softmax = torch.nn.functional.softmax

    def capturing_softmax(*args, **kwargs):
        probabilities = softmax(*args, **kwargs)
        captured.append(probabilities)
        return probabilities

    def slow_path_attention(block):
        def attention(q_x, k_x=None, v_x=None, attn_mask=None):
            return block.attn(q_x, q_x, q_x, need_weights=True, average_attn_weights=False)[0]

        return attention

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "softmax", capturing_softmax)
        for block in model.visual.transformer.resblocks:
            patch.setattr(block, "attention", slow_path_attention(block))
        embedding = F.normalize(model.encode_image(image[None]), dim=-1)
    assert len(captured) == len(model.visual.transformer.resblocks)
    logit = model.logit_scale.exp() * (embedding @ text_embedding)[0]
    gradients = torch.autograd.grad(logit, captured)
    tokens = captured[0].shape[-1]
    relevance = torch.eye(tokens)
    for attention, gradient in list(zip(captured, gradients))[first_block:]:
        cam = (gradient * attention).clamp(min=0).mean(dim=0)
        relevance = relevance + cam @ relevance
    return relevance[0, 1:].reshape(8, 8)


@pytest.mark.parametrize("start_block", [0, 1, -1])
def test_batched_maps_equal_one_label_at_a_time(tiny_model, start_block, monkeypatch):
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    text = F.normalize(torch.randn(4, 64, generator=generator), dim=-1)
    maps = relevance_maps(ClipTower(tiny_model), images, text, start_block)
    assert maps.shape == (2, 4, 8, 8)
    first = resolve_start_block(start_block, 3)
    for image_index in range(2):
        for label in range(4):
            expected = reference_relevance(tiny_model, images[image_index], text[label], first, monkeypatch)
            assert torch.allclose(maps[image_index, label], expected, atol=1e-5), (image_index, label)
    assert maps.abs().sum() > 0


def test_start_block_out_of_range_is_a_clear_error():
    with raises_worded("outside the model's 3 blocks"):
        resolve_start_block(3, 3)


def test_non_vit_models_are_refused():
    import open_clip

    resnet = open_clip.create_model("RN50")
    with raises_worded("model RN50 is not a ViT of open_clip's own with class-token output"):
        Method.check(None, ClipTower(resnet), "RN50")


def shrunk(config: dict) -> dict:
    """The same architecture with tiny widths and depths (and open_clip's own text tower), quick to build."""
    config = copy.deepcopy(config)
    vision, text = config["vision_cfg"], config["text_cfg"]
    config["embed_dim"] = 32
    if isinstance(vision.get("layers"), int):
        vision.update(layers=2, width=64, head_width=32)
    else:
        vision.update(layers=[1, 1, 1, 1], width=16)
    for key in ("hf_model_name", "hf_tokenizer_name", "hf_proj_type", "hf_pooler_type"):
        text.pop(key, None)
    text.update(width=64, layers=1, heads=2)
    if "multimodal_cfg" in config:
        config["multimodal_cfg"].update(width=64, layers=1, heads=2)
    return config


def test_the_config_rule_agrees_with_the_built_vision_tower_for_every_architecture(tmp_path):
    """`wildseg models` reads configs; every open_clip architecture but those with timm towers (which the rule
    refuses by name) is built shrunk, and `vision_tower_problem` must give the rule's verdict."""
    verdicts = {}
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name)
        if config["vision_cfg"].get("timm_model_name"):
            assert vision_config_problem(config).startswith("timm vision tower")
            continue
        path = tmp_path / f"shrunk-{name}.json"
        path.write_text(json.dumps(shrunk(config)))
        open_clip.add_model_config(path)
        verdicts[name] = vision_tower_problem(open_clip.create_model(f"shrunk-{name}").visual)
        assert (verdicts[name] is None) == (vision_config_problem(config) is None), name
    refused = "not a ViT of open_clip's own with class-token output"
    assert verdicts["ViT-B-16"] is None and verdicts["RN50"] == refused and verdicts["coca_ViT-B-32"] == refused
    assert len(verdicts) > 50
