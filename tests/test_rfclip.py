"""RF-CLIP against its official code (liblacklucy/RF-CLIP@c2b333e): the oracle folder's `rfclip_voc21.npz` (one
whole-image pass) and `rfclip_voc20.npz` (224/112 windows with the whole image's global vector) hold what it
computed on `tiny_openai_sd.pt` with one LayerNorm gain scaled so that sink tokens occur, its sink-channel list
taken modulo the tiny width (README-scclip-rfclip.md there). The weights load through wildseg's own loader and the
images enter as files. Every stage is compared: the sink tokens and cluster choices exactly, the states of each
block, the enhancing, the decoding, the features, the adjusted prompts and the logits to 1e-5 of their scale (the
unnormalised enhanced states relatively); then the class scores and the label maps.

Achieved on a 2-core AMD EPYC VM: states 4e-6 absolute at norms up to 60, features 1.6e-7, patch logits 1.3e-7."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (ORACLE_IMAGES, ORACLE_MODEL, dense_protocol_segmenter, oracle_file, oracle_image_file,
                      shared_dataset)
from PIL import Image

from wildseg import Segmenter, SegmenterConfig
from wildseg.backbone import load_backbone
from wildseg.backbone.clip_internals import ClipTower, dot_product_weights
from wildseg.cli import main
from wildseg.errors import WildsegError
from wildseg.evaluation import Query, dense_class_prediction
from wildseg.methods import rfclip

PROBED_PATCHES = [0, 1, 27, 28, 300, 560, 587]
"""The patches whose full vectors the oracle stores (`IMG_{stage}_probe`), after the class token where it has one."""


@pytest.fixture(scope="module")
def sink_checkpoint(tmp_path_factory):
    """tiny_sink70 of the oracle README: the tiny CLIP with ln_pre's gain on channel 70 scaled by 16."""
    weights = torch.load(oracle_file("tiny_openai_sd.pt"))
    weights["visual.ln_pre.weight"][70] *= 16
    path = tmp_path_factory.mktemp("sink70") / "tiny_sink70.pt"
    torch.save(weights, path)
    return path


@pytest.fixture(scope="module")
def sink_backbone(sink_checkpoint):
    return load_backbone(ORACLE_MODEL, checkpoint=sink_checkpoint, device="cpu")


def protocol_segmenter(backbone, dataset: str) -> Segmenter:
    return dense_protocol_segmenter(backbone, "rfclip", dataset)


def views_of(segmenter: Segmenter, key: str) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
    """The normalised whole image (1 x 3 x h x w), its views as wildseg plans them and their boxes [y1, y2, x1, x2]."""
    pipeline = segmenter.pipeline
    source = pipeline.decode(oracle_image_file(key)).source
    image = pipeline.normalized(source)[None]
    boxes = [(view.box[1], view.box[3], view.box[0], view.box[2]) for view in pipeline.plan(source)]
    return image, torch.cat([image[:, :, top:bottom, left:right] for top, bottom, left, right in boxes]), boxes


