"""Test-time augmentation: views of an image seen at the model's resolution, and their maps merged back.

A view is a crop box of the image, optionally mirrored left-right, resized to a given size (the model's input
for the relevance method) or seen as cropped.
Its map (on the patch grid) is warped back exactly: mirrored back, resized to the box with bilinear
interpolation whose sample positions are pixel centres (`align_corners=False`), and added into the box.
Each pixel's merged value is the mean over the views that cover it.

Policies (Zabari & Hoshen refine relevance by augmentation; the set of views here is ours):

- ``none``: the whole image.
- ``default``: the whole image and its mirror; square crops with the side of the image's short side
  (zoom 1, covering a long image without squashing it) and with half that side (zoom 2), each zoom
  sliding with half-crop overlap.
- ``heavy``: as ``default`` with zoom 3 added and every crop also mirrored.

The dense method slides square windows over the image, already resized for the model, as the official
dense segmenters do (`plan_windows`: their window placement, windows seen as cropped, or the whole image in
one view); a policy's zooms are then window scales (zoom 2 = windows of half the side, enlarged to the
window's size), and its mirrors mirror those windows.

The whole-image view squashes the image to a square; crops are square, so they keep the aspect ratio.
"""

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .errors import WildsegError
from .timing import NoStageTimes


@dataclass(frozen=True)
class View:
    """A crop box (left, top, right, bottom in pixels, right and bottom exclusive), mirrored or not, and the
    (height, width) the model sees it at: None for the crop's own size."""

    box: tuple[int, int, int, int]
    mirrored: bool
    size: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Policy:
    """Which views to take: the whole image (and its mirror), and square crops at the given zooms."""

    mirror_whole: bool
    zooms: tuple[int, ...]
    mirror_crops: bool


POLICIES = {
    "none": Policy(mirror_whole=False, zooms=(), mirror_crops=False),
    "default": Policy(mirror_whole=True, zooms=(1, 2), mirror_crops=False),
    "heavy": Policy(mirror_whole=True, zooms=(1, 2, 3), mirror_crops=True),
}


def policy_named(policy: str) -> Policy:
    """The policy of that name, or a one-line error listing the known ones."""
    if policy not in POLICIES:
        raise WildsegError(f"unknown TTA policy {policy!r}: use {', '.join(POLICIES)}")
    return POLICIES[policy]


def sliding_starts(length: int, window: float, stride: float) -> list[int]:
    """Window starts covering [0, length): the fewest evenly spaced starts whose spacing is at most `stride`,
    the first at 0 and the last window flush with the end."""
    if window >= length:
        return [0]
    steps = math.ceil((length - window) / stride)
    return [round(i * (length - window) / steps) for i in range(steps + 1)]


def plan_views(height: int, width: int, size: int, policy: str = "default") -> list[View]:
    """The views a policy takes of an image of this size, whole image first, each seen at size x size."""
    plan = policy_named(policy)
    square = (size, size)
    whole = (0, 0, width, height)
    views = [View(whole, False, square)] + ([View(whole, True, square)] if plan.mirror_whole else [])
    crops = []
    for zoom in plan.zooms:
        side = max(1, round(min(height, width) / zoom))
        for top in sliding_starts(height, side, side / 2):
            for left in sliding_starts(width, side, side / 2):
                box = (left, top, left + side, top + side)
                if box != whole:
                    crops.append(box)
    for box in dict.fromkeys(crops):
        views.append(View(box, False, square))
        if plan.mirror_crops:
            views.append(View(box, True, square))
    return views


