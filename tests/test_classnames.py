"""Class-name lists: the shipped benchmark lists and the synonym / background format."""

import pytest
from conftest import raises_worded

from wildseg.datasets.classes import builtin_class_names, parse_class_names, read_class_names

SIZES = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81, "coco_stuff": 171,
         "ade20k": 150, "cityscapes": 19}


@pytest.mark.parametrize("key", sorted(SIZES))
def test_shipped_lists_have_the_benchmark_sizes_and_at_most_one_background(key):
    classes = builtin_class_names(key)
    assert len(classes) == SIZES[key]
    backgrounds = [index for index, name in enumerate(classes) if name.is_background]
    assert backgrounds == ([0] if key in ("voc21", "context60", "coco_object") else [])
    assert all(name.prompts for name in classes if not name.is_background)


def test_shipped_lists_agree_where_benchmarks_share_classes():
    names = {key: [name.name for name in builtin_class_names(key)] for key in SIZES}
    assert names["voc21"][1:] == names["voc20"]
    assert names["context60"][1:] == names["context59"]
    assert names["coco_object"][1:] == names["coco_stuff"][:80]
    assert names["voc20"][0] == "aeroplane" and names["voc20"][-1] == "tv monitor"
    assert names["ade20k"][0] == "wall" and names["ade20k"][-1] == "flag" and names["cityscapes"][18] == "bicycle"


def test_a_line_is_a_class_with_synonyms_and_background_words():
    classes = parse_class_names(["background, sky,  wall", "", "tv monitor, television", "cat"], "test")
    assert [name.name for name in classes] == ["background", "tv monitor", "cat"]
    assert classes[0].is_background and classes[0].prompts == ("sky", "wall")
    assert classes[1].prompts == ("tv monitor", "television") and not classes[1].is_background
    assert parse_class_names(["Background"], "test")[0].prompts == ()


def test_a_name_shared_by_two_classes_is_refused(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("car, auto\nbus\nAuto\n")
    with raises_worded("'Auto' belongs to both class 0 and class 2"):
        read_class_names(path)
    with raises_worded("may only start a line"):
        parse_class_names(["cat, background"], "test")
    with raises_worded("only one line may start with 'background'"):
        parse_class_names(["background, sky", "cat", "background"], "test")
    with raises_worded("lists no class names"):
        parse_class_names(["", " , "], "test")
