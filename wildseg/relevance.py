"""Per-label relevance maps from CLIP's vision transformer (Chefer, Gur & Wolf, ICCV 2021).

Chefer et al.'s rule for a score s (here the CLIP logit of the image and one label), over the blocks b from
a start block to the last, with A_b the block's attention probabilities (heads x T x T) and
G_b = ds / dA_b:

    R = I_T;   R <- R + mean_heads( clamp(G_b * A_b, min=0) ) @ R

The map is the class token's row of R over the patch tokens, laid out on the patch grid.

open_clip's blocks call torch's MultiheadAttention without returning the probabilities, so the blocks whose
attention is differentiated are recomputed from their own parameters with the attention written out; the
blocks before them run as open_clip runs them (fused attention). For the default, the last block alone, only
the class token's row of that block is computed (`forward_with_class_attention`).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from .choices import DEFAULT_START_BLOCK
from .errors import WildsegError
from .timing import NoStageTimes



def check_vision_tower(visual: torch.nn.Module, model_name: str) -> None:
    """Relevance maps need an open_clip ViT whose blocks use batch-first torch attention and whose output is the
    class token."""
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
    if not supported:
        raise WildsegError(
            f"model {model_name} is not a ViT with class-token output: relevance maps need one such as ViT-B-16"
        )


def vision_config_problem(config: dict) -> Optional[str]:
    """Why an open_clip model config's vision tower gives no relevance or dense maps, read from the config without
    building the model (None when it does): what `check_vision_tower` requires, a ViT of open_clip's own whose
    output is the class token."""
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


def resolve_start_block(start_block: int, depth: int) -> int:
    """Turn a Python-style block index (negative counts from the end) into a non-negative one."""
    if not -depth <= start_block < depth:
        raise WildsegError(
            f"start block {start_block} is outside the model's {depth} blocks: use -{depth}..{depth - 1}"
        )
    return start_block % depth


def head_projections(block: ResidualAttentionBlock, normed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-head queries, keys and values (batch x heads x tokens x head width) of batch-first tokens already
    through the block's ln_1, from its MultiheadAttention's in-projection."""
    attention = block.attn
    batch, tokens, width = normed.shape
    projected = F.linear(normed, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    return tuple(t.reshape(batch, tokens, attention.num_heads, -1).transpose(1, 2) for t in projected)


def attention_output(block: ResidualAttentionBlock, weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The block's attention output (batch x tokens x width): weights @ value per head, the heads concatenated
    and out-projected."""
    mixed = weights @ value
    batch, heads, tokens, head_width = mixed.shape
    return block.attn.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, heads * head_width))


def dot_product_weights(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Attention probabilities softmax(q k^T / sqrt(d_head)) (Vaswani et al. 2017)."""
    return torch.softmax(query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1]), dim=-1)


