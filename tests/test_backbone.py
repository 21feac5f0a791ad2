"""Loading weights from checkpoints and tags, clear errors, and prompt-ensemble text embeddings."""

import argparse
import logging
import time
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import TINY_MODEL, TINY_RESNET, as_command_line_says, make_tiny_model, raises_worded
from PIL import Image
from safetensors.torch import save_file

from wildseg import Segmenter
from wildseg.backbone import load_backbone
from wildseg.cache import CACHE_DIR_VARIABLE
from wildseg.cli import main
from wildseg.errors import WildsegError
from wildseg.templates import TEMPLATE_SETS

IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def isolated_text_cache(tmp_path, monkeypatch):
    """Label embeddings go to the test's folder, not to the user's cache."""
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "text-cache"))


def test_state_dict_checkpoint_loads_the_saved_weights(tiny_checkpoint, tiny_model):
    backbone = load_backbone(TINY_MODEL, checkpoint=tiny_checkpoint, device="cpu")
    with torch.no_grad():
        assert torch.equal(backbone.model.encode_image(IMAGES), tiny_model.encode_image(IMAGES))
    assert backbone.weights == str(tiny_checkpoint) and backbone.image_size == 64
    assert backbone.device.type == "cpu" and not backbone.half_precision


def test_safetensors_checkpoint_loads(tmp_path, tiny_model):
    path = tmp_path / "tiny.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in tiny_model.state_dict().items()}, path)
    backbone = load_backbone(TINY_MODEL, checkpoint=path, device="cpu")
    with torch.no_grad():
        assert torch.equal(backbone.model.encode_image(IMAGES), tiny_model.encode_image(IMAGES))


def save_openai_style_archive(path, model_name=TINY_MODEL):
    """An archive shaped like OpenAI's: a scripted CLIP with QuickGELU whose attention mask is not a buffer."""
    model = open_clip.create_model(model_name, force_quick_gelu=True).eval()
    mask = model.attn_mask
    del model._buffers["attn_mask"]
    model.attn_mask = mask
    torch.jit.save(torch.jit.script(model), path)
    return model


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_openai_jit_archive_loads(tmp_path):
    path = tmp_path / "tiny-jit.pt"
    model = save_openai_style_archive(path)
    backbone = load_backbone(TINY_MODEL, checkpoint=path, device="cpu")
    with torch.no_grad():
        difference = (backbone.model.encode_image(IMAGES) - model.encode_image(IMAGES)).abs().max()
    assert difference < 5e-3, "open_clip's OpenAI loader keeps the archive's weights up to fp16 rounding"
    assert backbone.activation == "quickgelu" and "OpenAI JIT archive" in backbone.activation_source


def test_text_embeddings_are_the_normalised_template_ensemble(tiny_checkpoint):
    backbone = load_backbone(TINY_MODEL, checkpoint=tiny_checkpoint, device="cpu")
    embeddings = backbone.embed_labels(["cat", "sofa", "cat"])
    templates = TEMPLATE_SETS["imagenet80"]()
    assert len(templates) == 80
    with torch.no_grad():
        for row, label in zip(embeddings, ["cat", "sofa", "cat"]):
            tokens = backbone.tokenizer([template(label) for template in templates])
            each = F.normalize(backbone.model.encode_text(tokens), dim=-1)
            expected = F.normalize(each.mean(0), dim=0)
            assert torch.allclose(row, expected, atol=1e-5)
    assert set(backbone._label_cache) == {("cat", "imagenet80"), ("sofa", "imagenet80")}
    single = backbone.embed_labels(["cat"], "photo")
    with torch.no_grad():
        direct = F.normalize(backbone.model.encode_text(backbone.tokenizer(["a photo of a cat."])), dim=-1)
    assert torch.allclose(single, direct, atol=1e-5)


def test_unknown_model_is_a_clear_error():
    with raises_worded("unknown model 'ViT-Q-99': run `wildseg models`"):
        load_backbone("ViT-Q-99", device="cpu")


def test_unknown_pretrained_tag_lists_the_known_ones():
    with raises_worded("no pretrained weights 'nope' .*openai"):
        load_backbone("ViT-B-16", pretrained="nope", device="cpu")


