"""Loading weights from checkpoints and tags, clear errors, and prompt-ensemble text embeddings."""

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, TINY_RESNET
from safetensors.torch import save_file

from wildseg import Segmenter
from wildseg.backbone import TEMPLATE_SETS, load_backbone
from wildseg.errors import WildsegError

IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


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
    templates = TEMPLATE_SETS["imagenet80"]
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
    with pytest.raises(WildsegError, match="unknown model 'ViT-Q-99': run `wildseg models`"):
        load_backbone("ViT-Q-99", device="cpu")


def test_unknown_pretrained_tag_lists_the_known_ones():
    with pytest.raises(WildsegError, match="no pretrained weights 'nope' .*openai"):
        load_backbone("ViT-B-16", pretrained="nope", device="cpu")


def test_weights_that_cannot_be_downloaded_name_the_cause_and_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WildsegError) as error:
        load_backbone("ViT-B-32", pretrained="openai", device="cpu",
                      cache_dir=tmp_path)
    message = str(error.value)
    assert "could not get the 'openai' weights of ViT-B-32" in message
    assert str(tmp_path) in message and "--checkpoint" in message and "\n" not in message


def test_missing_checkpoint(tmp_path):
    with pytest.raises(WildsegError, match="checkpoint not found: .*missing.pt"):
        load_backbone(TINY_MODEL, checkpoint=tmp_path / "missing.pt", device="cpu")


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WildsegError, match="cannot read checkpoint .*corrupt.pt"):
        load_backbone(TINY_MODEL, checkpoint=path, device="cpu")


def test_checkpoint_of_another_architecture(tiny_checkpoint):
    with pytest.raises(WildsegError, match="does not fit model ViT-B-32 .*: pass the --model it was saved from"):
        load_backbone("ViT-B-32", checkpoint=tiny_checkpoint, device="cpu")


def test_cuda_requested_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WildsegError, match="PyTorch sees no CUDA GPU"):
        load_backbone(TINY_MODEL, pretrained=None, device="cuda")


def test_random_weights_when_no_pretrained():
    backbone = load_backbone(TINY_MODEL, pretrained=None, device="cpu")
    assert backbone.weights == "random"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_jit_archive_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "tiny-jit.pt"
    save_openai_style_archive(path)
    with pytest.raises(WildsegError, match="does not fit model ViT-B-16 .*vision tower.*pass the --model"):
        load_backbone("ViT-B-16", checkpoint=path, device="cpu")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_jit_archive_of_a_resnet_is_refused_by_what_relevance_needs(tmp_path):
    path = tmp_path / "tiny-resnet-jit.pt"
    save_openai_style_archive(path, TINY_RESNET)
    with pytest.raises(WildsegError, match=f"model {TINY_RESNET} is not a ViT with class-token output"):
        Segmenter(model=TINY_RESNET, checkpoint=path, device="cpu")


def test_checkpoint_folder_is_named_as_such(tmp_path):
    with pytest.raises(WildsegError, match="is a folder: pass the weights file inside it"):
        load_backbone(TINY_MODEL, checkpoint=tmp_path, device="cpu")
