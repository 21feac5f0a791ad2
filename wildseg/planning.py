"""Planning a `wildseg segment` run before any work: which images of the inputs (and of a shard) it segments, which
were done before, and the checks that keep the user's files safe (no output written over an input or where a
folder is, no output made with other settings passed off as done).

Planning streams. The inputs are listed once (`inputs.unique_inputs`, two hashes kept per input); each image's
outputs are checked as it comes, from one listing of its output folder (`outputs.folder_entries`), so that a
first run stats nothing per image and a resumed one reads only the records that exist. The images to do go to a
temporary plan file, which `RunPlan.todo` reads back as the run segments them: a million inputs are planned
without a list of them in memory, and a Ray driver hands them out in chunks as it reads.

Where no check can refuse the run once the listing has begun (`hands_out_as_listed`: a first run of one folder),
a Ray driver plans in the background and hands out the images as they are planned (`plan_run`'s
`hand_out_after`): `RunPlan.todo` then follows the plan file as it grows.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional

from .errors import WildsegError, setting
from .inputs import shard_index, table_key, unique_inputs
from .provenance import UNRECORDED, changed_settings, image_request, request_digest

if TYPE_CHECKING:
    from .batch import Labeling
    from .outputs import FolderEntries

SHOWN_IMAGES = 3
"""How many of the images a usage error concerns it names (then how many there are)."""
LISTED_FOLDERS = 64
"""How many output folders' listings planning keeps at once (images of one folder mostly come together)."""
READ_BYTES = 1 << 20
"""How much of the plan file is read at once."""
WRITE_BYTES = 1 << 16
"""How much of the plan is gathered in memory before it is written to the plan file."""
FOLLOW_S = 0.05
"""How often `RunPlan.todo` looks for images that a listing in the background has added."""
REQUESTS_KEPT = 64
"""How many images' requests `ImageRequests` keeps (one per label set)."""
RECORD_HEAD = 1 << 16
"""How much of a record is searched for its request's digest (a longer record's digest further on is found by
parsing it)."""


@dataclass(frozen=True)
class OutputLayout:
    """Where a run writes each image's outputs: under `out_dir`, at the image's output stem, with the scores, the
    heat maps of `heatmap_labels` (background first) and the object map when they are asked for."""

    out_dir: Path
    scores: bool = False
    heatmap_labels: Optional[tuple[str, ...]] = None
    instances: bool = False

    @cached_property
    def suffixes(self) -> dict[str, str]:
        """What each output's name adds to the image's name: '.png', '_overlay.jpg', '.json' and the others."""
        return {kind: path.name[1:] for kind, path in self.paths("_").items()}

    @cached_property
    def needed_suffixes(self) -> tuple[str, ...]:
        """The `suffixes` of the outputs an image is done with (`outputs.done_record`): the record first, the mask,
        and those asked for beyond the basic ones (not the overlay, a preview)."""
        from .outputs import BASIC_OUTPUTS

        extra = [suffix for kind, suffix in self.suffixes.items() if kind not in BASIC_OUTPUTS]
        return self.suffixes["record"], self.suffixes["mask"], *extra

    def paths(self, stem: str) -> dict[str, Path]:
        """The output paths of the image with output stem `stem` (`outputs.output_paths`)."""
        from .outputs import output_paths  # OpenCV, once an image is found: usage errors come at once

        return output_paths(Path(stem), self.out_dir, scores=self.scores, heatmap_labels=self.heatmap_labels,
                            instances=self.instances)


