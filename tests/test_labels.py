"""Label lists: trimming, merging duplicates, refusing empty lists."""

import pytest
from conftest import raises_worded

from wildseg.errors import WildsegWarning
from wildseg.labels import clean_labels


def test_names_are_trimmed_and_split_on_commas():
    assert clean_labels(" cat , dog,  sofa  cushion ,") == ["cat", "dog", "sofa cushion"]
    assert clean_labels(["cat", "  dog "]) == ["cat", "dog"]


def test_duplicates_are_merged_case_folded_with_a_warning():
    with pytest.warns(WildsegWarning) as warned:
        assert clean_labels("cat,Cat, CAT ,dog") == ["cat", "dog"]
    assert [str(w.message) for w in warned] == [
        "duplicate label 'Cat' merged with 'cat'",
        "duplicate label 'CAT' merged with 'cat'",
    ]


@pytest.mark.parametrize("labels", ["", "  ,  , ", [], ["  "]])
def test_empty_label_lists_are_refused(labels):
    with raises_worded("no label names given"):
        clean_labels(labels)


def test_background_is_reserved():
    with raises_worded("reserved"):
        clean_labels("cat,background")
