"""The interface every segmentation method implements, and the shared form of the dense family.

A method turns a batch of views (already cut, resized and normalised by the pipeline) and the label embeddings
into one map per label on each view's patch grid. It sees the model only through `ClipTower`. The dense family's
methods give unit-norm patch features in the joint space (`DenseMethod.features`), whose cosine with each label
is the map (Zhou et al. 2022, MaskCLIP, Sec. 3.2); most change CLIP's last block only (`LastBlockMethod`).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..backbone.clip_internals import ClipTower, vision_tower_problem
from ..errors import WildsegError
from ..timing import NoStageTimes

AttentionWeights = Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]
"""(per-head queries, per-head keys, patch grid) -> attention probabilities (batch x heads x tokens x tokens)."""


class Method(ABC):
    """A segmentation method: `name` as registered (`wildseg.methods.REGISTRY`), and its `family`."""

    name: str
    family: str

    def check(self, tower: ClipTower, model_name: str) -> None:
        """Refuse a model the method cannot run on, in one line naming what it needs.

        Args:
            tower: the loaded model's image tower.
            model_name: its open_clip architecture, for the message.
        """
        problem = vision_tower_problem(tower.visual)
        if problem is not None:
            raise WildsegError(f"model {model_name} is {problem}: wildseg's methods need one such as ViT-B-16")

    uses_regions = False
    """Whether the method reads the image's regions (CorrCLIP): then its views carry region ids as a fourth
    channel (`pipeline.Pipeline.view_tensor`) and the mask takes each region's majority label."""

    uses_image_context = False
    """Whether the method needs something of the whole image beside its views (RF-CLIP's global vector): then its
    `image_context(tower, image)` computes it once per image, from the normalised image the views are cut from
    (3 x height x width), and its `map_views` takes each view's as `contexts`."""

    @abstractmethod
    def map_views(self, tower: ClipTower, views: torch.Tensor, text: torch.Tensor, stages=NoStageTimes()
                  ) -> torch.Tensor:
        """The map of every label on every view.

        Args:
            tower: the model's image tower.
            views: normalised views (views x 3 x height x width), all of one size, on the model's device.
            text: unit-norm label embeddings (labels x dim) on the same device.
            stages: a `timing.StageTimes` to time the model's stages ("forward", "backward"), or none.

        Returns:
            views x labels x rows x columns (the views' patch grid), fp32.
        """


class DenseMethod(Method):
    """A method of the dense family: its map is the cosine of every patch feature with every label."""

    family = "dense"

    @abstractmethod
    def features(self, tower: ClipTower, windows: torch.Tensor) -> torch.Tensor:
        """Unit-norm patch features in the joint space (windows x patches x dim, row-major grid, fp32) of
        normalised windows of any size (windows x 3 x height x width)."""

    def map_views(self, tower: ClipTower, views: torch.Tensor, text: torch.Tensor, stages=NoStageTimes()
                  ) -> torch.Tensor:
        """Cosine of every patch with every label (`Method.map_views`)."""
        with torch.no_grad(), stages.stage("forward"):
            cosine = self.features(tower, views) @ text.float().T
        rows, columns = views.shape[-2] // tower.patch_size, views.shape[-1] // tower.patch_size
        return cosine.transpose(1, 2).reshape(views.shape[0], text.shape[0], rows, columns)


@dataclass(frozen=True)
class LastBlockMethod(DenseMethod):
    """The common form of the training-free dense segmenters: CLIP's blocks run unchanged but the last, whose
    attention weights are the method's and whose residual connection and feed-forward branch it keeps or drops.
    Positional embeddings are interpolated to each window's patch grid (`ClipTower.embed_windows`)."""

    name: str
    weights: AttentionWeights
    residual: bool
    feed_forward: bool

    def last_block(self, tower: ClipTower, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The last block with the method's attention weights, residual and feed-forward."""
        last = tower.depth - 1
        query, key, value = tower.head_projections(last, x)
        attended = tower.attention_output(last, self.weights(query, key, grid), value)
        x = x + attended if self.residual else attended
        return tower.feed_forward(last, x) if self.feed_forward else x

    def features(self, tower: ClipTower, windows: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the changed last block, ln_post and the visual projection, unit-norm (fp32)."""
        x, grid = tower.embed_windows(windows)
        for block in range(tower.depth - 1):
            x = tower.run_block(block, x)
        return F.normalize(tower.patch_features(self.last_block(tower, x, grid)).float(), dim=-1)