class RunPlan:
    """A planned run (`plan_run`): its counts, the one image's outputs when it has one image, and the images to
    do, kept in a temporary file that is deleted when the plan is closed (it is a context manager)."""

    def __init__(self, layout: OutputLayout):
        self.layout = layout
        self.found = 0
        """Images the inputs hold, in every shard."""
        self.images = 0
        """Images of the shard (all of them without one), the unlisted ones included."""
        self.unlisted = 0
        """Images of the shard that the labels file does not list (skipped)."""
        self.todo_count = 0
        """Images to segment."""
        self.only: Optional[tuple[Path, dict[str, Path]]] = None
        """The image and its output paths where the shard holds one image with labels, else None."""
        self.leftovers: list[Path] = []
        """Temporary files that a killed earlier run left beside the outputs of the images planned."""
        self.plan_file = tempfile.TemporaryFile(prefix="wildseg-plan-", buffering=0)
        self.pending, self.written = bytearray(), 0
        self.listed = False
        """Whether planning has ended: the counts are then final and the plan file holds every image to do."""
        self.failure: Optional[BaseException] = None
        """The error that ended planning, if one did."""
        self.cancelled = False
        self.progressed = threading.Condition()
        self.lister: Optional[threading.Thread] = None

    @property
    def skipped(self) -> int:
        """Images done before, and not segmented again."""
        return self.images - self.unlisted - self.todo_count

    def line(self) -> str:
        """What the run would do, in one line."""
        unlisted = f"{self.unlisted} skipped (not in the labels file), " if self.unlisted else ""
        shard = f" of the {self.found} the inputs hold" if self.found != self.images else ""
        return (f"would segment {self.todo_count} images: {self.skipped} skipped (done before), {unlisted}of "
                f"{self.images} images{shard}")

    def remove_leftovers(self) -> None:
        """Delete the temporary files a killed earlier run left beside the outputs (`leftovers`)."""
        for leftover in self.leftovers:
            leftover.unlink(missing_ok=True)

    def add(self, path: str, stem: str) -> None:
        """Put an image (path, output stem) at the end of the images to do."""
        self.pending += os.fsencode(path) + b"\0" + os.fsencode(stem) + b"\0"
        self.todo_count += 1
        if len(self.pending) >= WRITE_BYTES:
            self.write()

    def write(self) -> None:
        """Write the images gathered to the plan file."""
        with self.progressed:
            while self.pending and not self.cancelled:
                count = os.pwrite(self.plan_file.fileno(), self.pending, self.written)
                self.written += count
                del self.pending[:count]
            self.pending.clear()
            self.progressed.notify_all()

    def end(self, failure: Optional[BaseException] = None) -> None:
        """Planning has ended (with `failure`, the error that ended it, if one did)."""
        self.write()
        with self.progressed:
            self.failure, self.listed = failure, True
            self.progressed.notify_all()

    def wait(self, timeout: Optional[float]) -> bool:
        """Wait up to `timeout` seconds (None: until it ends) for planning to end; whether it has. Raises the error
        that ended it."""
        with self.progressed:
            self.progressed.wait_for(lambda: self.listed, timeout)
            if self.failure is not None:
                raise self.failure
            return self.listed

    def todo(self, follow: bool = True) -> Iterator[tuple[Path, dict[str, Path]]]:
        """The images to do, in the order of the listing, with their output paths: read from the plan file as they
        are taken. While planning goes on in the background this follows it, images not yet written to the file
        included (unless not `follow`: then only those written), and raises the error that ended it."""
        offset, fields, rest = 0, [], b""
        while True:
            with self.progressed:
                while follow and offset == self.written + len(self.pending) and not self.listed:
                    self.progressed.wait(FOLLOW_S)  # the listing adds images without waking the reader
                if follow and self.failure is not None:
                    raise self.failure
                start, end = offset - self.written, self.written
                if start >= 0 and not (follow and start < len(self.pending)):
                    return
                block = bytes(self.pending[start:start + READ_BYTES]) if start >= 0 else None
            if block is None:
                block = os.pread(self.plan_file.fileno(), min(READ_BYTES, end - offset), offset)
            offset += len(block)
            *complete, rest = (rest + block).split(b"\0")
            fields.extend(complete)
            for index in range(0, len(fields) - 1, 2):
                path, stem = os.fsdecode(fields[index]), os.fsdecode(fields[index + 1])
                yield Path(path), self.layout.paths(stem)
            fields = fields[len(fields) - len(fields) % 2:]

    def close(self) -> None:
        """Stop planning where it goes on in the background, and delete the plan file."""
        self.cancelled = True
        if self.lister is not None:
            self.lister.join()
        self.plan_file.close()

    def __enter__(self) -> "RunPlan":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def plan_run(inputs: Iterable[str], layout: OutputLayout, labeling: Labeling, request: Callable[[], dict], *,
             recursive: bool = False, shard: Optional[tuple[int, int]] = None, skip_unlisted: bool = False,
             overwrite: bool = False, given_labels: Optional[str] = None,
             hand_out_after: Optional[float] = None) -> RunPlan:
    """Plan a run of `wildseg segment` over `inputs` (files, folders, glob patterns, @lists).

    Args:
        inputs: what the command was given.
        layout: where the outputs go (the output folder is left out of the listing).
        labeling: how the images get their labels (a labels file's table decides which are listed).
        request: this run's `provenance.run_request`, called at each record found (cache it: it reads the templates).
        recursive: search folders and ** patterns into their sub-folders.
        shard: plan only shard K of N (`inputs.shard_index` of the output stems).
        skip_unlisted: skip the images the labels file does not list, instead of failing.
        overwrite: segment again the images done before (their records are then not read).
        given_labels: the labels given, which an input that looks like a label is answered with.
        hand_out_after: None to plan the whole run before returning; else plan in the background and return once
            planning has ended or after this many seconds, whichever comes first (`RunPlan.listed` says which; for
            runs that `hands_out_as_listed`, whose images can be handed out while the listing goes on).

    Returns:
        The RunPlan (to be closed), which names the temporary files a killed earlier run left (nothing is removed or
        written in planning).

    Raises:
        WildsegError: the inputs hold no image, an input is missing or two collide; an output path is a folder or an
            input; images lack labels file entries (without `skip_unlisted`); images were done before with other
            settings (without `overwrite`). In the background, an error found after `hand_out_after` is raised by
            `RunPlan.todo` and `RunPlan.wait`.
    """
    plan = RunPlan(layout)
    listing = partial(fill_plan, plan, inputs, labeling, request, recursive, shard, skip_unlisted, overwrite,
                      given_labels)
    if hand_out_after is not None:
        plan.lister = threading.Thread(target=plan_in_background, args=(plan, listing), name="wildseg-planning",
                                       daemon=True)
        plan.lister.start()
    try:
        if hand_out_after is None:
            listing()
            plan.end()
        plan.wait(hand_out_after)
    except BaseException:
        plan.close()
        raise
    return plan


