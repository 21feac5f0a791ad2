"""Per-label relevance maps from CLIP's vision transformer (Chefer, Gur & Wolf, ICCV 2021).

Chefer et al.'s rule for a score s (here the CLIP logit of the image and one label), over the blocks b from
a start block to the last, with A_b the block's attention probabilities (heads x T x T) and
G_b = ds / dA_b:

    R = I_T;   R <- R + mean_heads( clamp(G_b * A_b, min=0) ) @ R

The map is the class token's row of R over the patch tokens, laid out on the patch grid.

open_clip's blocks call torch's MultiheadAttention without returning the probabilities, so
`forward_with_attention` recomputes each block from its own parameters with the attention written out.
"""

import math

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from .errors import WildsegError
from .timing import NoStageTimes

DEFAULT_START_BLOCK = -1
"""Relevance from the last block only, as in Chefer et al.'s CLIP demo; 0 accumulates over every block."""


def check_vision_tower(visual: torch.nn.Module, model_name: str) -> None:
    """Relevance maps need an open_clip ViT whose blocks use torch attention and whose output is the class token."""
    supported = (
        isinstance(visual, VisionTransformer)
        and visual.attn_pool is None
        and visual.pool_type == "tok"
        and all(
            type(block) is ResidualAttentionBlock and isinstance(block.attn, torch.nn.MultiheadAttention)
            for block in visual.transformer.resblocks
        )
    )
    if not supported:
        raise WildsegError(
            f"model {model_name} is not a ViT with class-token output: relevance maps need one such as ViT-B-16"
        )


def resolve_start_block(start_block: int, depth: int) -> int:
    """Turn a Python-style block index (negative counts from the end) into a non-negative one."""
    if not -depth <= start_block < depth:
        raise WildsegError(f"start block {start_block} is outside the model's {depth} blocks: use -{depth}..{depth - 1}")
    return start_block % depth


def block_with_attention(block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm transformer block (batch-first tokens) that also returns its attention probabilities.

    Attention(x) = softmax(q k^T / sqrt(d_head)) v per head (Vaswani et al. 2017), with q, k, v and the output
    projection taken from the block's MultiheadAttention parameters.
    """
    attention = block.attn
    batch, tokens, width = x.shape
    heads = attention.num_heads
    head_width = width // heads
    query, key, value = F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    query, key, value = (t.reshape(batch, tokens, heads, head_width).transpose(1, 2) for t in (query, key, value))
    probabilities = torch.softmax(query @ key.transpose(-2, -1) / math.sqrt(head_width), dim=-1)
    mixed = (probabilities @ value).transpose(1, 2).reshape(batch, tokens, width)
    x = x + block.ls_1(attention.out_proj(mixed))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, probabilities


def forward_with_attention(
    visual: VisionTransformer, images: torch.Tensor, keep_from: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image embeddings (batch x dim, before normalisation) and the attention of blocks `keep_from` onwards.

    Blocks before `keep_from` run without building a graph; from there on, the attention probabilities are
    part of the autograd graph so that the embedding can be differentiated with respect to them.
    """
    blocks = visual.transformer.resblocks
    with torch.no_grad():
        x = visual._embeds(images)
        for block in blocks[:keep_from]:
            x, _ = block_with_attention(block, x)
    x = x.detach().requires_grad_(torch.is_grad_enabled())
    attentions = []
    for block in blocks[keep_from:]:
        x, probabilities = block_with_attention(block, x)
        attentions.append(probabilities)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, attentions


def relevance_maps(
    model: torch.nn.Module,
    images: torch.Tensor,
    text_embeddings: torch.Tensor,
    start_block: int = DEFAULT_START_BLOCK,
    stages=NoStageTimes(),
) -> torch.Tensor:
    """Chefer et al.'s relevance of every label for every image: (images x labels x grid x grid), fp32.

    One forward pass serves all labels; the gradients of all label logits come from one batched backward
    (`is_grads_batched`), each label's gradient selected by a one-hot output gradient. `stages` times the
    forward and the backward (with the relevance rule).
    """
    visual = model.visual
    first = resolve_start_block(start_block, len(visual.transformer.resblocks))
    with torch.enable_grad():
        with stages.stage("forward"):
            embeddings, attentions = forward_with_attention(visual, images, keep_from=first)
            logits = model.logit_scale.exp() * F.normalize(embeddings, dim=-1) @ text_embeddings.to(embeddings.dtype).T
        with stages.stage("backward"):
            batch, labels = logits.shape
            one_hot = torch.eye(labels, dtype=logits.dtype, device=logits.device)[:, None, :]
            one_hot = one_hot.expand(labels, batch, labels)
            gradients = torch.autograd.grad(logits, attentions, grad_outputs=one_hot, is_grads_batched=True)
            return _accumulate(attentions, gradients, images.device, labels, batch)


def _accumulate(attentions, gradients, device: torch.device, labels: int, batch: int) -> torch.Tensor:
    """The relevance rule over the kept blocks, in fp32, laid out as images x labels x grid x grid."""
    tokens = attentions[0].shape[-1]
    with torch.autocast(device.type, enabled=False):
        relevance = torch.eye(tokens, device=device).expand(labels, batch, tokens, tokens)
        for attention, gradient in zip(attentions, gradients):
            weighted = (gradient.float() * attention.detach().float()).clamp(min=0).mean(dim=2)
            relevance = relevance + weighted @ relevance
    grid = math.isqrt(tokens - 1)
    return relevance[..., 0, 1:].reshape(labels, batch, grid, grid).transpose(0, 1).contiguous()
