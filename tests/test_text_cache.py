"""The disk cache of label embeddings (wildseg.text_cache) and template sets read from files."""

import io
import json
import multiprocessing
import os
import shutil
import threading
import warnings

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY_MODEL, as_command_line_says, make_tiny_model, raises_worded

from wildseg.backbone import load_backbone
from wildseg.backbone.text_cache import EMBEDDINGS_FOLDER, TextCache
from wildseg.cache import CACHE_DIR_VARIABLE, cache_folder
from wildseg.errors import WildsegWarning
from wildseg.templates import TemplateSet, resolve_templates

LABELS = ["cat", "sofa", "potted plant", "sky", "road", "person"]


@pytest.fixture(autouse=True)
def isolated_default_cache(tmp_path, monkeypatch):
    """Keep the default cache folder (used when no text_cache is given) inside the test's folder."""
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "default-cache"))


def load_tiny(checkpoint, text_cache, activation="gelu"):
    """A fresh tiny backbone whose text encoder counts the prompts it embeds (in `backbone.prompts_encoded`)."""
    backbone = load_backbone(TINY_MODEL, checkpoint=checkpoint, device="cpu", activation=activation,
                             text_cache=text_cache)
    encode_text = backbone.model.encode_text
    backbone.prompts_encoded = 0

    def counting_encode_text(tokens, *args, **kwargs):
        backbone.prompts_encoded += len(tokens)
        return encode_text(tokens, *args, **kwargs)

    backbone.model.encode_text = counting_encode_text
    return backbone


def entry_files(folder):
    return sorted((folder / EMBEDDINGS_FOLDER).glob("*/*.npy"))


def test_second_run_loads_the_embeddings_from_disk_bit_for_bit(tiny_checkpoint, tmp_path):
    first = load_tiny(tiny_checkpoint, tmp_path)
    computed = first.embed_labels(LABELS, "photo")
    assert first.prompts_encoded == len(LABELS)
    second = load_tiny(tiny_checkpoint, tmp_path)
    loaded = second.embed_labels(LABELS, "photo")
    assert second.prompts_encoded == 0, "a fresh backbone with the same weights reads the labels from disk"
    assert torch.equal(loaded, computed) and loaded.dtype == torch.float32
    assert len(entry_files(tmp_path)) == len(LABELS)
    key = json.loads(next((tmp_path / EMBEDDINGS_FOLDER).glob("*/key.json")).read_text())
    assert key["model"] == TINY_MODEL and key["activation"] == "gelu" and key["precision"] == "cpu fp32"
    assert key["weights"].startswith("file sha256:") and key["templates"] == resolve_templates("photo").digest


def test_cached_embeddings_equal_a_fresh_computation(tiny_checkpoint, tmp_path):
    load_tiny(tiny_checkpoint, tmp_path).embed_labels(LABELS, "photo")
    loaded = load_tiny(tiny_checkpoint, tmp_path).embed_labels(LABELS, "photo")
    fresh = load_tiny(tiny_checkpoint, tmp_path).embed_labels(LABELS, "photo", cached=False)
    assert torch.equal(loaded, fresh)


def test_the_key_separates_weights_activation_and_templates(tiny_checkpoint, tmp_path):
    load_tiny(tiny_checkpoint, tmp_path).embed_labels(LABELS, "photo")
    copy = tmp_path / "copy" / "same-weights.pt"
    copy.parent.mkdir()
    shutil.copy(tiny_checkpoint, copy)
    same_content = load_tiny(copy, tmp_path)
    same_content.embed_labels(LABELS, "photo")
    assert same_content.prompts_encoded == 0, "a checkpoint is known by its content, not by its path"
    other_weights = tmp_path / "other.pt"
    torch.save(make_tiny_model(seed=1).state_dict(), other_weights)
    variants = [load_tiny(other_weights, tmp_path), load_tiny(tiny_checkpoint, tmp_path, activation="quickgelu")]
    for backbone in variants:
        backbone.embed_labels(LABELS, "photo")
        assert backbone.prompts_encoded == len(LABELS)
    other_templates = tmp_path / "templates.txt"
    other_templates.write_text("a drawing of a {}.\n")
    backbone = load_tiny(tiny_checkpoint, tmp_path)
    backbone.embed_labels(LABELS, other_templates)
    assert backbone.prompts_encoded == len(LABELS)