def block_states(tower: ClipTower, image: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each block's output before and after the denoising, for one image, written out from the module's parts."""
    channels = rfclip.sink_channels(tower.visual.transformer.width)
    x, grid = tower.embed_windows(image)
    states = []
    for block in range(tower.depth):
        if block < tower.depth - 1:
            query, key, value = tower.head_projections(block, x)
            out = tower.feed_forward(block, x + tower.attention_output(block, dot_product_weights(query, key), value))
        else:
            out = tower.run_block(block, x)
        x = rfclip.denoised(out, grid, channels)
        states.append((out[0], x[0]))
    return states


def assert_state(oracle, prefix: str, stage: str, ours: torch.Tensor, per_token: bool = False) -> None:
    """A state against the oracle's per-token norms and probed vectors, to 1e-5 of the largest norm, or with
    `per_token` (the enhanced states, whose scale varies by 1e3 between tokens) to 1e-5 of each token's norm."""
    norms, probe = oracle[f"{prefix}_{stage}_norm"], oracle[f"{prefix}_{stage}_probe"]
    rows = ([0] if len(norms) == 589 else []) + [patch + (len(norms) == 589) for patch in PROBED_PATCHES]
    scale = norms if per_token else np.full_like(norms, norms.max())
    assert np.all(np.abs(ours.norm(dim=-1).numpy() - norms) <= 1e-5 * scale), stage
    assert np.all(np.abs(ours[rows].numpy() - probe) <= 1e-5 * scale[rows, None]), stage


@pytest.mark.parametrize("key", ORACLE_IMAGES)
def test_each_stage_of_the_whole_image_pass_is_the_official_codes(sink_backbone, key):
    """VOC21's protocol: sink tokens of each block exactly, the block states, the guides' mean, the enhancing
    matrix, the enhanced and decoded states, the features and the global vector."""
    oracle = np.load(oracle_file("rfclip_voc21.npz"))
    segmenter = protocol_segmenter(sink_backbone, "voc")
    assert (segmenter.pipeline.decode(oracle_image_file(key)).source == oracle[f"{key}_input_u8_rgb"]).all()
    image, views, _ = views_of(segmenter, key)
    assert views.shape == image.shape, "VOC21 runs the whole 336 x 448 input in one pass"
    tower = ClipTower(sink_backbone.model)
    channels = rfclip.sink_channels(128)
    effective = json.loads(str(oracle["settings"]))["effective"]["feat_denoising"]["sink_channel"]
    assert list(channels) == effective == [4, 34, 61, 70, 45, 90, 121, 73]
    with torch.no_grad():
        states = block_states(tower, image)
        for block, (out, denoised) in enumerate(states):
            sinks, scores = rfclip.sink_tokens(out[1:], channels)
            assert np.array_equal(sinks.numpy(), oracle[f"{key}_L{block}_sink_mask"]), f"sinks of block {block}"
            np.testing.assert_allclose(scores.numpy(), oracle[f"{key}_L{block}_sink_value"], rtol=1e-5, atol=1e-7)
            assert_state(oracle, key, f"L{block}_block_out", out)
            assert_state(oracle, key, f"L{block}_denoised", denoised)
        encoding = rfclip.encode(tower, image)
        guide_mean = encoding.guide_mean
        assert_state(oracle, key, "guide_mean", guide_mean[0])
        cosines = rfclip.enhancing_cosines(guide_mean[:, 1:])
        assert np.array_equal((cosines[0] != 0).sum(dim=-1).numpy(), oracle[f"{key}_enh_simi_kept_count"])
        np.testing.assert_allclose(cosines[0].sum(dim=-1).numpy(), oracle[f"{key}_enh_simi_kept_rowsum"],
                                   rtol=1e-5, atol=0)
        enhanced_x = rfclip.enhanced(encoding.penultimate, cosines)
        enhanced_guide = rfclip.enhanced(guide_mean, cosines)
        assert_state(oracle, key, "enh_x", enhanced_x[0], per_token=True)
        assert_state(oracle, key, "enh_guide", enhanced_guide[0], per_token=True)
        decoded_x = rfclip.decoded(tower, enhanced_x, encoding.key_key_sum)
        decoded_guide = rfclip.decoded(tower, enhanced_guide, encoding.key_key_sum)
        assert_state(oracle, key, "last_attn_x", decoded_x[0])
        assert_state(oracle, key, "last_attn_guide", decoded_guide[0])
        assert_state(oracle, key, "final_x", (decoded_x[0] + decoded_guide[0]) / 2)
        features = rfclip.patch_features(tower, encoding)
    if key.startswith("voc"):
        expected = oracle[f"{key}_guide_mean"]
        np.testing.assert_allclose(guide_mean[0].numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    official = oracle[f"{key}_features"]
    np.testing.assert_allclose(features[0].numpy(), official / np.linalg.norm(official, axis=-1, keepdims=True),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(encoding.global_vectors[0].numpy(), oracle[f"{key}_cls_feature"], rtol=0,
                               atol=1e-5 * np.abs(oracle[f"{key}_cls_feature"]).max())


@pytest.mark.parametrize("key", ORACLE_IMAGES)
def test_the_hierarchical_prompts_and_the_mixed_logits_are_the_official_codes(sink_backbone, key):
    """The label clusters, each cluster's chosen label and its 2 best patches exactly; the adjusted embeddings and
    the 0.9 local + 0.1 global logits to 1e-5."""
    oracle = np.load(oracle_file("rfclip_voc21.npz"))
    segmenter = protocol_segmenter(sink_backbone, "voc")
    image, _, _ = views_of(segmenter, key)
    tower, text = ClipTower(sink_backbone.model), torch.from_numpy(oracle["query_features"])
    clusters = rfclip.prompt_clusters(text, 0.10)
    assert np.array_equal(clusters, oracle["cluster_info"]) and clusters.max() == 3
    with torch.no_grad():
        encoding = rfclip.encode(tower, image)
        features = rfclip.patch_features(tower, encoding)
        global_similarity = torch.nn.functional.normalize(encoding.global_vectors, dim=-1) @ text.T
        chosen = rfclip.chosen_labels(global_similarity, clusters)
        top, cosines = rfclip.best_patches(features, text[chosen])
        adjusted = rfclip.adjusted_prompts(features, global_similarity, text, clusters, 0.03)
        maps = segmenter.pipeline.method.map_views(tower, image, text)
    np.testing.assert_allclose(global_similarity[0].numpy(), oracle[f"{key}_global_sim"], rtol=0, atol=1e-6)
    assert chosen[0].tolist() == oracle[f"{key}_cluster_choice"].tolist()
    assert top[0].tolist() == oracle[f"{key}_cluster_topk_idx"].tolist()
    np.testing.assert_allclose(cosines[0].numpy(), oracle[f"{key}_cluster_topk_sim"], rtol=0, atol=1e-6)
    expected = oracle[f"{key}_adjusted_text_features"]
    assert (np.abs(expected - oracle["query_features"]).max(axis=1) > 0).sum() == 4, "one label moved per cluster"
    np.testing.assert_allclose(adjusted[0].numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps[0].numpy(), oracle[f"{key}_patch_logits"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("key", ORACLE_IMAGES)
def test_windows_take_the_whole_images_global_vector_as_the_official_voc20_run_does(sink_backbone, key):
    """VOC20: 224/112 windows, each with its own sinks, enhancing and features, the whole image's global vector
    (a pass of its own, the VOC21 file's), its clusters' choices and best patches, and its logits."""
    oracle, whole = np.load(oracle_file("rfclip_voc20.npz")), np.load(oracle_file("rfclip_voc21.npz"))
    segmenter = protocol_segmenter(sink_backbone, "voc20")
    method = segmenter.pipeline.method
    assert method.uses_image_context and method.global_weight == 0.4 and method.prompt_shift == 0.02
    image, windows, boxes = views_of(segmenter, key)
    assert np.array_equal(np.array(boxes), oracle[f"{key}_windows"])
    tower, text = ClipTower(sink_backbone.model), torch.from_numpy(oracle["query_features"])
    with torch.no_grad():
        context = method.image_context(tower, image[0])
        window_zero = block_states(tower, windows[:1])
        encoding = rfclip.encode(tower, windows)
        features = rfclip.patch_features(tower, encoding)
        maps = method.map_views(tower, windows, text, contexts=[context] * len(windows))
    np.testing.assert_allclose(context.numpy(), whole[f"{key}_cls_feature"] / np.linalg.norm(
        whole[f"{key}_cls_feature"]), rtol=0, atol=1e-6)
    for block, (out, _) in enumerate(window_zero):
        sinks, _ = rfclip.sink_tokens(out[1:], rfclip.sink_channels(128))
        assert np.array_equal(sinks.numpy(), oracle[f"{key}_w0_L{block}_sink_mask"]), f"window 0, block {block}"
    kept = rfclip.enhancing_cosines(encoding.guide_mean[:1, 1:])[0]
    assert np.array_equal((kept != 0).sum(dim=-1).numpy(), oracle[f"{key}_w0_enh_simi_kept_count"])
    official = oracle[f"{key}_window_features"]
    np.testing.assert_allclose(features.numpy(), official / np.linalg.norm(official, axis=-1, keepdims=True),
                               rtol=0, atol=1e-5)
    global_similarity = (context @ text.T)[None].expand(len(windows), -1)
    np.testing.assert_allclose(global_similarity.numpy(), oracle[f"{key}_window_global_sim"], rtol=0, atol=1e-6)
    clusters = rfclip.prompt_clusters(text, 0.10)
    chosen = rfclip.chosen_labels(global_similarity, clusters)
    assert chosen.tolist() == oracle[f"{key}_window_cluster_choice"].tolist()
    top, _ = rfclip.best_patches(features, text[chosen])
    assert top.tolist() == oracle[f"{key}_window_cluster_topk_idx"].tolist()
    adjusted = rfclip.adjusted_prompts(features, global_similarity, text, clusters, 0.02)
    np.testing.assert_allclose(adjusted.numpy(), oracle[f"{key}_window_adjusted_text_features"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps.numpy(), oracle[f"{key}_window_patch_logits"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dataset, oracle_name", [("voc", "rfclip_voc21.npz"), ("voc20", "rfclip_voc20.npz")])
@pytest.mark.parametrize("key", ORACLE_IMAGES)
def test_the_whole_pipeline_reproduces_the_official_scores_and_label_maps(sink_backbone, dataset, oracle_name, key):
    """softmax(40 x logits), class maxima, to 1e-5 of their maximum; VOC21's 0.1 threshold and VOC20's argmax."""
    oracle = np.load(oracle_file(oracle_name))
    words, owners = oracle["query_words"].tolist(), oracle["query_idx"]
    classes = int(owners.max()) + 1
    segmenter = protocol_segmenter(sink_backbone, dataset)
    probabilities = segmenter.query_probabilities(oracle_image_file(key), words)
    grouped = np.stack([probabilities[owners == index].max(axis=0) for index in range(classes)])
    expected = oracle[f"{key}_probs_lattice"]
    np.testing.assert_allclose(grouped[:, 4::8, 4::8], expected, atol=1e-5 * expected.max(), rtol=0)
    query = Query(words, list(range(classes)), [np.flatnonzero(owners == index).tolist() for index in range(classes)])
    background = 0 if dataset == "voc" else None
    predicted = dense_class_prediction(probabilities, query, probabilities.shape[1:],
                                       segmenter.config.background_threshold, None, background)
    assert (predicted == oracle[f"{key}_pred"]).mean() >= 0.999
    if dataset == "voc":
        argmax = dense_class_prediction(probabilities, query, probabilities.shape[1:], 0.0, None, 0)
        assert (argmax == oracle[f"{key}_pred_thd0"]).mean() >= 0.999


def test_the_sink_channels_are_the_published_lists_at_their_widths_and_taken_modulo_elsewhere():
    assert rfclip.sink_channels(768) == (4, 162, 189, 326, 429, 474, 633, 713)
    assert rfclip.sink_channels(1024) == (250, 261, 437, 650, 720, 779, 936, 1005)
    assert rfclip.sink_channels(512) == (4, 162, 189, 326, 429, 474, 121, 201)


def test_a_sink_is_blended_with_its_neighbourhood_mean_and_the_rest_left_alone():
    """Hand-computed on a 3 x 3 grid of width 8, every token 0, 1, ..., 7 (score on channel 4: 4 / 28) but the
    centre, whose channel 4 is 50 (score 50 / 74 > 5 / 8): it is blended 0.6 : 0.4 with the 3 x 3 mean around it;
    the class token and the plain tokens stay."""
    tokens = torch.arange(8.0).expand(1, 10, 8).clone()
    tokens[0, 5, 4] = 50.0
    sinks, scores = rfclip.sink_tokens(tokens[:, 1:], (4,))
    assert sinks[0].tolist() == [False, False, False, False, True, False, False, False, False]
    assert scores[0, 4].item() == pytest.approx(50 / 74) and scores[0, 0].item() == pytest.approx(4 / 28)
    out = rfclip.denoised(tokens, (3, 3), (4,))
    assert out[0, 5, 4].item() == pytest.approx(0.6 * 50 + 0.4 * (8 * 4 + 50) / 9)
    assert out[0, 5, 1].item() == pytest.approx(1.0)
    assert torch.equal(out[0, [0, 1, 2, 3, 4, 6, 7, 8, 9]], tokens[0, [0, 1, 2, 3, 4, 6, 7, 8, 9]])


def test_rfclip_options_are_refused_for_other_methods_and_out_of_range_in_one_line():
    with pytest.raises(WildsegError, match="global_weight is an option of attention rfclip"):
        SegmenterConfig(method="dense", attention="naclip", global_weight=0.2)
    with pytest.raises(WildsegError, match=r"cluster_threshold must lie in \[0, 2\]"):
        SegmenterConfig(method="dense", attention="rfclip", cluster_threshold=3.0)
    with pytest.raises(WildsegError, match="global_context"):
        SegmenterConfig(method="dense", attention="rfclip", global_context="everywhere")


def test_wildseg_eval_compare_lists_rfclip_with_its_published_number_and_reproduces_its_prediction(
        sink_checkpoint, tmp_path):
    root, ids = shared_dataset("voc2012"), tmp_path / "ids.txt"
    ids.write_text("2007_000123\n")
    result = CliRunner().invoke(main, [
        "eval", "-d", "voc", "--root", str(root), "--ids", str(ids), "--compare", "naclip,rfclip", "--model",
        ORACLE_MODEL, "--checkpoint", str(sink_checkpoint), "--device", "cpu", "--save-predictions",
        str(tmp_path / "predictions"), "--report", str(tmp_path / "report.json"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {row["run"]: row for row in report["comparison"]}
    assert rows["rfclip"]["published_miou"] == 64.8 and rows["naclip"]["published_miou"] == 64.07
    assert rows["rfclip"]["follows"] == "rfclip" and rows["rfclip"]["deviations"] == 0
    predicted = np.array(Image.open(tmp_path / "predictions" / "rfclip" / "2007_000123.png"))
    oracle = np.load(oracle_file("rfclip_voc21.npz"))
    assert (predicted == oracle["voc_2007_000123_pred"]).mean() >= 0.999


def test_segment_with_rfclip_writes_the_mask_its_scores_give_and_records_its_settings(sink_checkpoint, tmp_path):
    """`wildseg segment --method dense --attention rfclip` end to end (224 windows, the whole image's global
    vector): the mask is the argmax of the scores file and the record names RF-CLIP's settings."""
    photo = shared_dataset("camvid") / "images" / "0001TP_008550.png"
    result = CliRunner().invoke(main, [
        "segment", str(photo), "--labels", "cat,sofa,road", "--method", "dense", "--attention", "rfclip",
        "--global-weight", "0.4", "--model", ORACLE_MODEL, "--checkpoint", str(sink_checkpoint), "--device", "cpu",
        "--out", str(tmp_path), "--save-scores", "--templates", "photo"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "0001TP_008550.json").read_text())
    assert record["settings"]["dense"]["rfclip"] == {"global_weight": 0.4, "prompt_shift": 0.03,
                                                     "cluster_threshold": 0.1, "global_context": "image"}
    mask = np.array(Image.open(tmp_path / "0001TP_008550.png"))
    scores = np.load(tmp_path / "0001TP_008550_scores.npz")
    assert mask.shape == (360, 480) and np.array_equal(mask, scores["scores"].astype(np.float32).argmax(axis=0))
