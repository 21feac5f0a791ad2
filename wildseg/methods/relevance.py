"""Per-label relevance maps from CLIP's vision transformer (Chefer, Gur & Wolf, "Generic Attention-model
Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021), the map of Zabari &
Hoshen's method (arXiv 2112.03185).

Chefer et al.'s rule (Eqs. 5-6) for a score s (here the CLIP logit of the image and one label), over the blocks b
from a start block to the last, with A_b the block's attention probabilities (heads x T x T) and G_b = ds / dA_b:

    R = I_T;   R <- R + mean_heads( clamp(G_b * A_b, min=0) ) @ R

The map is the class token's row of R over the patch tokens, laid out on the patch grid.

open_clip's blocks call torch's MultiheadAttention without returning the probabilities, so the blocks whose
attention is differentiated are recomputed from their own parameters with the attention written out
(`ClipTower.block_with_attention`); the blocks before them run as open_clip runs them. For the default, the last
block alone, only the class token's row of that block is computed (`forward_with_class_attention`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbone.clip_internals import ClipTower, dot_product_weights
from ..choices import DEFAULT_START_BLOCK
from ..errors import WildsegError, setting
from ..timing import NoStageTimes
from .base import Method


GRADIENT_SCALE = 2.0**8
"""In fp16, the output gradients are multiplied by this power of two and the attention gradients divided by it in
fp32 (loss scaling, Micikevicius et al., ICLR 2018): ViT-B/16's smallest attention gradients (about 1e-5) are
subnormal in fp16 and lose bits, its largest (about 0.2, 7 with the tiny oracle model) stay far below fp16's 65504.
A scaled backward that overflows is redone unscaled."""


def resolve_start_block(start_block: int, depth: int) -> int:
    """A Python-style block index (negative counts from the end) as a non-negative one, or a one-line error."""
    if not -depth <= start_block < depth:
        raise WildsegError(f"{setting('start_block')} {start_block} is outside the model's {depth} blocks: use "
                           f"-{depth}..{depth - 1}")
    return start_block % depth


def forward_with_attention(tower: ClipTower, images: torch.Tensor, keep_from: int = 0
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image embeddings (batch x dim, before normalisation) and the attention of blocks `keep_from` onwards.

    Blocks before `keep_from` run as open_clip runs them, without building a graph; from there on, the attention
    probabilities are part of the autograd graph so that the embedding can be differentiated with respect to them.
    """
    x = tower.tokens_entering(images, keep_from)
    attentions = []
    for block in range(keep_from, tower.depth):
        x, probabilities = tower.block_with_attention(block, x)
        attentions.append(probabilities)
    return tower.image_embedding(x), attentions