def plan_in_background(plan: RunPlan, listing: Callable[[], None]) -> None:
    """Run `listing` (`fill_plan`) and end the plan with the error that stopped it, if one did."""
    try:
        listing()
    except BaseException as error:  # handed to the thread that reads the plan, which raises it
        plan.end(error)
    else:
        plan.end()


def fill_plan(plan: RunPlan, inputs: Iterable[str], labeling: Labeling, request: Callable[[], dict], recursive: bool,
              shard: Optional[tuple[int, int]], skip_unlisted: bool, overwrite: bool, given_labels: Optional[str]
              ) -> None:
    """List the inputs into `plan` and make the checks of `plan_run` (its arguments), until the plan is closed."""
    layout = plan.layout
    outdated, unlisted, inside_output, first = Counter(), [], set(), None
    out_dir = os.path.abspath(layout.out_dir)
    listings: dict[str, FolderEntries] = {}
    requests = ImageRequests(request, labeling)
    for path, absolute, stem in unique_inputs(inputs, recursive, layout.out_dir, given_labels):
        if plan.cancelled:
            return
        plan.found += 1
        if shard is not None and shard_index(stem, shard[1]) != shard[0]:
            continue
        plan.images += 1
        if absolute.startswith(out_dir + os.sep):
            inside_output.add(absolute)
        if labeling.table is not None and table_key(Path(path)) not in labeling.table:
            plan.unlisted += 1
            if len(unlisted) < SHOWN_IMAGES:
                unlisted.append(path)
            continue
        first = first or (path, stem)
        folder, name = os.path.split(os.path.join(out_dir, stem))
        entries = listings[folder] if folder in listings else folder_listing(listings, folder)
        if not entries or not done_before(absolute, folder, name, layout, entries, requests, overwrite, outdated,
                                          plan.leftovers):
            plan.add(path, stem)
    plan.write()
    if not plan.found:
        raise WildsegError("the inputs hold no image (jpg, jpeg, png, bmp, tif, tiff, webp): check the paths")
    if first is not None and plan.images - plan.unlisted == 1:
        plan.only = Path(first[0]), layout.paths(first[1])
    refuse_unlisted(plan, unlisted, labeling, skip_unlisted)
    if inside_output:
        refuse_to_overwrite_inputs(plan, inside_output)
    refuse_outdated(outdated, plan.skipped, layout.out_dir)


def hands_out_as_listed(inputs: list[str], out_dir: Path, labeling: Labeling) -> bool:
    """Whether a run's images can be handed out as they are listed, no check being able to refuse the run once its
    listing has begun: a first run (its output folder empty or missing: no image done before, with other settings
    or not, no output in the place of a folder, no input that an output could overwrite) of one folder (whose
    images' output stems are their paths in it) without a labels file. Two images of the folder that would write
    the same outputs (`a.jpg` and `a.png`) still stop such a run where the listing finds them."""
    if len(inputs) != 1 or inputs[0].startswith("@") or not Path(inputs[0]).is_dir() or labeling.table is not None:
        return False
    if not out_dir.is_dir():
        return not out_dir.exists()
    with os.scandir(out_dir) as entries:
        return next(entries, None) is None


