"""Everything wildseg reads or runs inside open_clip's models beyond open_clip's public functions.

This is the one module to re-check at each open_clip release (written against open_clip_torch 3.x, which
pyproject caps below 4): the private helpers of its VisionTransformer (`_embeds`, `_pool`) and of its hub
downloads (`_get_safe_alternatives`), the attributes of its
ResidualAttentionBlock (`ln_1`, `attn.in_proj_weight`, `ls_1`, `mlp`, ...), its state-dict helpers and its
config classes. Methods (`wildseg.methods`) see a ViT only through `ClipTower`.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, build_model_from_openai_state_dict
from open_clip.pretrained import _get_safe_alternatives
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer

__all__ = ["ClipTower", "build_model_from_openai_state_dict", "config_towers", "load_state_dict",
           "safetensors_alternatives", "set_activation", "vision_config_problem", "vision_tower_problem"]


def safetensors_alternatives(filename: str) -> list[str]:
    """The names under which open_clip looks for a hub weights file in safetensors form before `filename`."""
    return list(_get_safe_alternatives(filename))


def set_activation(model: torch.nn.Module, activation: str) -> None:
    """Give every transformer MLP of both towers the activation `gelu` (exact) or `quickgelu` (Radford et al.
    2021: x * sigmoid(1.702 x)); neither has parameters, so the weights are untouched.

    Args:
        model: an open_clip CLIP model.
        activation: `gelu` or `quickgelu`.
    """
    layer = QuickGELU if activation == "quickgelu" else torch.nn.GELU
    for module in model.modules():
        if isinstance(module, ResidualAttentionBlock):
            module.mlp.gelu = layer()


def config_towers(config: dict) -> Optional[tuple[CLIPVisionCfg, CLIPTextCfg]]:
    """The vision and text tower configs of an open_clip model config, or None when open_clip's config classes do
    not take its entries."""
    try:
        return CLIPVisionCfg(**config.get("vision_cfg", {})), CLIPTextCfg(**config.get("text_cfg", {}))
    except TypeError:
        return None


def vision_tower_problem(visual: torch.nn.Module) -> Optional[str]:
    """Why a built image tower gives no relevance or dense maps (None when it does): they need an open_clip ViT
    whose blocks use batch-first torch attention and whose output is the class token."""
    supported = (
        isinstance(visual, VisionTransformer)
        and visual.attn_pool is None
        and visual.pool_type == "tok"
        and all(
            type(block) is ResidualAttentionBlock
            and isinstance(block.attn, torch.nn.MultiheadAttention)
            and block.attn.batch_first
            for block in visual.transformer.resblocks
        )
    )
    return None if supported else "not a ViT of open_clip's own with class-token output"


def vision_config_problem(config: dict) -> Optional[str]:
    """Why an open_clip model config's vision tower gives no relevance or dense maps, read from the config without
    building the model (None when it does): what `vision_tower_problem` requires."""
    vision = config.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        return f"timm vision tower ({vision['timm_model_name']})"
    if not isinstance(vision.get("layers"), int):
        return "ResNet vision tower"
    if vision.get("attentional_pool"):
        return "attentional pooling (CoCa)"
    if vision.get("pool_type", "tok") != "tok":
        return f"{vision['pool_type']} pooling instead of the class token"
    return None


def dot_product_weights(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Attention probabilities softmax(q k^T / sqrt(d_head)) (Vaswani et al. 2017).

    Args:
        query, key: per-head tokens (batch x heads x tokens x head width).

    Returns:
        batch x heads x query tokens x key tokens.
    """
    return torch.softmax(query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1]), dim=-1)