def forward_with_class_attention(tower: ClipTower, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings (batch x dim, before normalisation) and the last block's attention row of the class token
    (batch x heads x 1 x tokens), in the autograd graph.

    The embedding is the class token's output, and in the last block only the class token's own attention row
    reaches it; so the last block's attention and feed-forward are computed for the class token alone (its query
    against every key and value), which gives the same embedding and a graph of one token.
    """
    last = tower.depth - 1
    x = tower.tokens_entering(images, last)
    query, key, value = tower.head_projections(last, x)
    probabilities = dot_product_weights(query[:, :, :1], key)
    class_token = tower.feed_forward(last, x[:, :1] + tower.attention_output(last, probabilities, value))
    return tower.image_embedding(class_token), probabilities


def relevance_maps(tower: ClipTower, images: torch.Tensor, text_embeddings: torch.Tensor,
                   start_block: int = DEFAULT_START_BLOCK, stages=NoStageTimes()) -> torch.Tensor:
    """Chefer et al.'s relevance of every label for every image.

    One forward pass serves all labels; the gradients of all label logits come from one batched backward
    (`is_grads_batched`), each label's gradient selected by a one-hot output gradient. From the last block alone
    (the default), R = I + mean_heads(clamp(G A, 0)), whose class row needs only the class token's attention row:
    the forward and backward of `forward_with_class_attention` suffice.

    Args:
        tower: the model's image tower (with its logit scale).
        images: normalised model-sized images (batch x 3 x size x size).
        text_embeddings: unit-norm label embeddings (labels x dim).
        start_block: the first block whose attention enters the rule (negative counts from the end).
        stages: times the forward and the backward (with the relevance rule).

    Returns:
        images x labels x grid x grid, fp32.
    """
    first = resolve_start_block(start_block, tower.depth)
    with torch.enable_grad():
        with stages.stage("forward"):
            if first == tower.depth - 1:
                embeddings, class_attention = forward_with_class_attention(tower, images)
                attentions = [class_attention]
            else:
                embeddings, attentions = forward_with_attention(tower, images, keep_from=first)
            logits = (tower.logit_scale.exp() * F.normalize(embeddings, dim=-1)
                      @ text_embeddings.to(embeddings.dtype).T)
        with stages.stage("backward"):
            gradients, scale = attention_gradients(logits, attentions)
            if first == tower.depth - 1:
                return class_row(class_attention, gradients[0], images.device, scale)
            return accumulated_relevance(attentions, gradients, images.device, scale)


def attention_gradients(logits: torch.Tensor, attentions: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], float]:
    """The gradients of every label's logit with respect to the attentions, batched over labels (labels first), and
    the factor they carry: `GRADIENT_SCALE` for fp16 attentions, unless that overflows (then 1), else 1."""
    batch, labels = logits.shape
    one_hot = torch.eye(labels, dtype=logits.dtype, device=logits.device)[:, None, :].expand(labels, batch, labels)
    if attentions[0].dtype == torch.float16:
        gradients = torch.autograd.grad(logits, attentions, grad_outputs=one_hot * GRADIENT_SCALE,
                                        is_grads_batched=True, retain_graph=True)
        if all(bool(torch.isfinite(gradient).all()) for gradient in gradients):
            return gradients, GRADIENT_SCALE
    return torch.autograd.grad(logits, attentions, grad_outputs=one_hot, is_grads_batched=True), 1.0


def class_row(attention: torch.Tensor, gradient: torch.Tensor, device: torch.device, scale: float
              ) -> torch.Tensor:
    """Chefer et al.'s rule for the last block alone, class row over the patches, from the class attention row
    (batch x heads x 1 x tokens) and its label-batched gradient carrying the factor `scale`: images x labels x grid
    x grid in fp32."""
    with torch.autocast(device.type, enabled=False):
        return patch_grid(weighted_attention(attention, gradient, scale)[..., 0, :])


def accumulated_relevance(attentions, gradients, device: torch.device, scale: float) -> torch.Tensor:
    """The relevance rule over the kept blocks from their gradients carrying the factor `scale`, in fp32, laid out
    as images x labels x grid x grid."""
    labels, batch = gradients[0].shape[:2]
    tokens = attentions[0].shape[-1]
    with torch.autocast(device.type, enabled=False):
        relevance = torch.eye(tokens, device=device).expand(labels, batch, tokens, tokens)
        for attention, gradient in zip(attentions, gradients):
            relevance = relevance + weighted_attention(attention, gradient, scale) @ relevance
    return patch_grid(relevance[..., 0, :])


def weighted_attention(attention: torch.Tensor, gradient: torch.Tensor, scale: float) -> torch.Tensor:
    """Chefer et al. (2021), Eq. 5: mean over heads of clamp(grad A * A, 0), in fp32 (labels first, as the gradient
    is batched over labels), the gradient divided by the factor `scale` it carries."""
    return (gradient.float() / scale * attention.detach().float()).clamp(min=0).mean(dim=2)


def patch_grid(class_row: torch.Tensor) -> torch.Tensor:
    """The class token's row (labels x images x tokens) over the patches, as images x labels x grid x grid."""
    labels, batch, tokens = class_row.shape
    grid = math.isqrt(tokens - 1)
    return class_row[..., 1:].reshape(labels, batch, grid, grid).transpose(0, 1).contiguous()


@dataclass(frozen=True)
class RelevanceMethod(Method):
    """Zabari & Hoshen's map: Chefer et al.'s relevance of each label, from `start_block` on."""

    start_block: int = DEFAULT_START_BLOCK
    name = "relevance"
    family = "relevance"

    def check(self, tower: ClipTower, model_name: str) -> None:
        """A ViT with class-token output, and a start block among its blocks."""
        super().check(tower, model_name)
        resolve_start_block(self.start_block, tower.depth)

    def map_views(self, tower: ClipTower, views: torch.Tensor, text: torch.Tensor, stages=NoStageTimes()
                  ) -> torch.Tensor:
        """Relevance maps of the labels on model-sized views (`relevance_maps`)."""
        return relevance_maps(tower, views, text, self.start_block, stages)


def build(config) -> RelevanceMethod:
    """The method for a `SegmenterConfig`: its `start_block`."""
    return RelevanceMethod(config.resolved("start_block"))
