"""Planning in the background (`plan_run`'s `hand_out_after`): the images to do are read while the listing goes on,
in the order and with the outputs of a plan made whole, and an error the listing finds reaches the reader; which
runs may be handed out as they are listed (`hands_out_as_listed`)."""

import json
import threading
from pathlib import Path

import pytest
from conftest import raises_worded

from wildseg import planning
from wildseg.batch import LabelOptions, labeling
from wildseg.errors import WildsegError
from wildseg.planning import OutputLayout, hands_out_as_listed, plan_run

HELD_AFTER = 2000
"""Images the held listings yield before they wait."""


def image_tree(root: Path, count: int) -> Path:
    """`count` empty image files in 7 sub-folders (planning opens none)."""
    for index in range(count):
        folder = root / f"part{index % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:05d}.jpg").touch()
    return root


def held_listing(monkeypatch, release: threading.Event, then=None):
    """Make planning's listing stop after HELD_AFTER images until `release` is set, then go on (or raise `then`)."""
    listed = planning.unique_inputs

    def held(*arguments):
        listing = listed(*arguments)
        for _ in range(HELD_AFTER):
            yield next(listing)
        assert release.wait(60), "the test released the listing"
        if then is not None:
            raise then
        yield from listing

    monkeypatch.setattr(planning, "unique_inputs", held)


def test_images_are_read_while_the_listing_goes_on_in_the_order_of_the_whole_plan(tmp_path, monkeypatch):
    images = image_tree(tmp_path / "images", 3000)
    arguments = ([str(images)], OutputLayout(tmp_path / "out"), labeling(LabelOptions("cat")),
                 dict)
    with plan_run(*arguments, recursive=True) as whole:
        expected = list(whole.todo())
    assert len(expected) == 3000 and whole.listed
    release = threading.Event()
    held_listing(monkeypatch, release)
    with plan_run(*arguments, recursive=True, hand_out_after=0.0) as plan:
        todo = plan.todo()
        early = [next(todo) for _ in range(HELD_AFTER)]  # more than the plan file holds yet: read from memory too
        assert not plan.listed and plan.todo_count == HELD_AFTER and plan.pending
        release.set()
        assert early + list(todo) == expected
        assert plan.wait(None) and (plan.found, plan.images, plan.todo_count) == (3000, 3000, 3000)


def test_an_error_of_the_listing_reaches_the_reader_after_the_images_planned_before_it(tmp_path, monkeypatch):
    images = image_tree(tmp_path / "images", 2500)
    release = threading.Event()
    held_listing(monkeypatch, release, then=WildsegError("two images would write the same outputs"))
    with plan_run([str(images)], OutputLayout(tmp_path / "out"), labeling(LabelOptions("cat")),
                  dict, recursive=True, hand_out_after=0.0) as plan:
        todo = plan.todo()
        early = [next(todo) for _ in range(HELD_AFTER)]
        release.set()
        with raises_worded("two images would write the same outputs"):
            next(todo)
        with raises_worded("two images would write the same outputs"):
            plan.wait(None)
    assert len(early) == HELD_AFTER


def test_an_error_found_before_the_hand_out_is_raised_by_plan_run_at_once(tmp_path):
    with raises_worded("the inputs hold no image"):
        plan_run([str(tmp_path)], OutputLayout(tmp_path / "out"), labeling(LabelOptions("cat")),
                 dict, hand_out_after=30.0)


@pytest.mark.parametrize("case, expected", [
    ("one folder, no output folder", True), ("one folder, an empty output folder", True),
    ("an output folder that holds a file", False), ("two folders", False), ("a file", False), ("a list", False),
    ("a labels file", False), ("an output path that is a file", False),
])
def test_only_a_first_run_of_one_folder_without_a_labels_file_is_handed_out_as_listed(tmp_path, case, expected):
    images, out = image_tree(tmp_path / "images", 2), tmp_path / "out"
    inputs, labels = [str(images)], LabelOptions("cat")
    if case == "one folder, an empty output folder":
        out.mkdir()
    elif case == "an output folder that holds a file":
        out.mkdir()
        (out / "notes.txt").write_text("kept")
    elif case == "two folders":
        inputs = [str(images / "part0"), str(images / "part1")]
    elif case == "a file":
        inputs = [str(images / "part0" / "00000.jpg")]
    elif case == "a list":
        (tmp_path / "list.txt").write_text("images/part0/00000.jpg\n")
        inputs = [f"@{tmp_path / 'list.txt'}"]
    elif case == "a labels file":
        (tmp_path / "labels.json").write_text(json.dumps({"images/part0/00000.jpg": "cat"}))
        labels = LabelOptions(labels_file=tmp_path / "labels.json")
    elif case == "an output path that is a file":
        out.write_text("not a folder")
    assert hands_out_as_listed(inputs, out, labeling(labels)) is expected