def test_random_weights_are_never_cached(tmp_path):
    backbone = load_backbone(TINY_MODEL, pretrained=None, device="cpu", text_cache=tmp_path)
    backbone.embed_labels(LABELS, "photo")
    assert not any(tmp_path.iterdir())


def test_text_cache_false_and_cached_false_leave_the_disk_alone(tiny_checkpoint, tmp_path):
    load_tiny(tiny_checkpoint, False).embed_labels(LABELS, "photo")
    load_tiny(tiny_checkpoint, tmp_path).embed_labels(LABELS, "photo", cached=False)
    assert not (tmp_path / EMBEDDINGS_FOLDER).exists()
    assert not (tmp_path / "default-cache").exists()


def test_the_default_folder_follows_the_environment(tiny_checkpoint, tmp_path, monkeypatch):
    assert cache_folder() == tmp_path / "default-cache"
    load_tiny(tiny_checkpoint, None).embed_labels(["cat"], "photo")
    assert len(entry_files(tmp_path / "default-cache")) == 1
    monkeypatch.delenv(CACHE_DIR_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder() == tmp_path / "xdg" / "wildseg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_folder() == tmp_path / "home" / ".cache" / "wildseg"


def damaged(content: bytes, damage: str) -> bytes:
    """An .npy entry's bytes spoilt in one way: not an array, cut short, empty, not a unit vector, not float32."""
    original = np.load(io.BytesIO(content))
    arrays = {"not unit norm": original * 3, "float64": original.astype(np.float64)}
    if damage in arrays:
        buffer = io.BytesIO()
        np.save(buffer, arrays[damage])
        return buffer.getvalue()
    return {"garbage": b"\x93NUMPY this is not an array", "truncated": content[:-40], "empty": b""}[damage]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not unit norm", "float64"])
def test_a_damaged_entry_is_recomputed(tiny_checkpoint, tmp_path, damage):
    computed = load_tiny(tiny_checkpoint, tmp_path).embed_labels(LABELS, "photo")
    entry = entry_files(tmp_path)[0]
    content = entry.read_bytes()
    entry.write_bytes(damaged(content, damage))
    backbone = load_tiny(tiny_checkpoint, tmp_path)
    assert torch.equal(backbone.embed_labels(LABELS, "photo"), computed)
    assert backbone.prompts_encoded == 1, "only the damaged label is embedded again"
    assert entry.read_bytes() == content, "and its entry is written anew"


def test_an_unwritable_cache_folder_only_warns_once(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache folder would be")
    backbone = load_tiny(tiny_checkpoint, blocker / "cache")
    with pytest.warns(WildsegWarning, match="cannot write the text-embedding cache .*WILDSEG_CACHE_DIR") as caught:
        embeddings = backbone.embed_labels(LABELS, "photo")
    assert len(caught) == 1
    assert torch.equal(embeddings, load_tiny(tiny_checkpoint, False).embed_labels(LABELS, "photo"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone.embed_labels(["another label"], "photo")


def test_concurrent_writers_of_one_entry_leave_a_valid_file(tmp_path):
    group = TextCache(tmp_path).group({"model": "test"})
    embedding = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(0)), dim=0)
    seen = []

    def write():
        for _ in range(40):
            group.store("cat", embedding)

    def read():
        for _ in range(200):
            seen.append(group.load("cat"))

    threads = [threading.Thread(target=write) for _ in range(4)] + [threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(each is None or torch.equal(each, embedding) for each in seen), "readers never see a partial file"
    assert torch.equal(group.load("cat"), embedding)
    assert {path.name for path in group.folder.iterdir()} == {"key.json", group.entry("cat").name}, "no leftovers"


def store_repeatedly(folder, embedding, times):
    """Write one entry again and again (run in another process)."""
    group = TextCache(folder).group({"model": "test"})
    for _ in range(times):
        group.store("cat", embedding)


def test_two_processes_writing_one_entry_leave_a_valid_file(tmp_path):
    embedding = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(0)), dim=0)
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=store_repeatedly, args=(tmp_path, embedding, 100)) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    group = TextCache(tmp_path).group({"model": "test"})
    assert torch.equal(group.load("cat"), embedding)
    assert {path.name for path in group.folder.iterdir()} == {"key.json", group.entry("cat").name}