def process_state() -> tuple:
    """What the library must leave as it found it: logging's switch and root handlers, the warning filters."""
    return logging.root.manager.disable, list(logging.getLogger().handlers), list(warnings.filters)


def photo_file(folder) -> str:
    path = folder / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    return str(path)


def command_error(arguments: list, capfd) -> str:
    """The one line `wildseg segment` writes for `arguments`, with exit code 2 and nothing else said."""
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and result.stdout == "", result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("wildseg: error: "), result.stderr
    assert capfd.readouterr() == ("", ""), "nothing written past the command's own streams"
    return lines[0].removeprefix("wildseg: error: ")


def test_weights_that_cannot_be_downloaded_name_the_cause_and_the_fix(tmp_path, monkeypatch, capfd):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    before = process_state()
    with pytest.raises(WildsegError) as error:
        load_backbone("ViT-B-32", pretrained="openai", device="cpu", cache_dir=tmp_path)
    assert process_state() == before, "the library changes no logging or warning state of the process"
    message = as_command_line_says(error.value)
    assert message == (
        "could not get the 'openai' weights of ViT-B-32: they are not in the download cache, and HF_HUB_OFFLINE=1 "
        f"forbids downloading them (unset it); check that --cache-dir {tmp_path} holds them or pass --checkpoint "
        "FILE"), "offline on purpose: the network is not advised"
    capfd.readouterr()
    said = command_error(["segment", photo_file(tmp_path), "-l", "cat", "--model", "ViT-B-32", "--device", "cpu",
                          "--cache-dir", str(tmp_path), "-q"], capfd)
    assert said == message


def test_an_unreachable_hub_is_one_clean_line(tmp_path, unreachable_hub, capfd):
    """The hub's retries (logged twice each once open_clip's logging.info() has set up the root logger) and
    open_clip's ERROR line stay unsaid by the command; the error names the server, the cause and every fix."""
    started = time.monotonic()
    said = command_error(["segment", photo_file(tmp_path), "-l", "cat", "--model", "ViT-B-16", "--device", "cpu",
                          "--cache-dir", str(tmp_path), "-q"], capfd)
    assert time.monotonic() - started < 30
    assert said == (
        "could not get the 'openai' weights of ViT-B-16: 127.0.0.1:9 could not be reached and they are not in the "
        f"download cache; connect to the network, check that --cache-dir {tmp_path} holds them, or pass "
        "--checkpoint FILE")


def test_missing_checkpoint(tmp_path):
    with raises_worded("checkpoint not found: .*missing.pt"):
        load_backbone(TINY_MODEL, checkpoint=tmp_path / "missing.pt", device="cpu")


def pickled_namespace(tmp_path):
    """A training checkpoint: the state dict beside the run's argparse arguments."""
    path = tmp_path / "training.pt"
    torch.save({"state_dict": make_tiny_model().state_dict(), "args": argparse.Namespace(lr=1e-3)}, path)
    return path.read_bytes()