def feed_forward(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's second residual branch: x + MLP(ln_2(x))."""
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def block_with_attention(block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm transformer block (batch-first tokens) that also returns its attention probabilities,
    with q, k, v and the output projection taken from the block's MultiheadAttention parameters."""
    query, key, value = head_projections(block, block.ln_1(x))
    probabilities = dot_product_weights(query, key)
    return feed_forward(block, x + block.ls_1(attention_output(block, probabilities, value))), probabilities


def forward_with_attention(
    visual: VisionTransformer, images: torch.Tensor, keep_from: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image embeddings (batch x dim, before normalisation) and the attention of blocks `keep_from` onwards.

    Blocks before `keep_from` run as open_clip runs them, without building a graph; from there on, the
    attention probabilities are part of the autograd graph so that the embedding can be differentiated with
    respect to them.
    """
    blocks = visual.transformer.resblocks
    x = _tokens_before(visual, images, keep_from)
    attentions = []
    for block in blocks[keep_from:]:
        x, probabilities = block_with_attention(block, x)
        attentions.append(probabilities)
    return _embedding(visual, x), attentions


def forward_with_class_attention(visual: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings (batch x dim, before normalisation) and the last block's attention row of the class
    token (batch x heads x 1 x tokens), in the autograd graph.

    The embedding is the class token's output, and in the last block only the class token's own attention
    row reaches it; so the last block's attention and feed-forward are computed for the class token alone (its
    query against every key and value), which gives the same embedding and a graph of one token.
    """
    last = visual.transformer.resblocks[-1]
    x = _tokens_before(visual, images, len(visual.transformer.resblocks) - 1)
    query, key, value = head_projections(last, last.ln_1(x))
    probabilities = dot_product_weights(query[:, :, :1], key)
    class_token = feed_forward(last, x[:, :1] + last.ls_1(attention_output(last, probabilities, value)))
    return _embedding(visual, class_token), probabilities


def _tokens_before(visual: VisionTransformer, images: torch.Tensor, block: int) -> torch.Tensor:
    """The tokens entering block `block`, computed without a graph and detached as a leaf that may need grad."""
    with torch.no_grad():
        x = visual._embeds(images)
        for earlier in visual.transformer.resblocks[:block]:
            x = earlier(x)
    return x.detach().requires_grad_(torch.is_grad_enabled())


def _embedding(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The image embedding from the last block's output tokens (class token first): open_clip's pooling,
    final norm and projection."""
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def relevance_maps(
    model: torch.nn.Module,
    images: torch.Tensor,
    text_embeddings: torch.Tensor,
    start_block: int = DEFAULT_START_BLOCK,
    stages=NoStageTimes(),
) -> torch.Tensor:
    """Chefer et al.'s relevance of every label for every image: (images x labels x grid x grid), fp32.

    One forward pass serves all labels; the gradients of all label logits come from one batched backward
    (`is_grads_batched`), each label's gradient selected by a one-hot output gradient. From the last block
    alone (the default), R = I + mean_heads(clamp(G A, 0)), whose class row needs only the class token's
    attention row: the forward and backward of `forward_with_class_attention` suffice. `stages` times the
    forward and the backward (with the relevance rule).
    """
    visual = model.visual
    depth = len(visual.transformer.resblocks)
    first = resolve_start_block(start_block, depth)
    with torch.enable_grad():
        with stages.stage("forward"):
            if first == depth - 1:
                embeddings, class_attention = forward_with_class_attention(visual, images)
                attentions = [class_attention]
            else:
                embeddings, attentions = forward_with_attention(visual, images, keep_from=first)
            logits = model.logit_scale.exp() * F.normalize(embeddings, dim=-1) @ text_embeddings.to(embeddings.dtype).T
        with stages.stage("backward"):
            batch, labels = logits.shape
            one_hot = torch.eye(labels, dtype=logits.dtype, device=logits.device)[:, None, :]
            one_hot = one_hot.expand(labels, batch, labels)
            gradients = torch.autograd.grad(logits, attentions, grad_outputs=one_hot, is_grads_batched=True)
            if first == depth - 1:
                return _class_row(class_attention, gradients[0], images.device)
            return _accumulate(attentions, gradients, images.device, labels, batch)


def _class_row(attention: torch.Tensor, gradient: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Chefer et al.'s rule for the last block alone, class row over the patches, from the class attention row
    (batch x heads x 1 x tokens) and its label-batched gradient: images x labels x grid x grid in fp32."""
    with torch.autocast(device.type, enabled=False):
        return _patch_grid(_weighted_attention(attention, gradient)[..., 0, :])


def _accumulate(attentions, gradients, device: torch.device, labels: int, batch: int) -> torch.Tensor:
    """The relevance rule over the kept blocks, in fp32, laid out as images x labels x grid x grid."""
    tokens = attentions[0].shape[-1]
    with torch.autocast(device.type, enabled=False):
        relevance = torch.eye(tokens, device=device).expand(labels, batch, tokens, tokens)
        for attention, gradient in zip(attentions, gradients):
            relevance = relevance + _weighted_attention(attention, gradient) @ relevance
    return _patch_grid(relevance[..., 0, :])


def _weighted_attention(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Chefer et al. (2021), eq. 5: mean over heads of clamp(grad A * A, 0), in fp32 (labels first, as the
    gradient is batched over labels)."""
    return (gradient.float() * attention.detach().float()).clamp(min=0).mean(dim=2)


def _patch_grid(class_row: torch.Tensor) -> torch.Tensor:
    """The class token's row (labels x images x tokens) over the patches, as images x labels x grid x grid."""
    labels, batch, tokens = class_row.shape
    grid = math.isqrt(tokens - 1)
    return class_row[..., 1:].reshape(labels, batch, grid, grid).transpose(0, 1).contiguous()