class ClipTower:
    """An open_clip ViT image tower (with the model's logit scale), as segmentation methods use it: its blocks by
    index, the attention of a block written out, and the projections into the joint image-text space."""

    def __init__(self, model: torch.nn.Module):
        self.visual: VisionTransformer = model.visual
        self.logit_scale: torch.Tensor = model.logit_scale

    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The transformer blocks (of a tower `vision_tower_problem` accepts)."""
        return self.visual.transformer.resblocks

    @property
    def depth(self) -> int:
        """The number of transformer blocks."""
        return len(self.blocks)

    @property
    def patch_size(self) -> int:
        """Pixels per patch side."""
        return self.visual.patch_size[0]

    def tokens_entering(self, images: torch.Tensor, block: int) -> torch.Tensor:
        """The tokens entering block `block` (batch x 1 + patches x width) of model-sized images, computed as
        open_clip computes them, without a graph, and detached as a leaf that may need grad."""
        with torch.no_grad():
            x = self.visual._embeds(images)
            for earlier in self.blocks[:block]:
                x = earlier(x)
        return x.detach().requires_grad_(torch.is_grad_enabled())

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The image embedding (batch x dim, before normalisation) from the last block's output tokens, class token
        first: open_clip's pooling, final norm and projection."""
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def interpolated_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The positional embedding (1 + rows * columns, width) for a patch grid of another size: the class token's
        entry kept, the patch entries resized bicubically on their native square grid as the official NACLIP,
        SCLIP and ClearCLIP code does (after DINO): scale factor (g + 0.1) / native per axis, which floors to g
        patches, with sample positions following that factor (align_corners=False, recompute_scale_factor=False)."""
        embedding = self.visual.positional_embedding
        native = math.isqrt(embedding.shape[0] - 1)
        if grid == (native, native):
            return embedding
        patches = embedding[1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
        scale = ((grid[0] + 0.1) / native, (grid[1] + 0.1) / native)
        resized = F.interpolate(patches.float(), scale_factor=scale, mode="bicubic", align_corners=False,
                                recompute_scale_factor=False)
        return torch.cat([embedding[:1], resized[0].flatten(1).T.to(embedding.dtype)])

    def embed_windows(self, windows: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens entering the first block (batch x 1 + patches x width) for windows of any size, with
        `interpolated_positions`, and the windows' patch grid (rows, columns)."""
        visual = self.visual
        patches = visual.conv1(windows)
        grid = tuple(patches.shape[-2:])
        tokens = patches.flatten(2).transpose(1, 2)
        class_token = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([class_token, tokens], dim=1) + self.interpolated_positions(grid).to(tokens.dtype)
        return visual.ln_pre(tokens), grid

    def run_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Block `block` as open_clip runs it (fused attention)."""
        return self.blocks[block](x)

    def head_projections(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries, keys and values (batch x heads x tokens x head width) of batch-first tokens `x`
        entering block `block` (through its ln_1 and its MultiheadAttention's in-projection)."""
        layer = self.blocks[block]
        normed = layer.ln_1(x)
        batch, tokens, _ = normed.shape
        projected = F.linear(normed, layer.attn.in_proj_weight, layer.attn.in_proj_bias).chunk(3, dim=-1)
        return tuple(t.reshape(batch, tokens, layer.attn.num_heads, -1).transpose(1, 2) for t in projected)

    def attention_output(self, block: int, weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Block `block`'s attention branch (batch x tokens x width) for attention `weights` over `value`: weights @
        value per head, the heads concatenated, out-projected and layer-scaled (ls_1)."""
        layer = self.blocks[block]
        mixed = weights @ value
        batch, heads, tokens, head_width = mixed.shape
        return layer.ls_1(layer.attn.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, heads * head_width)))

    def feed_forward(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Block `block`'s second residual branch: x + ls_2(MLP(ln_2(x)))."""
        layer = self.blocks[block]
        return x + layer.ls_2(layer.mlp(layer.ln_2(x)))

    def block_with_attention(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `block` (pre-norm, batch-first tokens) with its attention written out, and its attention
        probabilities, which stay in the autograd graph."""
        query, key, value = self.head_projections(block, x)
        probabilities = dot_product_weights(query, key)
        return self.feed_forward(block, x + self.attention_output(block, probabilities, value)), probabilities

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens of the last block's output `x` (batch x 1 + patches x width) after ln_post and the visual
        projection, in the joint space (batch x patches x dim); the class token is dropped."""
        return self.into_joint_space(x[:, 1:])

    def into_joint_space(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (... x width) through ln_post and the visual projection (... x dim)."""
        tokens = self.visual.ln_post(tokens)
        return tokens @ self.visual.proj if self.visual.proj is not None else tokens