def png_bytes(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


@pytest.mark.parametrize(("content", "kind"), [
    (b"this is not a checkpoint", "it looks like text"),
    (b"", r"it is empty \(0 bytes\), maybe an interrupted download"),
    (png_bytes, "it is a PNG image"),
    (("éa" * 2000).encode(), "it looks like text"),
    (b"<!DOCTYPE html>\n<html><body>Hugging Face</body></html>",
     r"it is a web page \(HTML\), not the weights: download the file itself"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", "it is a Git LFS pointer, .*git lfs pull`"),
    (bytes(range(256)) * 4, "it is binary data PyTorch does not recognise, maybe a truncated download"),
    (pickled_namespace, r"it holds a pickled argparse.Namespace beside its tensors, which PyTorch does not load "
                        r"from files unchecked: save the state dict alone \(torch.save\(state_dict, 'weights.pt'\)\)"),
])
def test_a_file_that_is_not_weights_says_what_it_is(tmp_path, content, kind):
    path = tmp_path / "notes.pt"
    path.write_bytes(content(tmp_path) if callable(content) else content)
    expected = (f"^cannot read checkpoint .*notes.pt, it is not a weights file PyTorch can load: {kind}; "
                r"pass an open_clip state dict \(.pt, .bin, .safetensors\) or an OpenAI JIT archive$")
    with raises_worded(expected):
        load_backbone(TINY_MODEL, checkpoint=path, device="cpu")


def test_checkpoint_of_another_architecture(tiny_checkpoint):
    with pytest.raises(WildsegError) as error:
        load_backbone("ViT-B-32", checkpoint=tiny_checkpoint, device="cpu")
    assert as_command_line_says(error.value) == (
        f"checkpoint {tiny_checkpoint} does not fit --model ViT-B-32: it holds a ViT with 8-pixel patches, width 128, "
        f"3 layers and 64-pixel input ({TINY_MODEL} in open_clip's names): pass --model {TINY_MODEL}"
    )


def register_tiny_variant(monkeypatch, name, vision=None, text=None):
    """An open_clip config like the tiny ViT's with some vision or text settings changed, for this test only."""
    config = open_clip.get_model_config(TINY_MODEL)
    config["vision_cfg"].update(vision or {})
    config["text_cfg"].update(text or {})
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, config)


def test_the_architecture_is_read_from_the_tensors_and_named(tmp_path, monkeypatch):
    register_tiny_variant(monkeypatch, "tiny-p16", vision={"patch_size": 16})
    register_tiny_variant(monkeypatch, "tiny-p16-quickgelu", vision={"patch_size": 16})
    path = tmp_path / "tiny-p16.pt"
    torch.save(open_clip.create_model("tiny-p16").state_dict(), path)
    with pytest.raises(WildsegError) as error:
        load_backbone(TINY_MODEL, checkpoint=path, device="cpu")
    assert as_command_line_says(error.value) == (
        f"checkpoint {path} does not fit --model {TINY_MODEL}: it holds a ViT with 16-pixel patches, width 128, "
        "3 layers and 64-pixel input (tiny-p16 in open_clip's names): pass --model tiny-p16"
    )


def test_a_text_tower_of_another_shape_is_named(tiny_checkpoint, monkeypatch):
    register_tiny_variant(monkeypatch, "tiny-deep-text", text={"layers": 2})
    with raises_worded(f"does not fit --model tiny-deep-text: it holds a ViT with 8-pixel patches, "
                                           f".*, and a text tower unlike tiny-deep-text's .*pass --model {TINY_MODEL}"):
        load_backbone("tiny-deep-text", checkpoint=tiny_checkpoint, device="cpu")


def test_an_architecture_no_config_has_is_described(tmp_path):
    state_dict = {name: tensor for name, tensor in make_tiny_model().state_dict().items()
                  if not name.startswith("visual.transformer.resblocks.2.")}
    path = tmp_path / "two-layers.pt"
    torch.save(state_dict, path)
    with raises_worded("it holds a ViT with 8-pixel patches, width 128, 2 layers and 64-pixel "
                                           "input, which no open_clip model config has: pass the --model of the"):
        load_backbone(TINY_MODEL, checkpoint=path, device="cpu")


def test_cuda_requested_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with raises_worded("PyTorch sees no CUDA GPU"):
        load_backbone(TINY_MODEL, pretrained=None, device="cuda")


def test_random_weights_when_no_pretrained():
    backbone = load_backbone(TINY_MODEL, pretrained=None, device="cpu")
    assert backbone.weights == "random"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_jit_archive_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "tiny-jit.pt"
    save_openai_style_archive(path)
    with raises_worded(f"does not fit --model ViT-B-16: it holds a ViT with 8-pixel patches.*"
                                           f"pass --model {TINY_MODEL}$"):
        load_backbone("ViT-B-16", checkpoint=path, device="cpu")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_jit_archive_of_a_resnet_is_refused_by_what_relevance_needs(tmp_path):
    path = tmp_path / "tiny-resnet-jit.pt"
    save_openai_style_archive(path, TINY_RESNET)
    with raises_worded(f"model {TINY_RESNET} is not a ViT of open_clip's own with class-token output"):
        Segmenter(load_backbone(TINY_RESNET, checkpoint=path, device="cpu"))


def test_checkpoint_folder_is_named_as_such(tmp_path):
    with raises_worded("is a folder: pass the weights file inside it"):
        load_backbone(TINY_MODEL, checkpoint=tmp_path, device="cpu")