class ImageRequests:
    """The request of each image (`provenance.image_request`) and its `request_digest` as a record holds it (the
    bytes `"request_digest": "HEX"`), made once per label set while there are few: with the same labels for every
    image (--labels, automatic labels) once, so that a million records are checked against one request."""

    def __init__(self, request: Callable[[], dict], labeling: Labeling):
        self.request, self.labeling, self.made = request, labeling, {}

    def of(self, image: str) -> tuple[dict, bytes]:
        """The request of the image at `image` (an absolute path) and the digest bytes of a record made with it."""
        per_image = self.labeling.table is not None
        asked = self.labeling.asked(Path(image)) if per_image or None not in self.made else None
        key = json.dumps(asked, sort_keys=True) if per_image else None
        if key not in self.made:
            if len(self.made) >= REQUESTS_KEPT:
                self.made.clear()
            request = image_request(self.request(), asked)
            self.made[key] = request, json.dumps({"request_digest": request_digest(request)})[1:-1].encode()
        return self.made[key]


def folder_listing(listings: dict[str, FolderEntries], folder: str) -> FolderEntries:
    """The entries of an output folder, listed at its first image and kept for the next ones (the LISTED_FOLDERS
    latest folders)."""
    from .outputs import folder_entries

    if folder not in listings:
        if len(listings) >= LISTED_FOLDERS:
            del listings[next(iter(listings))]
        listings[folder] = folder_entries(Path(folder))
    return listings[folder]


def done_before(image: str, folder: str, name: str, layout: OutputLayout, entries: FolderEntries,
                requests: ImageRequests, overwrite: bool, outdated: Counter, leftovers: list[Path]) -> bool:
    """Whether an image whose outputs go to `folder` (which holds `entries`) under `name` is done (as
    `outputs.done_record` says, its files looked up in `entries`) and not to be segmented again; fails when one of
    its output paths is a folder. Counts in `outdated` (None: images, else per setting) a done image made with
    other settings than its request (`ImageRequests`), and adds to `leftovers` the temporary files beside its
    outputs. Names are strings here and a record that holds the request's digest is not parsed: a million of them
    are checked."""
    from .outputs import is_record

    if entries.folders or entries.temporaries:
        for output in (name + suffix for suffix in layout.suffixes.values()):
            if output in entries.folders:
                raise WildsegError(f"the output path {os.path.join(folder, output)} is a folder: move it away or "
                                   f"choose another {setting('out')}")
            leftovers.extend(Path(folder, leftover) for leftover in entries.temporaries.get(output, ()))
    if overwrite or not all(name + suffix in entries.files for suffix in layout.needed_suffixes):
        return False
    request, digest = requests.of(image)
    record_path = os.path.join(folder, name + layout.suffixes["record"])
    try:
        if digest in record_head(record_path):
            return True
        with open(record_path, "rb") as file:
            record = json.loads(file.read())
    except (OSError, ValueError):
        return False
    if not is_record(record):
        return False
    changed = changed_settings(record, request)
    if changed is None or changed:
        outdated[None] += 1
        outdated.update(changed or [UNRECORDED])
    return True


def record_head(path: str) -> bytes:
    """The first RECORD_HEAD bytes of a record, read with the system's calls alone (half the cost of `open`)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        return os.read(descriptor, RECORD_HEAD)
    finally:
        os.close(descriptor)


def refuse_unlisted(plan: RunPlan, unlisted: list[str], labeling: Labeling, skip: bool) -> None:
    """Unless `skip`, a usage error when the labels file lists not every image, naming the first few."""
    if plan.unlisted and not skip:
        named = ", ".join(unlisted)
        more = f" and {plan.unlisted - len(unlisted)} more" if plan.unlisted > len(unlisted) else ""
        raise WildsegError(f"{plan.unlisted} of the {plan.images} images have no entry in {setting('labels_file')} "
                           f"{labeling.labels_file} ({named}{more}): add their rows, or give --skip-unlisted to "
                           "segment only the images it lists")


def refuse_to_overwrite_inputs(plan: RunPlan, inside_output: set[str]) -> None:
    """A usage error when an image to do would write an output over an input (one of `inside_output`, the inputs
    that lie in the output folder)."""
    for image, paths in plan.todo(follow=False):
        if any(os.path.abspath(path) in inside_output for path in paths.values()):
            raise WildsegError(f"the outputs of {image} would overwrite the input images: choose another --out folder")


def refuse_outdated(outdated: Counter, done: int, out_dir: Path) -> None:
    """A usage error when images done before (`done` of them) were made with other settings: naming each differing
    setting and for how many images, with --overwrite and another --out as the ways on."""
    images = outdated.pop(None, 0)
    if images:
        differing = ", ".join(f"{name if name == UNRECORDED else setting(name)} for {count}"
                              for name, count in outdated.most_common())
        raise WildsegError(f"{images} of the {done} images done before in {out_dir} were made with other "
                           f"settings ({differing}): give --overwrite to segment them again with these, or "
                           "choose another --out")