def test_the_checkpoint_hash_is_reused_while_size_and_mtime_stay(tiny_checkpoint, tmp_path):
    cache = TextCache(tmp_path)
    real = cache.file_digest(tiny_checkpoint)
    record = next((tmp_path / "file-hashes").iterdir())
    known = json.loads(record.read_text())
    assert known["sha256"] == real and known["size"] == tiny_checkpoint.stat().st_size
    record.write_text(json.dumps({**known, "sha256": "f" * 64}))
    assert cache.file_digest(tiny_checkpoint) == "f" * 64, "the recorded hash is used without reading the file"
    stat = tiny_checkpoint.stat()
    os.utime(tiny_checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.file_digest(tiny_checkpoint) == real, "a new mtime makes it hash the file again"


def test_progress_counts_cached_labels_first_then_each_label(tiny_checkpoint, tmp_path):
    labels = [*LABELS, "tree", "cat"]
    load_tiny(tiny_checkpoint, tmp_path).embed_labels(labels[:2], "photo")
    reports = []
    load_tiny(tiny_checkpoint, tmp_path).embed_labels(labels, "photo", on_progress=lambda *args: reports.append(args))
    assert reports == [(2, 7), (3, 7), (4, 7), (5, 7), (6, 7), (7, 7)]
    reports.clear()
    load_tiny(tiny_checkpoint, tmp_path).embed_labels(labels, "photo", on_progress=lambda *args: reports.append(args))
    assert reports == [(7, 7)]


def test_builtin_template_sets_resolve_to_format_strings():
    imagenet = resolve_templates("imagenet80")
    assert imagenet.identity == "imagenet80" and len(imagenet.templates) == 80
    assert [template.format("cat") for template in imagenet.templates] == [
        template("cat") for template in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert resolve_templates(imagenet) is imagenet


def test_a_template_file_is_read_and_embedded_like_a_builtin_set(tiny_checkpoint, tmp_path):
    path = tmp_path / "my templates.txt"
    path.write_text("# my prompts\n\n  a photo of a {}.  \n# a drawing of a {}.\n")
    templates = resolve_templates(str(path))
    assert templates.templates == ("a photo of a {}.",)
    assert templates.identity == f"my templates.txt sha256:{templates.digest[:16]}"
    backbone = load_tiny(tiny_checkpoint, False)
    from_file = backbone.embed_labels(LABELS, path)
    assert torch.equal(from_file, backbone.embed_labels(LABELS, "photo"))
    assert torch.equal(from_file, backbone.embed_labels(LABELS, templates))
    assert (LABELS[0], templates.identity) in backbone._label_cache


@pytest.mark.parametrize(("content", "message"), [
    ("a photo of a {}.\n\na photo of a cat.\n", r"line 3 \('a photo of a cat.'\) has no \{\} where the label goes"),
    ("a {} next to a {}\n", r"line 1 .* has braces other than one \{\}: .* \{\{ and \}\}"),
    ("a {} in {the} wild\n", "line 1 .* has braces other than one"),
    ("# only a comment\n\n", r"has no templates \(only blank lines and # comments\)"),
    ("", "has no templates"),
])
def test_bad_template_files_are_one_line_errors_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "templates.txt"
    path.write_text(content)
    with raises_worded(f"--templates .*templates.txt {message}") as error:
        resolve_templates(path)
    assert "\n" not in as_command_line_says(error.value)


def test_template_file_errors_for_missing_and_non_utf8_files(tmp_path):
    with raises_worded("--templates nope.txt is neither a built-in template set "
                                           r"\(imagenet80, photo\) nor a file"):
        resolve_templates("nope.txt")
    path = tmp_path / "latin1.txt"
    path.write_bytes("une photo d'un {} à la plage\n".encode("latin-1"))
    with raises_worded("is not UTF-8 text"):
        resolve_templates(path)


def test_template_set_identity_changes_with_the_content(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n")
    first = resolve_templates(path)
    path.write_text("a photo of the {}.\n")
    assert resolve_templates(path).identity != first.identity
    assert isinstance(first, TemplateSet)