def window_spans(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of the windows along one axis as mmsegmentation's sliding inference places them, which the
    official NACLIP, SCLIP and ClearCLIP code uses: starts every `stride`, as many as needed to reach the end,
    the last one moved back to end flush with it; a window longer than the axis is cut to it."""
    count = max(length - window + stride - 1, 0) // stride + 1
    spans = []
    for index in range(count):
        end = min(index * stride + window, length)
        spans.append((max(end - window, 0), end))
    return spans


def plan_windows(height: int, width: int, window: int, stride: int, policy: str = "default") -> list[View]:
    """Views for the dense method on the image as resized for the model: windows of `window` pixels every
    `stride` (`window_spans`), seen as cropped, or with `window` 0 the whole image in one view; for test-time
    augmentation, windows of window / z pixels every stride / z at each zoom z > 1 of the policy, enlarged z
    times, and mirrors where the policy mirrors (the whole-image mirror applies to zoom 1). The whole image
    has no zooms."""
    plan = policy_named(policy)
    zooms = (1,) if window == 0 else tuple(dict.fromkeys((1, *plan.zooms)))
    views = []
    for zoom in zooms:
        mirrors = (False, True) if (plan.mirror_whole if zoom == 1 else plan.mirror_crops) else (False,)
        if window == 0:
            boxes = [(0, 0, width, height)]
        else:
            side, step = max(1, round(window / zoom)), max(1, round(stride / zoom))
            boxes = [(left, top, right, bottom) for top, bottom in window_spans(height, side, step)
                     for left, right in window_spans(width, side, step)]
        for mirrored in mirrors:
            for left, top, right, bottom in boxes:
                size = None if zoom == 1 else (round((bottom - top) * zoom), round((right - left) * zoom))
                views.append(View((left, top, right, bottom), mirrored, size))
    return views


def render_view(image: torch.Tensor, view: View) -> torch.Tensor:
    """The view's pixels (channels x height x width) from an image tensor (channels x H x W): the crop, resized
    (antialiased) to the view's size unless that is its own, mirrored if the view is. Channels after the third are
    region ids (`methods.base.Method.uses_regions`), resized by nearest neighbour."""
    left, top, right, bottom = view.box
    crop = image[:, top:bottom, left:right]
    if view.size is not None and view.size != tuple(crop.shape[-2:]):
        resized = F.interpolate(crop[None, :3], size=view.size, mode="bilinear", align_corners=False, antialias=True)
        if crop.shape[0] > 3:
            resized = torch.cat([resized, F.interpolate(crop[None, 3:], size=view.size, mode="nearest")], dim=1)
        crop = resized[0]
    return crop.flip(-1) if view.mirrored else crop


def warp_to_box(maps: torch.Tensor, view: View) -> torch.Tensor:
    """A view's maps (labels x g x g) in the image coordinates of its box: labels x box height x box width."""
    left, top, right, bottom = view.box
    unmirrored = maps.flip(-1) if view.mirrored else maps
    return F.interpolate(unmirrored[None], size=(bottom - top, right - left), mode="bilinear", align_corners=False)[0]


class ViewAccumulator:
    """Sums warped view maps and coverage counts over the image, and returns their mean."""

    def __init__(self, labels: int, height: int, width: int, device: torch.device):
        self.total = torch.zeros(labels, height, width, device=device)
        self.coverage = torch.zeros(height, width, device=device)

    def add(self, maps: torch.Tensor, view: View) -> None:
        left, top, right, bottom = view.box
        self.total[:, top:bottom, left:right] += warp_to_box(maps.float(), view)
        self.coverage[top:bottom, left:right] += 1

    def mean(self) -> torch.Tensor:
        return self.total / self.coverage.clamp(min=1)


class ViewStream:
    """Maps the views of successive images in full batches, across image boundaries, and averages them per image.

    `add(key, image, views)` queues an image (channels x H x W); whenever `batch_size` views are waiting they
    are rendered, mapped by `map_views` (views x channels x h x w -> views x labels x grid), views of one
    rendered size at a time, and warped back. `add` and `flush` return the (key, merged maps) of the images all
    of whose views are done. A batch that runs out of CUDA memory is split in halves and `batch_size` lowered
    for the rest of the stream. `stages` times rendering and merging as the stage "tta_merge". `seconds[key]`
    is an image's share of the time its batches took (each batch's time split by views), for its record.
    With `context` (image -> what a method needs of the whole image, `methods.base.Method.uses_image_context`),
    each image's is computed once, before its first view is mapped, and `map_views` takes the views' as its
    second argument (a list, one per view).
    """

    def __init__(
        self,
        map_views: Callable[..., torch.Tensor],
        batch_size: int = 8,
        on_batch: Callable[[int], None] = lambda done: None,
        stages=NoStageTimes(),
        context: Optional[Callable[[torch.Tensor], Any]] = None,
    ):
        self.map_views, self.batch_size, self.on_batch = map_views, batch_size, on_batch
        self.stages, self.context = stages, context
        self.waiting: list[tuple[_Job, View]] = []
        self.views_done = 0
        self.seconds: dict[object, float] = {}

    def add(self, key, image: torch.Tensor, views: list[View]) -> list[tuple[object, torch.Tensor]]:
        job = _Job(key, image, len(views))
        self.waiting.extend((job, view) for view in views)
        finished = []
        while len(self.waiting) >= self.batch_size:
            finished += self._run(self.batch_size)
        return finished

    def flush(self) -> list[tuple[object, torch.Tensor]]:
        finished = []
        while self.waiting:
            finished += self._run(self.batch_size)
        return finished

    def _run(self, count: int) -> list[tuple[object, torch.Tensor]]:
        clock = time.perf_counter()
        batch, self.waiting = self.waiting[:count], self.waiting[count:]
        maps = self._mapped(batch)
        while maps is None:
            torch.cuda.empty_cache()
            batch, self.waiting = self.waiting[: self.batch_size], self.waiting[self.batch_size :]
            maps = self._mapped(batch)
        finished = []
        with self.stages.stage("tta_merge"):
            for (job, view), view_maps in zip(batch, maps):
                if job.accumulator is None:
                    job.accumulator = ViewAccumulator(view_maps.shape[0], *job.image.shape[-2:], view_maps.device)
                job.accumulator.add(view_maps, view)
                job.remaining -= 1
                if job.remaining == 0:
                    finished.append((job.key, job.accumulator.mean()))
        self.views_done += len(batch)
        share = (time.perf_counter() - clock) / len(batch)
        for job, _ in batch:
            self.seconds[job.key] = self.seconds.get(job.key, 0.0) + share
        self.on_batch(self.views_done)
        return finished

    def _mapped(self, batch: list[tuple["_Job", View]]) -> Optional[list[torch.Tensor]]:
        """The maps of the batch's views, one model call per rendered size; None when it ran out of CUDA memory,
        having put it back and halved `batch_size`.

        The retry happens in the caller, once this frame's exception, and with it the failed attempt's tensors,
        is gone, so that `empty_cache` can release them."""
        try:
            with self.stages.stage("tta_merge"):
                rendered = [render_view(job.image, view) for job, view in batch]
            if self.context is not None:
                for job, _ in batch:
                    if job.context is None:
                        job.context = self.context(job.image)
            maps = [None] * len(batch)
            for shape in dict.fromkeys(pixels.shape for pixels in rendered):
                indices = [index for index, pixels in enumerate(rendered) if pixels.shape == shape]
                arguments = [torch.stack([rendered[i] for i in indices])]
                if self.context is not None:
                    arguments.append([batch[i][0].context for i in indices])
                for index, view_maps in zip(indices, self.map_views(*arguments)):
                    maps[index] = view_maps
            return maps
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            self.batch_size = max(1, len(batch) // 2)
            self.waiting = batch + self.waiting
            return None


class _Job:
    """An image in a ViewStream: its pixels, its accumulator, how many of its views are still to map, and its
    context (`ViewStream`'s `context`) once computed."""

    def __init__(self, key, image: torch.Tensor, views: int):
        self.key, self.image, self.remaining, self.accumulator, self.context = key, image, views, None, None


def merge_views(
    image: torch.Tensor,
    views: list[View],
    map_views: Callable[..., torch.Tensor],
    batch_size: int = 8,
    on_batch: Callable[[int], None] = lambda done: None,
    stages=NoStageTimes(),
    context: Optional[Callable[[torch.Tensor], Any]] = None,
) -> torch.Tensor:
    """Average `map_views` over all views of one image (a ViewStream of a single image)."""
    stream = ViewStream(map_views, batch_size, on_batch, stages, context)
    finished = stream.add(None, image, views) + stream.flush()
    return finished[0][1]
