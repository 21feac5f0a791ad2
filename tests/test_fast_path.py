"""The fast path (batched labels and views across images, cached text) against the straightforward one."""

import numpy as np
import pytest
from conftest import shared_dataset, tiny_segmenter

from wildseg.timing import StageTimes


@pytest.mark.parametrize("method, refine, crf_backend",
                         [("relevance", "crf", "pydensecrf"), ("dense", "pamr+crf", "pydensecrf"),
                          ("relevance", "crf", "torch")])
def test_fast_and_straightforward_paths_give_the_same_masks(tiny_checkpoint, method, refine, crf_backend):
    """fp32 on the CPU, three real CamVid images with three labels, default TTA: the masks agree on at least
    99.5% of the pixels of every image and the refined probabilities to 1e-4. The straightforward path's CRF
    is pydensecrf's; the fast path's is the torch CRF (the GPU default) in the last case."""
    root = shared_dataset("camvid")
    images = sorted((root / "images").iterdir())[:3]
    dense = dict(window=32, short_side=40, background_words=("sky",)) if method == "dense" else {}
    segmenter = tiny_segmenter(tiny_checkpoint, method=method, refine=refine, max_side=160, view_batch=5,
                               crf_backend=crf_backend, **dense)
    labels = ["road", "car", "tree"]
    fast = {item.source: item.result for item in segmenter.segment_many(images, labels)}
    for image in images:
        reference = segmenter.segment_reference(image, labels)
        assert (fast[image].mask == reference.mask).mean() >= 0.995
        np.testing.assert_allclose(fast[image].scores, reference.scores, atol=1e-4)


def test_stage_times_cover_the_stages_of_each_path(tiny_checkpoint):
    segmenter = tiny_segmenter(tiny_checkpoint, refine="pamr")
    segmenter.stages = StageTimes(segmenter.backbone.device)
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    segmenter.segment_reference(image, ["cat", "dog"])
    reference = dict(segmenter.stages.seconds)
    assert set(reference) == {"forward", "backward", "tta_merge", "pseudo_labels", "refine"}
    assert all(seconds > 0 for seconds in reference.values())
    segmenter.stages = StageTimes(segmenter.backbone.device)
    list(segmenter.segment_many([image, image], ["cat", "dog"]))
    assert set(segmenter.stages.seconds) == set(reference)
